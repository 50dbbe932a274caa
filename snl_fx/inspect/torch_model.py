"""The inspector for torch modules: trace, find every ReLU site, and report it (sizes per sample).

:func:`linear_layer` is the one description of a node as a linear layer: the report, ``pi_cost``
and the merge pricing (``snl_fx.cost.merge``) all use it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Hashable, Mapping
from dataclasses import asdict
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from snl_fx import passes
from snl_fx.errors import SnlFxError
from snl_fx.inspect.report import LinearCount, OtherCount, ReluReport, ScaleCount, SiteCount, not_per_sample_note
from snl_fx.inspect.report import relu_depth as _relu_depth
from snl_fx.passes.find import batched_nodes
from snl_fx.passes.spellings import OTHER_FUNCTIONS, OTHER_METHODS, RECIPROCALS, other_nonlinearity


def module_report(model: nn.Module, example_input: Any) -> ReluReport:
    """The report of a torch module (see :func:`snl_fx.relu_count`); the module is not changed."""
    if example_input is None:
        raise SnlFxError("counting a torch module needs an example input (e.g. torch.randn(1, 3, 32, 32))")
    if any(isinstance(m, passes.Gate) for m in model.modules()):
        raise SnlFxError(
            "this model still has trainable SNL gates: count them with snl_fx.relu_count_gated(model), "
            "or lower it first with snl_fx.convert(model)"
        )
    gm = passes.front_end(model, example_input, share_weights=True)
    return report_from_graph(gm, source=type(model).__name__)


def report_from_graph(gm: GraphModule, source: str) -> ReluReport:
    """Build the report of a graph that :func:`passes.find_relus` has run on.

    Sizes are per sample: only values that a batched input flows into count (the passes'
    ``batched_nodes``); nonlinearities and linear layers on weights and constants alone are
    named in a note, as the ONNX inspector names them.
    """
    meta = passes.get_meta(gm)
    sites = [SiteCount(s.name, s.op, s.shape, s.numel) for s in meta.sites if s.family == "relu"]
    others = [OtherCount(o.name, o.kind, o.shape, o.comparisons, o.row) for o in meta.others]
    others += [OtherCount(s.name, s.kind, s.shape, s.numel, s.shape[-1] if s.kind == "softmax" else None)
               for s in meta.sites if s.family != "relu"]  # sites of other families, gated by prepare
    ungateable = [asdict(u) for u in meta.ungateable]
    notes = []
    if meta.ungateable:
        notes.append("ReLUs inside leaf modules are listed under 'not gateable' and not in the total")
    batch = meta.batch_size
    batched = batched_nodes(gm)
    modules = dict(gm.named_modules())
    linear, constant = [], [(c.name, c.kind, c.comparisons) for c in meta.constant]
    for node in gm.graph.nodes:
        layer = linear_layer(node, modules, batch)
        if layer is not None and node in batched:
            linear.append(layer)
        elif layer is not None:
            constant.append((layer.name, layer.op, _numel(node)))
    if note := not_per_sample_note(constant):
        notes.append(note)
    results = [n for out in gm.graph.nodes if out.op == "output" for n in out.all_input_nodes if n in batched]
    outputs = sum(_numel(n) for n in results) // batch
    scales = [ScaleCount(n.name, str(getattr(n.target, "__name__", n.target)), _shape(n)[1:], _numel(n) // batch)
              for n in gm.graph.nodes if _is_scale(n, modules, batched)]
    return ReluReport(source, sites, relu_depth(gm), others, ungateable, notes, linear, outputs, scales)


def _is_scale(node: Node, modules: Mapping[str, nn.Module], batched: set[Node]) -> bool:
    """Whether ``node`` multiplies (or divides) a batched float value by a public constant: a Python
    number or a value no batched input flows into, not a weight of more than one element (that is
    a secret product, ``mul``). In fixed point each element costs a truncation; as the ONNX
    inspector's ``scale``."""
    if node.op == "call_function":
        kind = OTHER_FUNCTIONS.get(node.target) if isinstance(node.target, Hashable) else None
    elif node.op == "call_method":
        kind = OTHER_METHODS.get(str(node.target))
    else:
        return False
    if kind not in ("mul", "div") or node.target in RECIPROCALS or node not in batched:
        return False
    tm = node.meta.get("tensor_meta")
    if not hasattr(tm, "dtype") or not tm.dtype.is_floating_point:
        return False
    if other_nonlinearity(node, modules, batched) is not None:  # a secret product or division
        return False
    a = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    secret = [v in batched for v in (a, b)]
    return secret[0] != secret[1] if kind == "mul" else secret[0] and not secret[1]


_LINEAR_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_WEIGHTED_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear}
_MATMULS = {torch.matmul, operator.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm"}


def linear_layer(node: Node, modules: Mapping[str, nn.Module], batch: int) -> LinearCount | None:
    """The linear layer one FX node computes, as the inspector, ``pi_cost`` and the merge pricing see it.

    Args:
        node: a node whose inputs and output carry shapes (``tensor_meta``, from :func:`passes.trace`).
        modules: ``dict(gm.named_modules())`` of the node's graph module.
        batch: the batch size of those shapes (sizes are divided by it; weights stay whole).

    Returns:
        A :class:`LinearCount` for a conv or linear module (``nn.Conv1d/2d/3d``, ``nn.Linear``),
        ``F.conv*``/``F.linear`` and matmuls; None for any other node (BatchNorm is folded at
        export, adds and reshapes are free under secret sharing).

    Example:
        >>> modules = dict(gm.named_modules())
        >>> [linear_layer(n, modules, 1) for n in gm.graph.nodes if n.op == "call_module"]
    """
    if "tensor_meta" not in node.meta or not node.all_input_nodes:
        return None
    if node.op == "call_module" and isinstance(modules.get(str(node.target)), _LINEAR_MODULES):
        return module_layer(str(node.target), modules[str(node.target)], _numel(node.all_input_nodes[0]) // batch,
                            _numel(node) // batch)
    if node.op == "call_function" and node.target in _WEIGHTED_FUNCTIONS and len(node.all_input_nodes) > 1:
        shape = _shape(node.all_input_nodes[1])
        op, w, per_out = node.target.__name__, math.prod(shape), math.prod(shape) // shape[0]
    elif node.target in _MATMULS and node.op in ("call_function", "call_method") and len(node.all_input_nodes) > 1:
        a, b = (_shape(n) for n in node.all_input_nodes[:2])
        op, w, per_out = "matmul", math.prod(b) // (batch if b[:1] == (batch,) and len(b) > 2 else 1), a[-1]
    else:
        return None
    output = _numel(node) // batch
    return LinearCount(node.name, op, _numel(node.all_input_nodes[0]) // batch, w, output, output * per_out)


def module_layer(name: str, module: nn.Module, input: int, output: int) -> LinearCount:
    """The :class:`LinearCount` of a conv or linear module reading ``input`` and writing ``output`` elements per sample.

    Args:
        name: the layer's name in the report.
        module: an ``nn.Conv1d/2d/3d`` or ``nn.Linear`` (anything with a ``weight`` of out channels first).
        input: input elements per sample.
        output: output elements per sample.

    Returns:
        Its sizes; ``macs`` = outputs x weight elements per output channel (grouped convs included).

    Example:
        >>> module_layer("fc", nn.Linear(48, 10), 48, 10).macs
        480
    """
    weight = module.weight
    return LinearCount(name, type(module).__name__, input, weight.numel(), output, output * (weight.numel() // weight.shape[0]))


def _shape(node: Node) -> tuple[int, ...]:
    tm = node.meta.get("tensor_meta")
    return tuple(int(d) for d in tm.shape) if hasattr(tm, "shape") else ()


def _numel(node: Node) -> int:
    return math.prod(_shape(node)) if _shape(node) else 0


def relu_depth(gm: GraphModule) -> int:
    """Longest chain of ReLU sites along any path of the graph (MPC rounds grow with it)."""
    edges = ((src.name, node.name) for node in gm.graph.nodes for src in node.all_input_nodes)
    return _relu_depth((node.name for node in gm.graph.nodes), edges, {s.node for s in passes.get_meta(gm).sites})
