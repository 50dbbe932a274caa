"""Pure torch.fx graph passes for Selective Network Linearization (GraphModule in, GraphModule out).

Order of use: ``trace`` -> ``decompose_attention`` -> ``find_relus`` -> ``make_out_of_place`` -> ``insert_gates`` ->
(train, binarize: the ``snl_fx`` package) -> ``lower_gates`` -> ``merge_linear`` (optional).
It imports nothing of the library above it but the error class (``snl_fx.errors``).
"""

from torch.fx import GraphModule

from .attention import decompose_attention
from .errors import PassError
from .families import FAMILIES, Family, NonlinearGate, PartialNonlinear
from .find import find_relus
from .gate import (
    COUNT_EPS,
    GATES_PREFIX,
    GRANULARITIES,
    Gate,
    Granularity,
    element_weights,
    gate_shape,
    gates,
    insert_gates,
    make_out_of_place,
    site_counts,
    site_key,
)
from .lower import PartialReLU, binary_mask, kept_counts, lower_gates, set_form
from .merge import MergeCandidate, default_should_merge, merge_linear
from .meta import Nonlinearity, Site, SNLMeta, Ungateable, get_meta
from .trace import as_args, count_aten_relus, trace, trace_as_called

__all__ = [
    "front_end",
    "FAMILIES",
    "Family",
    "NonlinearGate",
    "PartialNonlinear",
    "COUNT_EPS",
    "GATES_PREFIX",
    "GRANULARITIES",
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
    "decompose_attention",
    "default_should_merge",
    "element_weights",
    "find_relus",
    "gate_shape",
    "gates",
    "get_meta",
    "insert_gates",
    "kept_counts",
    "lower_gates",
    "make_out_of_place",
    "merge_linear",
    "set_form",
    "site_counts",
    "site_key",
    "trace",
    "trace_as_called",
]


def front_end(model, example_input, **trace_options) -> GraphModule:
    """The front end, one place for the inspector and ``prepare``: :func:`trace` (with
    ``trace_options``), :func:`decompose_attention`, :func:`find_relus`. Every site and every other
    nonlinearity is then in ``get_meta(gm)``; the graph is the one ``pi_cost`` prices."""
    return find_relus(decompose_attention(trace(model, example_input, **trace_options)))
