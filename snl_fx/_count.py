"""``relu_count``: the inspector for torch modules and ONNX files."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import networkx as nx
import torch.nn as nn
from torch.fx import GraphModule

import passes

from ._errors import SnlFxError
from ._report import OtherCount, ReluReport, SiteCount


def relu_count(
    model_or_onnx_path: nn.Module | str | os.PathLike,
    example_input: Any = None,
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
) -> ReluReport:
    """Count ReLUs per sample, site by site, in a torch module or an ONNX file.

    A module needs ``example_input`` (batch first; any batch size gives the same per-sample
    counts). An ONNX file needs ``input_shapes`` only when its inputs have dynamic dims beyond
    the batch dim.
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
    return ReluReport(source, sites, relu_depth(gm), others, ungateable, notes)


def relu_depth(gm: GraphModule) -> int:
    """Longest chain of ReLU sites along any path of the graph (MPC rounds grow with it)."""
    meta = passes.get_meta(gm)
    relu_nodes = {s.node for s in meta.sites}
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node.name)
        graph.add_edges_from((src.name, node.name) for src in node.all_input_nodes)
    depth: dict[str, int] = {}
    for name in nx.topological_sort(graph):
        below = max((depth[p] for p in graph.predecessors(name)), default=0)
        depth[name] = below + (name in relu_nodes)
    return max(depth.values(), default=0)
