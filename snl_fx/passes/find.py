"""Find every ReLU call site (and every other nonlinearity) in a traced graph."""

from __future__ import annotations

import math
import re

from torch.fx import GraphModule, Node

from .errors import PassError
from .meta import Nonlinearity, Site, Ungateable, get_meta
from .spellings import is_inplace, maxpool_window, other_nonlinearity, relu_op


def find_relus(gm: GraphModule) -> GraphModule:
    """Record every ReLU site, other nonlinearity and opaque ReLU-computing leaf in ``gm.meta``.

    Needs shapes from :func:`passes.trace`. Site names are stable and hierarchical: the module
    path of the call (``layer1.0.relu``), with ``_1``, ``_2``... for later calls of the same name.
    """
    meta = get_meta(gm)
    modules = dict(gm.named_modules())
    meta.sites, meta.others, meta.ungateable = [], [], []
    taken: dict[str, int] = {}
    for node in gm.graph.nodes:
        op = relu_op(node, modules)
        if op is not None:
            source = node.all_input_nodes[0] if node.all_input_nodes else None
            if source is None:
                raise PassError(f"ReLU call without a tensor input: {node.format_node()}")
            name = _unique(_scope_name(node, "relu"), taken)
            meta.sites.append(Site(name, node.name, op, _sample_shape(source, gm), is_inplace(node, op, modules)))
            continue
        kind = other_nonlinearity(node, modules)
        if kind is not None and "tensor_meta" in node.meta:
            out_shape = _sample_shape(node, gm)
            per_output = 1
            if kind == "maxpool":
                in_shape = _sample_shape(node.all_input_nodes[0], gm)
                per_output = maxpool_window(node, modules, in_shape, out_shape) - 1
            name = _unique(_scope_name(node, kind.split("(")[0]), taken)
            meta.others.append(Nonlinearity(name, kind, out_shape, math.prod(out_shape) * per_output))
        if node.op == "call_module" and "hidden_relus" in node.meta:
            module = modules[str(node.target)]
            meta.ungateable.append(Ungateable(str(node.target), type(module).__name__, node.meta["hidden_relus"]))
    return gm


def _sample_shape(node: Node, gm: GraphModule) -> tuple[int, ...]:
    """Shape of ``node``'s tensor value without the batch dim."""
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        raise PassError(f"no tensor shape recorded for {node.format_node()} (run passes.trace first)")
    shape = tuple(int(d) for d in tm.shape)
    if not shape:
        raise PassError(f"ReLU on a scalar has no batch dim: {node.format_node()}")
    batch = get_meta(gm).batch_size
    if shape[0] != batch:
        raise PassError(
            f"{node.format_node()} has leading dim {shape[0]}, not the batch size {batch}: "
            "snl_fx needs ReLU inputs whose dim 0 is the batch"
        )
    return shape[1:]


def _scope_name(node: Node, base: str) -> str:
    """Hierarchical name of a call: the module path for module calls, else scope + base name."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    scope = ""
    if stack:
        value = list(stack.values())[-1]
        scope = value[0] if isinstance(value, tuple) else str(value)
        scope = re.sub(r"@\d+$", "", scope)
    scope = re.sub(r"^L__self___|^L\['self'\]\.", "", scope)
    return f"{scope}.{base}" if scope else base


def _unique(name: str, taken: dict[str, int]) -> str:
    count = taken.get(name, 0)
    taken[name] = count + 1
    return name if count == 0 else f"{name}_{count}"
