"""The passes' error: the library's :class:`snl_fx.errors.SnlFxError` under the passes' name."""

from ..errors import SnlFxError as PassError

__all__ = ["PassError"]
