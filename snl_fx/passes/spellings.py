"""One declarative table of how ReLU (and its look-alikes) is spelled in an FX graph.

Everything that recognises a ReLU call site or another nonlinearity reads these tables;
nothing else in the project compares node targets against ``torch.relu`` and friends. A clamp
is a ReLU site when :func:`snl_fx.relu_rule.clamp_kind` says so (min 0, no max): the rule the
ONNX inspector applies to ``Clip`` and ``Max``.

The other nonlinearities are tables from a spelling (module type, function, ATen overload of the
``torch.export`` fallback, method name) to a kind: ``gelu`` (``gelu_tanh`` with
``approximate="tanh"``), ``silu``, ``sigmoid``, ``tanh``, ``softmax`` (log-softmax and softmin
too), ``layernorm``, ``rmsnorm``, ``exp``, ``div`` (by a secret divisor), ``mul`` (of two secret
factors), the pools, and the ReLU look-alikes (``relu6``, ``hardtanh``, ``clamp``, ...).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Container
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
    nn.Softmax2d: "softmax",
    nn.LogSoftmax: "softmax",
    nn.Softmin: "softmax",
    nn.LayerNorm: "layernorm",
    nn.RMSNorm: "rmsnorm",
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
    torch.special.expit: "sigmoid",
    torch.sigmoid_: "sigmoid",
    torch.tanh_: "tanh",
    F.softmax: "softmax",
    torch.softmax: "softmax",
    F.log_softmax: "softmax",
    torch.log_softmax: "softmax",
    F.softmin: "softmax",
    F.layer_norm: "layernorm",
    torch.layer_norm: "layernorm",
    F.rms_norm: "rmsnorm",
    torch.rms_norm: "rmsnorm",
    torch.exp: "exp",
    torch.exp_: "exp",
    # division and product: kinds only when the operands are secret (see _secret_operands)
    operator.truediv: "div",
    operator.itruediv: "div",
    torch.div: "div",
    torch.divide: "div",
    torch.true_divide: "div",
    torch.reciprocal: "div",  # 1 / x: its divisor is its input
    torch.reciprocal_: "div",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    torch.multiply: "mul",
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
    # the ATen forms the torch.export fallback writes
    torch.ops.aten.gelu.default: "gelu",
    torch.ops.aten.gelu_.default: "gelu",
    torch.ops.aten.silu.default: "silu",
    torch.ops.aten.silu_.default: "silu",
    torch.ops.aten.sigmoid.default: "sigmoid",
    torch.ops.aten.sigmoid_.default: "sigmoid",
    torch.ops.aten.special_expit.default: "sigmoid",
    torch.ops.aten.tanh.default: "tanh",
    torch.ops.aten.tanh_.default: "tanh",
    torch.ops.aten._softmax.default: "softmax",
    torch.ops.aten.softmax.int: "softmax",
    torch.ops.aten._log_softmax.default: "softmax",
    torch.ops.aten.log_softmax.int: "softmax",
    torch.ops.aten.native_layer_norm.default: "layernorm",
    torch.ops.aten.layer_norm.default: "layernorm",
    torch.ops.aten.rms_norm.default: "rmsnorm",
    torch.ops.aten.exp.default: "exp",
    torch.ops.aten.exp_.default: "exp",
    torch.ops.aten.div.Tensor: "div",
    torch.ops.aten.div.Tensor_mode: "div",
    torch.ops.aten.div_.Tensor: "div",
    torch.ops.aten.true_divide.Tensor: "div",
    torch.ops.aten.divide.Tensor: "div",
    torch.ops.aten.reciprocal.default: "div",
    torch.ops.aten.reciprocal_.default: "div",
    torch.ops.aten.multiply.Tensor: "mul",
    torch.ops.aten.mul.Tensor: "mul",
    torch.ops.aten.mul_.Tensor: "mul",
}
OTHER_METHODS: dict[str, str] = {
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "tanh": "tanh",
    "tanh_": "tanh",
    "softmax": "softmax",
    "log_softmax": "softmax",
    "exp": "exp",
    "exp_": "exp",
    "div": "div",
    "div_": "div",
    "divide": "div",
    "true_divide": "div",
    "reciprocal": "div",
    "reciprocal_": "div",
    "mul": "mul",
    "mul_": "mul",
    "multiply": "mul",
    "mean": "avgpool",  # only over spatial dims: see _is_spatial_mean
}
RECIPROCALS = frozenset({torch.reciprocal, torch.reciprocal_, torch.ops.aten.reciprocal.default,
                         torch.ops.aten.reciprocal_.default, "reciprocal", "reciprocal_"})
# kinds whose cost follows the length of the rows they normalise over (Nonlinearity.row)
ROW_KINDS = frozenset({"softmax", "layernorm", "rmsnorm"})


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


def other_nonlinearity(node: Node, modules: dict[str, nn.Module], secret: Container[Node] | None = None) -> str | None:
    """The kind of a non-ReLU nonlinearity at ``node`` (``"maxpool"``, ``"gelu"``, ...), else None.

    A clamp with min 0 and no max is a ReLU site (:func:`relu_op`), never one of these. GELU is
    ``"gelu"`` in its erf form and ``"gelu_tanh"`` with ``approximate="tanh"``. A division is
    ``"div"`` only when its divisor is a tensor in ``secret``, a product ``"mul"`` when one factor is
    and the other is too or is a weight of more than one element (the server's weights are secret;
    a scale by a Python number or a one-element weight is free); ``secret``
    is the set of values a batched input flows into (``find.batched_nodes``), and None takes
    every tensor in the graph for one.
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
    if kind == "mul":
        a, b = _operands(node)
        if not ((_is_secret_tensor(a, secret) and _is_secret_or_weight(b, secret))
                or (_is_secret_tensor(b, secret) and _is_secret_or_weight(a, secret))):
            kind = None
    elif kind == "div":
        a, b = _operands(node)
        if not _is_secret_tensor(a if node.target in RECIPROCALS else b, secret):
            kind = None
    if kind == "gelu" and _gelu_form(node, modules) == "tanh":
        kind = "gelu_tanh"
    if kind is None and _is_unfolded_batchnorm(node, modules):
        kind = "mul"  # an affine by the server's secret-shared weights: an element-wise secret product
    if kind is None and node.op != "call_module":
        kind = _clamp_bounds_kind(node)  # a clamp that is no ReLU ("clamp", "relu6"); a ReLU one is a site
        kind = None if kind == RELU else kind
    return kind


FOLDS_BATCHNORM: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _is_unfolded_batchnorm(node: Node, modules: dict[str, nn.Module]) -> bool:
    """A BatchNorm module that export cannot fold into the op before it: its input is not a conv or
    linear layer read by nothing else (pre-activation blocks: BatchNorm after an add). The ``pi``
    export profile writes it as Mul + Add by weights, which the ONNX inspector counts as ``mul``."""
    if node.op != "call_module" or not isinstance(modules.get(str(node.target)), nn.modules.batchnorm._BatchNorm):
        return False
    source = node.all_input_nodes[0] if node.all_input_nodes else None
    folds = (source is not None and source.op == "call_module" and len(source.users) == 1
             and isinstance(modules.get(str(source.target)), FOLDS_BATCHNORM))
    return not folds


def row_length(node: Node, modules: dict[str, nn.Module], kind: str, in_shape: tuple[int, ...]) -> int | None:
    """The length of the rows a softmax, LayerNorm or RMSNorm at ``node`` normalises over, else None.

    ``in_shape`` is the input's whole shape (batch dim included). Softmax: the size of its dim
    (from the call's ``dim`` or the module's, negative dims counted from the end, the legacy
    implicit dim as torch picks it). LayerNorm and RMSNorm: the product of ``normalized_shape``.
    """
    if kind not in ROW_KINDS or not in_shape:
        return None
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    if kind == "softmax":
        if isinstance(module, nn.Softmax2d):
            dim: Any = -3
        elif module is not None:
            dim = getattr(module, "dim", None)
        else:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dim is None:  # legacy implicit dim: F._get_softmax_dim
            dim = 0 if len(in_shape) in (0, 1, 3) else 1
        return int(in_shape[dim % len(in_shape)]) if isinstance(dim, int) else None
    if module is not None:
        normalized = getattr(module, "normalized_shape", None)
    else:
        normalized = node.kwargs.get("normalized_shape", node.args[1] if len(node.args) > 1 else None)
    if isinstance(normalized, int):
        return normalized
    if isinstance(normalized, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in normalized):
        return math.prod(normalized)
    return None


def _operands(node: Node) -> tuple[Any, Any]:
    """The two operands of a product or division call (``a * b``, ``torch.div(a, b)``, ``a.mul(b)``, ATen)."""
    a = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    return a, b


def _is_secret_tensor(value: Any, secret: Container[Node] | None) -> bool:
    """Whether ``value`` is a graph value holding a tensor (not a Python number) that is in ``secret``."""
    if not isinstance(value, Node) or not hasattr(value.meta.get("tensor_meta"), "shape"):
        return False
    return secret is None or value in secret


def _is_secret_or_weight(value: Any, secret: Container[Node] | None) -> bool:
    """A per-sample value, or a weight tensor of more than one element: the server's weights are
    secret-shared, so a product with one (a layer scale, an unfolded BatchNorm) is a secret product,
    as the ONNX inspector counts a Mul by an initializer. A one-element weight is a scale: free."""
    if _is_secret_tensor(value, secret):
        return True
    shape = getattr(value.meta.get("tensor_meta"), "shape", None) if isinstance(value, Node) else None
    return shape is not None and math.prod(shape) > 1


def _gelu_form(node: Node, modules: dict[str, nn.Module]) -> str:
    """``"none"`` (erf) or ``"tanh"``: the ``approximate`` of an nn.GELU, F.gelu or aten.gelu call."""
    if node.op == "call_module":
        return str(getattr(modules.get(str(node.target)), "approximate", "none"))
    return str(node.kwargs.get("approximate", "none"))  # keyword-only in F.gelu and aten.gelu


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
