"""The compiler's old top-level name: the passes now live in :mod:`snl_fx.passes`.

``import passes`` (and ``passes.gate``, ``passes.merge``, ...) keeps working and gives the very
same modules; new code should import ``snl_fx.passes``.
"""

import importlib
import sys

from snl_fx.passes import *  # noqa: F403 - the same public names
from snl_fx.passes import __all__  # noqa: F401

for _name in ("errors", "find", "gate", "lower", "merge", "meta", "spellings", "trace"):
    sys.modules[f"{__name__}.{_name}"] = globals()[_name] = importlib.import_module(f"snl_fx.passes.{_name}")
del _name
