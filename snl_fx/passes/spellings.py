"""One declarative table of how ReLU (and its look-alikes) is spelled in an FX graph.

Everything that recognises a ReLU call site or another nonlinearity reads these tables;
nothing else in the project compares node targets against ``torch.relu`` and friends. A clamp
is a ReLU site when :func:`snl_fx.relu_rule.clamp_kind` says so (min 0, no max): the rule the
ONNX inspector applies to ``Clip`` and ``Max``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from ..relu_rule import RELU, clamp_kind

# --- exactly ReLU: these call sites are gated ----------------------------------------------
RELU_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU,)
RELU_FUNCTIONS: dict[Any, str] = {
    F.relu: "F.relu",
    torch.relu: "torch.relu",
    torch.relu_: "torch.relu_",  # F.relu_ is this very function
    torch.ops.aten.relu.default: "aten.relu",
    torch.ops.aten.relu_.default: "aten.relu_",
}
RELU_METHODS: dict[str, str] = {"relu": "Tensor.relu", "relu_": "Tensor.relu_"}
# clamps: a ReLU call site when their bounds make them one (relu_rule.clamp_kind), spelled e.g.
# "torch.clamp(min=0)"; otherwise another nonlinearity ("clamp", "relu6"). clamp_min takes no max.
CLAMP_FUNCTIONS: dict[Any, str] = {
    torch.clamp: "torch.clamp",
    torch.clip: "torch.clip",
    torch.clamp_: "torch.clamp_",
    torch.clip_: "torch.clip_",
    torch.clamp_min: "torch.clamp_min",
    torch.clamp_min_: "torch.clamp_min_",
    torch.ops.aten.clamp.default: "aten.clamp",
    torch.ops.aten.clamp_.default: "aten.clamp_",
    torch.ops.aten.clamp_min.default: "aten.clamp_min",
    torch.ops.aten.clamp_min_.default: "aten.clamp_min_",
}
CLAMP_METHODS: dict[str, str] = {
    m: f"Tensor.{m}" for m in ("clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_")
}
INPLACE_RELU_OPS = frozenset(
    {"torch.relu_", "aten.relu_", "Tensor.relu_"}
    | {f"{s}(min=0)" for s in (*CLAMP_FUNCTIONS.values(), *CLAMP_METHODS.values()) if s.endswith("_")}
)

# --- other nonlinearities: counted apart, never gated ---------------------------------------
OTHER_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU6: "relu6",
    nn.Hardtanh: "hardtanh",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu",
    nn.ELU: "elu",
    nn.SELU: "selu",
    nn.CELU: "celu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Mish: "mish",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Softmax: "softmax",
    nn.MaxPool1d: "maxpool",
    nn.MaxPool2d: "maxpool",
    nn.MaxPool3d: "maxpool",
    nn.AdaptiveMaxPool1d: "maxpool",
    nn.AdaptiveMaxPool2d: "maxpool",
    nn.AdaptiveMaxPool3d: "maxpool",
    # average pools are linear, but fixed-point backends truncate after dividing: priced per output
    nn.AvgPool1d: "avgpool",
    nn.AvgPool2d: "avgpool",
    nn.AvgPool3d: "avgpool",
    nn.AdaptiveAvgPool1d: "avgpool",
    nn.AdaptiveAvgPool2d: "avgpool",
    nn.AdaptiveAvgPool3d: "avgpool",
}
OTHER_FUNCTIONS: dict[Any, str] = {
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    F.hardtanh_: "hardtanh",
    F.leaky_relu: "leaky_relu",
    F.prelu: "prelu",
    F.elu: "elu",
    F.selu: "selu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.mish: "mish",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.softmax: "softmax",
    torch.softmax: "softmax",
    F.max_pool1d: "maxpool",
    F.max_pool2d: "maxpool",
    F.max_pool3d: "maxpool",
    torch.max_pool1d: "maxpool",
    torch.max_pool2d: "maxpool",
    torch.max_pool3d: "maxpool",
    F.adaptive_max_pool1d: "maxpool",
    F.adaptive_max_pool2d: "maxpool",
    F.adaptive_max_pool3d: "maxpool",
    F.avg_pool1d: "avgpool",
    F.avg_pool2d: "avgpool",
    F.avg_pool3d: "avgpool",
    torch.avg_pool1d: "avgpool",
    F.adaptive_avg_pool1d: "avgpool",
    F.adaptive_avg_pool2d: "avgpool",
    F.adaptive_avg_pool3d: "avgpool",
    torch.adaptive_avg_pool1d: "avgpool",
    torch.mean: "avgpool",  # only over spatial dims: see _is_spatial_mean
    torch.maximum: "max",
    torch.max: "max",
}
OTHER_METHODS: dict[str, str] = {
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "tanh": "tanh",
    "tanh_": "tanh",
    "softmax": "softmax",
    "mean": "avgpool",  # only over spatial dims: see _is_spatial_mean
}


def relu_op(node: Node, modules: dict[str, nn.Module]) -> str | None:
    """The ReLU spelling of ``node`` (e.g. ``"nn.ReLU"``, ``"F.relu"``), or None if it is no ReLU."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return "nn.ReLU" if isinstance(module, RELU_MODULES) else None
    if node.op == "call_function":
        op = RELU_FUNCTIONS.get(node.target) if _hashable(node.target) else None
    elif node.op == "call_method":
        op = RELU_METHODS.get(str(node.target))
    else:
        return None
    if op is None and _clamp_bounds_kind(node) == RELU:
        op = f"{_clamp_spelling(node)}(min=0)"
    return op


def is_inplace(node: Node, op: str, modules: dict[str, nn.Module]) -> bool:
    """Whether the ReLU call at ``node`` overwrites its input."""
    if op in INPLACE_RELU_OPS:
        return True
    if op == "nn.ReLU":
        return bool(getattr(modules[str(node.target)], "inplace", False))
    if op == "F.relu":
        flag = node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False)
        return bool(flag)
    return False


def other_nonlinearity(node: Node, modules: dict[str, nn.Module]) -> str | None:
    """The kind of a non-ReLU nonlinearity at ``node`` (``"maxpool"``, ``"gelu"``, ...), else None.

    A clamp with min 0 and no max is a ReLU site (:func:`relu_op`), never one of these.
    """
    kind: str | None = None
    if node.op == "call_module":
        module = modules.get(str(node.target))
        kind = next((k for t, k in OTHER_MODULES.items() if type(module) is t), None)
        if kind is None and module is not None and not isinstance(module, RELU_MODULES):
            kind = next((k for t, k in OTHER_MODULES.items() if isinstance(module, t)), None)
    elif node.op == "call_function" and _hashable(node.target):
        kind = OTHER_FUNCTIONS.get(node.target)
        if kind == "max" and not _is_elementwise_max(node):
            kind = None
    elif node.op == "call_method":
        kind = OTHER_METHODS.get(str(node.target))
    if kind == "avgpool" and node.op != "call_module" and node.target in (torch.mean, "mean") and not _is_spatial_mean(node):
        kind = None
    if kind is None and node.op != "call_module":
        kind = _clamp_bounds_kind(node)  # a clamp that is no ReLU ("clamp", "relu6"); a ReLU one is a site
        kind = None if kind == RELU else kind
    return kind


def maxpool_window(node: Node, modules: dict[str, nn.Module], in_shape, out_shape) -> int:
    """Elements in one pooling window of a max-pool node (comparisons per output = window - 1).

    Read from ``kernel_size`` when given; for adaptive pooling, from the input/output sizes.
    """
    if node.op == "call_module":
        size = getattr(modules.get(str(node.target)), "kernel_size", None)
    else:
        size = node.kwargs.get("kernel_size", node.args[1] if len(node.args) > 1 else None)
    spatial_dims = max(len(out_shape) - 1, 1)  # sample shapes: (C, *spatial)
    if isinstance(size, int):
        return size**spatial_dims
    if isinstance(size, (tuple, list)) and all(isinstance(s, int) for s in size):
        return math.prod(size)
    # adaptive pooling: windows of ceil(in / out) along each spatial dim
    pairs = zip(in_shape[-spatial_dims:], out_shape[-spatial_dims:])
    return math.prod(-(-i // max(o, 1)) for i, o in pairs)


def _is_spatial_mean(node: Node) -> bool:
    """``x.mean(dims)`` / ``torch.mean(x, dims)`` over spatial dims only (dims >= 2 of an N, C, ... tensor)."""
    tm = node.all_input_nodes[0].meta.get("tensor_meta") if node.all_input_nodes else None
    rank = len(tm.shape) if hasattr(tm, "shape") else 0
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if rank < 3 or dims is None:
        return False
    dims = [dims] if isinstance(dims, int) else list(dims)
    return bool(dims) and all(isinstance(d, int) and d % rank >= 2 for d in dims)


def _clamp_spelling(node: Node) -> str | None:
    """``"torch.clamp"``, ``"Tensor.clamp_min_"``, ... for a clamp call, else None."""
    if node.op == "call_function":
        return CLAMP_FUNCTIONS.get(node.target) if _hashable(node.target) else None
    if node.op == "call_method":
        return CLAMP_METHODS.get(str(node.target))
    return None


def _clamp_bounds_kind(node: Node) -> str | None:
    """:func:`relu_rule.clamp_kind` of a clamp call's bounds (a graph value is a run-time bound), else None."""
    spelling = _clamp_spelling(node)
    if spelling is None:
        return None
    args = list(node.args[1:])
    lo = node.kwargs.get("min", args[0] if args else None)
    if "clamp_min" in spelling:
        hi = None
    else:
        hi = node.kwargs.get("max", args[1] if len(args) > 1 else None)
    tm = node.all_input_nodes[0].meta.get("tensor_meta") if node.all_input_nodes else None
    dtype = getattr(tm, "dtype", None)
    return clamp_kind(lo, hi, floating=dtype is None or dtype.is_floating_point)


def _is_elementwise_max(node: Node) -> bool:
    """torch.max(a, b) / torch.maximum(a, b) compare elementwise; torch.max(a, dim) reduces."""
    if node.target is torch.maximum:
        return True
    return len(node.args) > 1 and isinstance(node.args[1], Node)


def _hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True
