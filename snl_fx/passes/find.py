"""Find every ReLU call site (and every other nonlinearity) in a traced graph."""

from __future__ import annotations

import math
import operator
import re

import torch
from torch.fx import GraphModule, Node

from .errors import PassError
from .meta import Nonlinearity, Site, Ungateable, get_meta
from .spellings import is_inplace, maxpool_window, other_nonlinearity, relu_op, row_length
from .trace import batched_inputs


def find_relus(gm: GraphModule) -> GraphModule:
    """Record every ReLU site, other nonlinearity and opaque ReLU-computing leaf in ``gm.meta``.

    Needs shapes from :func:`passes.trace`. Site names are stable and hierarchical: the module
    path of the call (``layer1.0.relu``), with ``_1``, ``_2``... for later calls of the same name.
    A nonlinearity that no batched input flows into (a ReLU on a weight or a constant,
    :func:`batched_nodes`) is not per sample: it goes to ``meta.constant``, never to the sites.
    The other nonlinearities (``meta.others``, kinds from :mod:`.spellings`) count the elements
    of their output per sample (max-pool: its comparisons), and softmax, LayerNorm and RMSNorm
    carry their row length. A division counts only when its divisor is batched, a product only
    when both factors are: by a Python number or a weight they are free under secret sharing.
    """
    meta = get_meta(gm)
    modules = dict(gm.named_modules())
    meta.sites, meta.others, meta.ungateable, meta.constant = [], [], [], []
    batched = batched_nodes(gm)
    taken: dict[str, int] = {}
    for node in gm.graph.nodes:
        op = relu_op(node, modules)
        if op is not None:
            source = node.all_input_nodes[0] if node.all_input_nodes else None
            if source is None:
                raise PassError(f"ReLU call without a tensor input: {node.format_node()}")
            name = _unique(_scope_name(node, "relu"), taken)
            if source not in batched:
                shape = _whole_shape(source)
                meta.constant.append(Nonlinearity(name, "relu", shape, math.prod(shape)))
                continue
            meta.sites.append(Site(name, node.name, op, _sample_shape(source, gm), is_inplace(node, op, modules)))
            continue
        kind = other_nonlinearity(node, modules, batched)
        if kind is not None and _has_tensor(node):
            source = node.all_input_nodes[0] if node.all_input_nodes else node
            row = row_length(node, modules, kind, _whole_shape(source))
            name = _unique(_scope_name(node, kind.split("(")[0]), taken)
            if node not in batched:
                shape = _whole_shape(node)
                meta.constant.append(Nonlinearity(name, kind, shape, math.prod(shape), row))
            else:
                out_shape = _sample_shape(node, gm)
                per_output = 1
                if kind == "maxpool":
                    in_shape = _sample_shape(source, gm)
                    per_output = maxpool_window(node, modules, in_shape, out_shape) - 1
                meta.others.append(Nonlinearity(name, kind, out_shape, math.prod(out_shape) * per_output, row, node.name))
        if node.op == "call_module" and "hidden_relus" in node.meta:
            module = modules[str(node.target)]
            meta.ungateable.append(Ungateable(str(node.target), type(module).__name__, node.meta["hidden_relus"]))
    return gm


def batched_nodes(gm: GraphModule) -> set[Node]:
    """The nodes a batched input flows into: the values that are per sample.

    The batched inputs are the placeholders that :func:`passes.trace.batched_inputs` picks
    (from their recorded shapes). A node is batched when any of its inputs is; a node that
    writes into one of its inputs in place (``x[:, 0] = h``, ``w.add_(h)``, ``copy_``) makes
    that input, and the tensors it is a view of, batched too, until nothing changes.
    Everything else (weights, constants, values computed from them alone) is the same for every
    sample: computed once per inference, never gated, never counted per sample.
    """
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder" and hasattr(n.meta.get("tensor_meta"), "shape")]
    if not placeholders:
        return set()
    _, flags = batched_inputs([tuple(n.meta["tensor_meta"].shape) for n in placeholders])
    batched = {n for n, flag in zip(placeholders, flags) if flag}
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if node.op in ("placeholder", "get_attr") or node in batched:
                continue
            if any(i in batched for i in node.all_input_nodes):
                batched.add(node)
                changed = True
        for node in nodes:
            if node in batched and _writes_first_input(node) and node.all_input_nodes:
                target: Node | None = node.all_input_nodes[0]
                while target is not None and target not in batched:
                    batched.add(target)
                    changed = True
                    target = target.all_input_nodes[0] if _is_view(target) and target.all_input_nodes else None
    return batched


_VIEWS = frozenset({
    "getitem", "view", "view_as", "reshape", "reshape_as", "narrow", "select", "slice", "permute", "transpose",
    "t", "expand", "expand_as", "squeeze", "unsqueeze", "flatten", "unflatten", "as_strided", "chunk", "split",
    "unbind", "movedim", "swapaxes", "diagonal", "detach", "contiguous", "real", "imag", "alias",
})


_WRITES = frozenset({operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                     operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor})

_WRITE_METHODS = frozenset({"__setitem__"} | {f"__{w.__name__}__" for w in _WRITES if w is not operator.setitem})


def _op_name(node: Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def _writes_first_input(node: Node) -> bool:
    """Whether ``node`` writes into its first input (setitem, ``add_``, ``copy_``, a mutable ATen op)."""
    if node.op == "call_function" and any(node.target is w for w in _WRITES):
        return True
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    if node.op not in ("call_function", "call_method"):
        return False
    name = _op_name(node)
    return name in _WRITE_METHODS or (name.endswith("_") and not name.startswith("_"))


def _is_view(node: Node) -> bool:
    return node.op in ("call_function", "call_method") and _op_name(node).rstrip("_") in _VIEWS


def _tensor_meta(node: Node):
    """The TensorMetadata of ``node``'s value; of its first output for a tuple (aten.native_layer_norm)."""
    tm = node.meta.get("tensor_meta")
    while not hasattr(tm, "shape") and isinstance(tm, (tuple, list)) and tm:  # TensorMetadata is a tuple too
        tm = tm[0]
    return tm if hasattr(tm, "shape") else None


def _has_tensor(node: Node) -> bool:
    return _tensor_meta(node) is not None


def _whole_shape(node: Node) -> tuple[int, ...]:
    tm = _tensor_meta(node)
    return tuple(int(d) for d in tm.shape) if tm is not None else ()


def _sample_shape(node: Node, gm: GraphModule) -> tuple[int, ...]:
    """Shape of ``node``'s tensor value without the batch dim."""
    tm = _tensor_meta(node)
    if tm is None:
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
