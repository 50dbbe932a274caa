"""snl_fx: Selective Network Linearization as a torch.fx compiler pass."""

from importlib.metadata import PackageNotFoundError, version

from ._errors import SnlFxError
from ._report import PROTOCOLS, OtherCount, ReluReport, SiteCount

try:
    __version__ = version("snl_fx")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = [
    "PROTOCOLS",
    "OtherCount",
    "ReluReport",
    "SiteCount",
    "SnlFxError",
    "__version__",
]
