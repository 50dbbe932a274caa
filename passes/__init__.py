"""Pure torch.fx graph passes for Selective Network Linearization (GraphModule in, GraphModule out).

Order of use: ``trace`` -> ``find_relus`` -> ``make_out_of_place`` -> ``insert_gates`` ->
(train, binarize: the ``snl_fx`` package) -> ``lower_gates`` -> ``merge_linear`` (optional).
This package never imports snl_fx.
"""

from .errors import PassError
from .find import find_relus
from .gate import Gate, Granularity, gate_shape, gates, insert_gates, make_out_of_place, site_counts, site_key
from .lower import PartialReLU, binary_mask, kept_counts, lower_gates
from .merge import MergeCandidate, default_should_merge, merge_linear
from .meta import Nonlinearity, Site, SNLMeta, Ungateable, get_meta
from .trace import as_args, count_aten_relus, trace

__all__ = [
    "Gate",
    "Granularity",
    "MergeCandidate",
    "Nonlinearity",
    "PartialReLU",
    "PassError",
    "SNLMeta",
    "Site",
    "Ungateable",
    "as_args",
    "binary_mask",
    "count_aten_relus",
    "default_should_merge",
    "find_relus",
    "gate_shape",
    "gates",
    "get_meta",
    "insert_gates",
    "kept_counts",
    "lower_gates",
    "make_out_of_place",
    "merge_linear",
    "site_counts",
    "site_key",
    "trace",
]
