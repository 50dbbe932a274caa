"""``relu_count``: the inspector for torch modules and ONNX files."""

from __future__ import annotations

import math
import operator
import os
from dataclasses import asdict
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

import passes

from ._errors import SnlFxError
from ._report import LinearCount, OtherCount, ReluReport, SiteCount
from ._report import relu_depth as _relu_depth


def relu_count(
    model_or_onnx_path: nn.Module | str | os.PathLike,
    example_input: Any = None,
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
) -> ReluReport:
    """Count ReLUs per sample, site by site, in a torch module or an ONNX file.

    Args:
        model_or_onnx_path: an nn.Module (not gated: lower it with :func:`convert` first), or
            the path of an ONNX file (Relu, Clip(min=0) and Max(x, 0) count as ReLUs).
        example_input: for a module: an example batch (batch first; any batch size gives the
            same per-sample counts), or a tuple of the forward's inputs.
        input_shapes: for an ONNX file whose inputs have dynamic dims beyond the batch dim.

    Returns:
        A :class:`ReluReport`: ``sites`` (name, op, shape, ReLUs), ``total`` per sample,
        ``relu_layers``, ``relu_depth``, other nonlinearities (``others``), ReLUs not gateable,
        linear layers; ``.table()`` for people, ``.to_dict()`` for machines. Raises SnlFxError
        on bad input.

    Example:
        >>> report = snl_fx.relu_count(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
        >>> report.total, report.relu_depth
        (2308096, 17)
    """
    if isinstance(model_or_onnx_path, (str, os.PathLike)):
        from ._onnx_count import onnx_relu_report

        return onnx_relu_report(model_or_onnx_path, input_shapes)
    if not isinstance(model_or_onnx_path, nn.Module):
        raise SnlFxError(f"expected an nn.Module or an ONNX path, got {type(model_or_onnx_path).__name__}")
    if example_input is None:
        raise SnlFxError("counting a torch module needs an example input (e.g. torch.randn(1, 3, 32, 32))")
    if any(isinstance(m, passes.Gate) for m in model_or_onnx_path.modules()):
        raise SnlFxError(
            "this model still has trainable SNL gates: count them with snl_fx.relu_count_gated(model), "
            "or lower it first with snl_fx.convert(model)"
        )
    gm = passes.find_relus(passes.trace(model_or_onnx_path, example_input, share_weights=True))
    return report_from_graph(gm, source=type(model_or_onnx_path).__name__)


def report_from_graph(gm: GraphModule, source: str) -> ReluReport:
    """Build the report of a graph that :func:`passes.find_relus` has run on."""
    meta = passes.get_meta(gm)
    sites = [SiteCount(s.name, s.op, s.shape, s.numel) for s in meta.sites]
    others = [OtherCount(o.name, o.kind, o.shape, o.comparisons) for o in meta.others]
    ungateable = [asdict(u) for u in meta.ungateable]
    notes = []
    if meta.ungateable:
        notes.append("ReLUs inside leaf modules are listed under 'not gateable' and not in the total")
    batch = meta.batch_size
    results = [n for out in gm.graph.nodes if out.op == "output" for n in out.all_input_nodes]
    outputs = sum(_numel(n) for n in results) // batch
    return ReluReport(source, sites, relu_depth(gm), others, ungateable, notes, _linear_layers(gm, batch), outputs)


_LINEAR_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_WEIGHTED_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear}
_MATMULS = {torch.matmul, operator.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm"}


def _linear_layers(gm: GraphModule, batch: int) -> list[LinearCount]:
    """Convolutions, linear layers and matmuls, with per-sample sizes (weights whole)."""
    modules = dict(gm.named_modules())
    out = []
    for node in gm.graph.nodes:
        if "tensor_meta" not in node.meta or not node.all_input_nodes:
            continue
        if node.op == "call_module" and isinstance(modules[str(node.target)], _LINEAR_MODULES):
            weight = modules[str(node.target)].weight
            op, w, per_out = type(modules[str(node.target)]).__name__, weight.numel(), weight.numel() // weight.shape[0]
        elif node.op == "call_function" and node.target in _WEIGHTED_FUNCTIONS and len(node.all_input_nodes) > 1:
            shape = _shape(node.all_input_nodes[1])
            op, w, per_out = node.target.__name__, math.prod(shape), math.prod(shape) // shape[0]
        elif node.target in _MATMULS and node.op in ("call_function", "call_method") and len(node.all_input_nodes) > 1:
            a, b = (_shape(n) for n in node.all_input_nodes[:2])
            op, w, per_out = "matmul", math.prod(b) // (batch if b[:1] == (batch,) and len(b) > 2 else 1), a[-1]
        else:
            continue
        output = _numel(node) // batch
        name = str(node.target) if node.op == "call_module" else node.name
        out.append(LinearCount(name, op, _numel(node.all_input_nodes[0]) // batch, w, output, output * per_out))
    return out


def _shape(node: Node) -> tuple[int, ...]:
    tm = node.meta.get("tensor_meta")
    return tuple(int(d) for d in tm.shape) if hasattr(tm, "shape") else ()


def _numel(node: Node) -> int:
    return math.prod(_shape(node)) if _shape(node) else 0


def relu_depth(gm: GraphModule) -> int:
    """Longest chain of ReLU sites along any path of the graph (MPC rounds grow with it)."""
    edges = ((src.name, node.name) for node in gm.graph.nodes for src in node.all_input_nodes)
    return _relu_depth((node.name for node in gm.graph.nodes), edges, {s.node for s in passes.get_meta(gm).sites})
