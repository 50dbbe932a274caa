"""One party of a 2-party SecretFlow SPU inference of an ONNX file; runs inside .venv-spu, not snl_fx's venv.

``python _spu_runner.py --rank R --model FILE --protocol CHEETAH|SEMI2K --ports P0,P1 --runs N --out RESULT.json
[--input X.npy --output Y.npy]``. Rank 0 is the server: the file's float initializers (the weights)
are its private input, secret-shared once over the link. Rank 1 is the client: it knows the
architecture only (it zeroes the weights it read), shares its input each inference and alone
receives the output. The two parties talk over SPU's brpc link on loopback.

The graph is translated op by op to jax.numpy / jax.lax and compiled to SPU executables, one per
*segment*: each Relu and each MaxPool node is a segment of its own, the other (linear and local)
nodes between them form one segment. Values crossing segments stay secret-shared in SPU's
runtime. SPU's profiler logs, per executable run, the bytes and actions this party sent and
received and the time of every pphlo op; this script reads its own log back, so the traffic
inside ReLU ops is measured, not estimated. Integer constants (indices, shapes) are public and
folded into the program. This file imports neither snl_fx nor torch.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pickle
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

SUPPORTED = (
    "Add AveragePool BatchNormalization Cast Concat Constant ConstantOfShape Conv Div Equal Erf Exp Expand Flatten "
    "Gather Gelu Gemm GlobalAveragePool Greater Identity LayerNormalization Less LogSoftmax MatMul MaxPool Mod Mul "
    "Neg Pow Reciprocal ReduceMean ReduceSum Relu Reshape ScatterElements Shape Sigmoid Slice Softmax Sqrt Squeeze Sub Tanh "
    "Transpose Unsqueeze Where"
).split()
# op -> kind: each such node (with a secret input) is a segment of its own, so its link statistics are measured.
# Erf inside x * 0.5 * (1 + erf(x / sqrt 2)) (torch's GELU at opset < 20) is one "gelu" segment with the
# Div/Add/Mul around it; an Erf elsewhere is "erf". Div is "div" only where the divisor is secret.
NONLINEAR = {
    "Relu": "relu", "MaxPool": "maxpool", "Gelu": "gelu", "Erf": "erf", "Softmax": "softmax",
    "LogSoftmax": "softmax", "LayerNormalization": "layernorm", "Sigmoid": "sigmoid", "Tanh": "tanh",
    "Exp": "exp", "Div": "div", "Reciprocal": "div", "Sqrt": "sqrt", "Pow": "pow",
}


class RunnerError(Exception):
    """A problem with the file or the run, reported to the parent as one line."""


# ---------------------------------------------------------------- the ONNX graph as a plan

class Plan:
    """The graph split into public constants, the server's weights and secret segments of nodes."""

    def __init__(self, model: Any, rank: int) -> None:
        import onnx
        from onnx import numpy_helper

        graph = model.graph
        unknown = sorted({n.op_type for n in graph.node} - set(SUPPORTED))
        if unknown:
            raise RunnerError(f"the SPU backend does not support ONNX op {', '.join(unknown)}")
        self.static: dict[str, np.ndarray] = {}
        self.weights: dict[str, np.ndarray] = {}
        for init in graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.dtype.kind == "f":  # the server's weights; the client knows their shapes only
                self.weights[init.name] = arr.astype(np.float32) if rank == 0 else np.zeros(arr.shape, np.float32)
            else:
                self.static[init.name] = arr
        inputs = [i for i in graph.input if i.name not in self.static and i.name not in self.weights]
        if len(inputs) != 1:
            raise RunnerError(f"pi-bench runs models with one input; this file has {len(inputs)}")
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in graph.output]
        self.nodes = list(graph.node)  # kept: attrs are keyed by these objects' ids
        self.attrs = {id(n): {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in self.nodes}
        self._prepare_weights()

    def _prepare_weights(self) -> None:
        """Server-side plaintext work on its own weights: BN as scale and shift, Gemm's B pre-transposed."""
        for node in self.nodes:
            a = self.attrs[id(node)]
            if node.op_type == "BatchNormalization" and all(i in self.weights for i in node.input[1:5]):
                scale, bias, mean, var = (self.weights[i] for i in node.input[1:5])
                mul = scale / np.sqrt(var + a.get("epsilon", 1e-5))
                self.weights[node.output[0] + "#bn_mul"] = mul.astype(np.float32)
                self.weights[node.output[0] + "#bn_add"] = (bias - mean * mul).astype(np.float32)
            if node.op_type == "Gemm" and a.get("transB", 0) and node.input[1] in self.weights:
                self.weights[node.output[0] + "#gemm_bt"] = np.ascontiguousarray(self.weights[node.input[1]].T)
        used = {i for n in self.nodes for k, i in enumerate(n.input) if not _replaced(n, k, self.weights)}
        self.weights = {k: v for k, v in self.weights.items() if "#" in k or k in used}

    def evaluate_static(self, input_shape: tuple[int, ...]) -> None:
        """Fold every node whose inputs are public (constants, shapes); trace the shapes of the rest."""
        import jax

        shapes = {self.input_name: input_shape, **{k: v.shape for k, v in self.weights.items()}}
        self.secret_nodes = []
        for node in self.nodes:
            a = self.attrs[id(node)]
            for k, i in enumerate(node.input):
                if i and i not in self.static and i not in shapes and not _replaced(node, k, self.weights):
                    raise RunnerError(f"{node.op_type} node {node.name!r} reads {i!r}, which no earlier node writes")
            if node.op_type == "Shape":
                src = node.input[0]
                shape = tuple(self.static[src].shape) if src in self.static else tuple(shapes[src])
                self.static[node.output[0]] = np.array(shape[a.get("start", 0): a.get("end", len(shape))], np.int64)
            elif all(i == "" or i in self.static for i in node.input):
                values = _apply(node, a, self.static)
                self.static.update(zip(node.output, [np.asarray(v) for v in values]))
            else:
                self.secret_nodes.append(node)
                reads = [i for i in node.input if i in shapes] + [w for w in shapes if w.startswith(node.output[0] + "#")]

                def one(*xs: Any, node: Any = node, reads: list[str] = reads) -> list[Any]:
                    return _apply(node, self.attrs[id(node)], {**self.static, **dict(zip(reads, xs))})

                result = jax.eval_shape(one, *[jax.ShapeDtypeStruct(shapes[r], np.float32) for r in reads])
                shapes.update({o: tuple(r.shape) for o, r in zip(node.output, result)})
        self.shapes = shapes

    def kind(self, node: Any) -> str:
        """The segment kind of a secret node: a NONLINEAR kind, or 'linear' (local ops and products)."""
        kind = NONLINEAR.get(node.op_type, "linear")
        if node.op_type == "Gelu" and self.attrs[id(node)].get("approximate", b"none") in (b"tanh", "tanh"):
            return "gelu_tanh"
        if node.op_type == "Div" and node.input[1] in self.static:
            return "linear"  # division by a public constant: a local truncation
        if node.op_type == "Pow" and node.input[1] in self.static:
            e = np.asarray(self.static[node.input[1]], np.float64).reshape(-1)
            if e.size == 1 and e[0] == int(e[0]) and 0 <= e[0] <= 8:
                return "linear"  # a small integer power: secret products, as x * x
        return kind

    def _gelu_groups(self) -> dict[int, tuple[str, list[Any]]]:
        """id(node) -> (kind, the nodes of its GELU pattern), as torch exports GELU below opset 20.

        erf form, "gelu": [x / sqrt 2] -> Erf -> + 1 -> * x -> * 0.5. tanh form, "gelu_tanh":
        x*x*x, * 0.044715, + x, * sqrt(2/pi) -> Tanh -> + 1 -> * x -> * 0.5. The element-wise
        arithmetic around the Erf / Tanh that only it reads joins it; the pattern's input x must be
        its one secret input and be multiplied back in.
        """
        secret = {id(n) for n in self.secret_nodes}
        producer = {o: n for n in self.secret_nodes for o in n.output}
        consumers: dict[str, list[Any]] = {}
        for n in self.secret_nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        outputs = set(self.output_names)
        arith = ("Add", "Sub", "Mul", "Div", "Pow")

        def only_consumer(name: str) -> Any:
            users = consumers.get(name, [])
            return users[0] if len(users) == 1 and name not in outputs else None

        groups: dict[int, tuple[str, list[Any]]] = {}
        for core in self.secret_nodes:
            if core.op_type not in ("Erf", "Tanh") or id(core) in groups:
                continue
            group = [core]
            changed = True
            while changed:  # backward: arithmetic whose outputs only the group reads
                changed = False
                for n in list(group):
                    for i in n.input:
                        p = producer.get(i)
                        if p is None or p in group or p.op_type not in arith or p.output[0] in outputs:
                            continue
                        if all(any(u is g for g in group) for u in consumers.get(p.output[0], [])):
                            group.insert(0, p)
                            changed = True
            ins = {i for n in group for i in n.input if i in self.shapes and i not in self.static
                   and i not in self.weights and i not in {o for g in group for o in g.output}}
            if len(ins) != 1:
                continue
            (x,) = ins
            cur, used_x = core, False
            for _ in range(3):  # forward: + 1, * x, * 0.5
                nxt = only_consumer(cur.output[0])
                if nxt is None or nxt.op_type not in ("Add", "Mul") or id(nxt) not in secret:
                    break
                other = nxt.input[1] if nxt.input[0] == cur.output[0] else nxt.input[0]
                if other in self.static or other in self.weights:
                    group.append(nxt)
                elif other == x and nxt.op_type == "Mul" and not used_x:
                    group.append(nxt)
                    used_x = True
                else:
                    break
                cur = nxt
            if used_x:
                order = {id(n): k for k, n in enumerate(self.secret_nodes)}
                group.sort(key=lambda n: order[id(n)])
                kind = "gelu" if core.op_type == "Erf" else "gelu_tanh"
                for n in group:
                    groups[id(n)] = (kind, group)
        return groups

    def segments(self) -> list[tuple[str, list[Any]]]:
        """(kind, nodes): each nonlinear node (Relu, MaxPool, Softmax, a GELU pattern, ...) alone, the
        nodes between them together ('linear'). A GELU pattern runs at the place of its last node."""
        groups = self._gelu_groups()
        out: list[tuple[str, list[Any]]] = []
        for node in self.secret_nodes:
            if id(node) in groups:
                kind, group = groups[id(node)]
                if node is group[-1]:
                    out.append((kind, group))
                continue
            kind = self.kind(node)
            if kind == "linear" and out and out[-1][0] == "linear":
                out[-1][1].append(node)
            else:
                out.append((kind, [node]))
        return out


def _replaced(node: Any, k: int, weights: dict[str, np.ndarray]) -> bool:
    """Input ``k`` of ``node`` is read through a server-side derived weight instead."""
    if node.op_type == "BatchNormalization":
        return 1 <= k <= 4 and node.output[0] + "#bn_mul" in weights
    return node.op_type == "Gemm" and k == 1 and node.output[0] + "#gemm_bt" in weights


# ---------------------------------------------------------------- ops: ONNX node -> jax

def _apply(node: Any, a: dict[str, Any], env: dict[str, Any]) -> list[Any]:
    """Compute one node on values in ``env`` (jax arrays or tracers; numpy for public constants)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    op = node.op_type
    x = [env.get(i) if i else None for i in node.input]

    def static(v: Any, what: str) -> np.ndarray:
        if isinstance(v, jax.core.Tracer):
            raise RunnerError(f"{op} node {node.name!r}: its {what} must be a constant, not a secret value")
        return np.asarray(v)

    if op == "Constant":
        from onnx import numpy_helper

        if "value" not in a:
            raise RunnerError(f"Constant node {node.name!r}: only the 'value' attribute is supported")
        return [numpy_helper.to_array(a["value"])]
    if op == "Identity":
        return [x[0]]
    if op in ("Add", "Sub", "Mul", "Div"):
        fn = {"Add": jnp.add, "Sub": jnp.subtract, "Mul": jnp.multiply, "Div": jnp.divide}[op]
        return [fn(x[0], x[1])]
    if op == "Relu":
        return [jnp.maximum(x[0], 0)]
    if op == "Neg":
        return [-x[0]]
    if op in ("Erf", "Exp", "Sigmoid", "Tanh", "Sqrt", "Reciprocal"):
        fn = {"Erf": lax.erf, "Exp": jnp.exp, "Sigmoid": jax.nn.sigmoid, "Tanh": jnp.tanh, "Sqrt": jnp.sqrt,
              "Reciprocal": lambda v: 1.0 / v}[op]
        return [fn(x[0])]
    if op == "Gelu":
        approx = a.get("approximate", b"none")
        approx = approx.decode() if isinstance(approx, bytes) else approx
        return [jax.nn.gelu(x[0], approximate=approx == "tanh")]
    if op in ("Softmax", "LogSoftmax"):
        fn = jax.nn.softmax if op == "Softmax" else jax.nn.log_softmax
        return [fn(x[0], axis=a.get("axis", -1))]
    if op == "LayerNormalization":
        axis = a.get("axis", -1) % len(x[0].shape)
        axes = tuple(range(axis, len(x[0].shape)))
        mean = jnp.mean(x[0], axis=axes, keepdims=True)
        d = x[0] - mean
        y = d * lax.rsqrt(jnp.mean(d * d, axis=axes, keepdims=True) + a.get("epsilon", 1e-5))
        y = y * x[1]
        if len(x) > 2 and x[2] is not None:
            y = y + x[2]
        return [y]
    if op == "Pow":
        e = x[1]
        if not isinstance(e, jax.core.Tracer) and np.asarray(e).size == 1:
            e0 = float(np.asarray(e, np.float64).reshape(-1)[0])
            if e0 == int(e0) and 0 <= e0 <= 8:
                return [lax.integer_pow(jnp.asarray(x[0]), int(e0))]
        return [jnp.power(x[0], e)]
    if op in ("Equal", "Less", "Greater"):
        fn = {"Equal": jnp.equal, "Less": jnp.less, "Greater": jnp.greater}[op]
        return [fn(x[0], x[1])]
    if op == "Where":
        return [jnp.where(x[0], x[1], x[2])]
    if op == "Cast":
        from onnx import helper

        dtype = helper.tensor_dtype_to_np_dtype(a["to"])
        if isinstance(x[0], jax.core.Tracer):
            return [x[0].astype(jnp.float32 if dtype.kind == "f" else dtype)]
        return [np.asarray(x[0]).astype(dtype)]
    if op == "Mod":
        if a.get("fmod", 0):
            return [np.fmod(static(x[0], "input"), static(x[1], "divisor"))]
        return [jnp.mod(x[0], x[1])]
    if op == "ConstantOfShape":
        from onnx import numpy_helper

        value = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
        return [np.full(tuple(static(x[0], "shape").tolist()), value.reshape(-1)[0], value.dtype)]
    if op == "Slice":
        rank = len(x[0].shape)
        starts, ends = static(x[1], "starts").tolist(), static(x[2], "ends").tolist()
        axes = static(x[3], "axes").tolist() if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = static(x[4], "steps").tolist() if len(x) > 4 and x[4] is not None else [1] * len(starts)
        index = [slice(None)] * rank
        for s0, e0, ax, st in zip(starts, ends, axes, steps):
            dim = x[0].shape[ax % rank]
            lo, hi, _ = slice(max(min(s0, 2**62), -2**62), max(min(e0, 2**62), -2**62), st).indices(dim)
            index[ax % rank] = slice(lo, hi if hi >= 0 or st > 0 else None, st)
        return [x[0][tuple(index)]]
    if op == "Conv":
        w = x[1]
        k = len(w.shape) - 2
        pads = a.get("pads", [0] * 2 * k)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise RunnerError(f"Conv node {node.name!r}: auto_pad is not supported; export with explicit pads")
        spatial = "HW"[:k] if k <= 2 else "DHW"
        y = lax.conv_general_dilated(
            x[0], w, tuple(a.get("strides", [1] * k)), [(pads[i], pads[i + k]) for i in range(k)],
            rhs_dilation=tuple(a.get("dilations", [1] * k)), feature_group_count=a.get("group", 1),
            dimension_numbers=("NC" + spatial, "OI" + spatial, "NC" + spatial),
        )
        if len(x) > 2 and x[2] is not None:
            y = y + x[2].reshape((1, -1) + (1,) * k)
        return [y]
    if op == "Gemm":
        lhs = x[0].T if a.get("transA", 0) else x[0]
        bt = node.output[0] + "#gemm_bt"
        rhs = env[bt] if bt in env else (x[1].T if a.get("transB", 0) else x[1])
        y = jnp.matmul(lhs, rhs)
        if a.get("alpha", 1.0) != 1.0:
            y = y * a["alpha"]
        if len(x) > 2 and x[2] is not None:
            y = y + (x[2] if a.get("beta", 1.0) == 1.0 else x[2] * a["beta"])
        return [y]
    if op == "MatMul":
        return [jnp.matmul(x[0], x[1])]
    if op == "BatchNormalization":
        key = node.output[0] + "#bn_mul"
        shape = (1, -1) + (1,) * (len(x[0].shape) - 2)
        if key in env:
            mul, add = env[key], env[node.output[0] + "#bn_add"]
        else:
            mul = x[1] / jnp.sqrt(x[4] + a.get("epsilon", 1e-5))
            add = x[2] - x[3] * mul
        return [x[0] * mul.reshape(shape) + add.reshape(shape)]
    if op in ("MaxPool", "AveragePool"):
        k = a["kernel_shape"]
        n = len(k)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or a.get("ceil_mode", 0):
            raise RunnerError(f"{op} node {node.name!r}: auto_pad and ceil_mode are not supported")
        if any(d != 1 for d in a.get("dilations", [1] * n)):
            raise RunnerError(f"{op} node {node.name!r}: dilations are not supported")
        pads = a.get("pads", [0] * 2 * n)
        window, strides = (1, 1, *k), (1, 1, *a.get("strides", [1] * n))
        padding = ((0, 0), (0, 0), *[(pads[i], pads[i + n]) for i in range(n)])
        if op == "MaxPool":
            return [lax.reduce_window(x[0], -np.inf, lax.max, window, strides, padding)]
        total = lax.reduce_window(x[0], 0.0, lax.add, window, strides, padding)
        if a.get("count_include_pad", 0) or not any(pads):
            return [total / float(np.prod(k))]
        ones = np.ones(tuple(x[0].shape[2:]), np.float32)[None, None]
        counts = np.asarray(lax.reduce_window(ones, 0.0, lax.add, window, strides, padding))
        return [total / counts]
    if op == "GlobalAveragePool":
        return [jnp.mean(x[0], axis=tuple(range(2, len(x[0].shape))), keepdims=True)]
    if op in ("ReduceMean", "ReduceSum"):  # axes: an attribute (ReduceMean < 18) or an input
        axes = a.get("axes")
        if len(x) > 1 and x[1] is not None:
            axes = static(x[1], "axes").tolist()
        if axes is None and a.get("noop_with_empty_axes", 0):
            return [x[0]]
        reduce = jnp.mean if op == "ReduceMean" else jnp.sum
        return [reduce(x[0], axis=None if axes is None else tuple(axes), keepdims=bool(a.get("keepdims", 1)))]
    if op == "Flatten":
        axis = a.get("axis", 1) % max(1, len(x[0].shape))
        return [jnp.reshape(x[0], (int(np.prod(x[0].shape[:axis])), -1))]
    if op == "Reshape":
        shape = static(x[1], "shape").astype(np.int64).tolist()
        if not a.get("allowzero", 0):
            shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [jnp.reshape(x[0], shape)]
    if op == "Transpose":
        return [jnp.transpose(x[0], a.get("perm"))]
    if op in ("Squeeze", "Unsqueeze"):
        axes = a.get("axes")
        if len(x) > 1 and x[1] is not None:
            axes = static(x[1], "axes").tolist()
        if op == "Squeeze":
            return [jnp.squeeze(x[0], None if axes is None else tuple(axes))]
        return [jnp.expand_dims(x[0], tuple(axes))]
    if op == "Concat":
        return [jnp.concatenate(x, axis=a["axis"])]
    if op == "Gather":
        idx = static(x[1], "indices").astype(np.int64)
        axis = a.get("axis", 0) % len(x[0].shape)
        idx = np.where(idx < 0, idx + x[0].shape[axis], idx)
        return [jnp.take(x[0], idx, axis=axis)]
    if op == "Expand":
        shape = np.broadcast_shapes(tuple(x[0].shape), tuple(static(x[1], "shape").tolist()))
        return [jnp.broadcast_to(x[0], shape)]
    if op == "ScatterElements":
        if a.get("reduction", b"none") not in (b"none", "none"):
            raise RunnerError(f"ScatterElements node {node.name!r}: only reduction='none' is supported")
        data, updates = x[0], x[2]
        idx = static(x[1], "indices").astype(np.int64)
        axis = a.get("axis", 0) % len(data.shape)
        idx = np.where(idx < 0, idx + data.shape[axis], idx)
        grid = list(np.indices(idx.shape, sparse=True))
        grid[axis] = idx
        return [jnp.asarray(data).at[tuple(grid)].set(updates)]
    raise RunnerError(f"the SPU backend does not support ONNX op {op}")


# ---------------------------------------------------------------- SPU: compile, share, run, read the log back

def _segment_fn(nodes: list[Any], attrs: dict, static: dict, in_names: list[str], out_names: list[str]) -> Callable:
    def fn(*args: Any) -> tuple:
        env: dict[str, Any] = {**static, **dict(zip(in_names, args))}
        for node in nodes:
            env.update(zip(node.output, _apply(node, attrs[id(node)], env)))
        return tuple(env[o] for o in out_names)

    return fn


def _elements(plan: Plan, kind: str, nodes: list[Any]) -> tuple[int, int]:
    """(elements, rows) through a nonlinear segment: its nonlinear node's input; rows for softmax / layernorm."""
    shapes = plan.shapes
    core = [n for n in nodes if n.op_type in ("Erf", "Tanh")]
    main = core[0] if kind.startswith("gelu") and core else \
        next((n for n in nodes if n.op_type in NONLINEAR and plan.kind(n) != "linear"), nodes[0])
    name = main.input[1] if main.op_type == "Div" else main.input[0]
    shape = shapes.get(name, shapes.get(main.output[0], ()))
    elements = int(np.prod(shapes[main.output[0]])) if main.op_type == "Div" else int(np.prod(shape))
    rows = elements
    if main.op_type in ("Softmax", "LogSoftmax", "LayerNormalization") and shape:
        axis = plan.attrs[id(main)].get("axis", -1) % len(shape)
        rows = int(np.prod(shape[:axis]))
    return elements, rows


def compile_segments(plan: Plan, optimize_denominator: bool = False) -> list[dict[str, Any]]:
    """One SPU executable per segment, with the secret values it reads and writes.

    ``optimize_denominator``: SPU's ``CompilerOptions.enable_optimize_denominator_with_broadcast``
    (softmax: one reciprocal per row, broadcast, instead of a division per element); off by default.
    """
    import spu.libspu as libspu
    from spu.utils import frontend

    copts = libspu.CompilerOptions()
    copts.enable_optimize_denominator_with_broadcast = optimize_denominator

    shapes = plan.shapes
    segs = plan.segments()
    later_use: list[set[str]] = []
    used: set[str] = set(plan.output_names)
    for _, nodes in reversed(segs):
        later_use.append(set(used))
        for node in nodes:
            used.update(node.input)
    later_use.reverse()
    out = []
    for i, (kind, nodes) in enumerate(segs):
        made = {o for n in nodes for o in n.output}
        inputs = dict.fromkeys(name for node in nodes for name in node.input)
        reads = [name for name in inputs if name in shapes and name not in made]
        reads += [w for w in plan.weights if "#" in w and w.split("#")[0] in made]  # derived weights
        writes = [o for n in nodes for o in n.output if o in later_use[i]]
        fn = _segment_fn(nodes, plan.attrs, plan.static, reads, writes)
        fn.__name__ = f"seg{i}_{kind}"
        example = [np.zeros(shapes[r], np.float32) for r in reads]
        exe, _ = frontend.compile(
            frontend.Kind.JAX, fn, example, {}, reads, [libspu.Visibility.VIS_SECRET] * len(reads),
            lambda outs, writes=writes: writes, copts=copts,
        )
        elements = sum(int(np.prod(shapes[n.input[0]])) for n in nodes if n.op_type == "Relu")
        comparisons = elements
        for n in nodes:
            if n.op_type == "MaxPool":
                k = int(np.prod(plan.attrs[id(n)]["kernel_shape"]))
                comparisons += (k - 1) * int(np.prod(shapes[n.output[0]]))
        seg = {"name": fn.__name__, "kind": kind, "exe": exe, "relus": elements, "comparisons": comparisons}
        if kind not in ("linear", "relu"):
            seg["elements"], seg["rows"] = _elements(plan, kind, nodes)
        out.append(seg)
    missing = [o for o in plan.output_names if o not in shapes]
    if missing:
        raise RunnerError(f"graph output {missing[0]!r} is a constant; nothing to compute privately")
    return out


_BLOCK = re.compile(r"\[Profiling\] SPU execution (\S+) completed")
_OP = re.compile(r"- (pphlo\.[\w.]+), executed (\d+) times, duration ([\d.e+-]+)s, send bytes (\d+) recv bytes (\d+), "
                 r"send actions (\d+), recv actions (\d+)")
_LINK = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), send actions (\d+), recv actions (\d+)")


def parse_profile(text: str) -> list[dict[str, Any]]:
    """SPU's per-run profile log -> one dict per executable run: name, sent, recv, actions, ops."""
    runs: list[dict[str, Any]] = []
    section = None
    for line in text.splitlines():
        if m := _BLOCK.search(line):
            runs.append({"name": m.group(1), "ops": {}})
            section = "hlo"
        elif "HAL profiling" in line or "MPC profiling" in line:
            section = None
        elif (m := _OP.search(line)) and section == "hlo" and runs:
            ops = runs[-1]["ops"]
            op = ops.setdefault(m.group(1), {"count": 0, "seconds": 0.0, "sent": 0, "actions": 0})
            op["count"] += int(m.group(2))
            op["seconds"] += float(m.group(3))
            op["sent"] += int(m.group(4))
            op["actions"] += int(m.group(6))
        elif (m := _LINK.search(line)) and runs:
            runs[-1].update(sent=int(m.group(1)), recv=int(m.group(2)), actions=int(m.group(3)))
    return runs


def _send_share(lctx: Any, dst: int, share: Any) -> int:
    payload = pickle.dumps((bytes(share.meta), [bytes(c) for c in share.share_chunks]))
    lctx.send(dst, payload)
    return len(payload)


def _recv_share(lctx: Any, src: int) -> Any:
    import spu.libspu as libspu

    meta, chunks = pickle.loads(lctx.recv(src))
    share = libspu.Share()
    share.meta, share.share_chunks = meta, chunks
    return share


def run_party(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import onnx
        import spu
        import spu.libspu as libspu
    except ImportError as exc:
        raise RunnerError(f"{sys.executable} cannot import SPU ({exc}): bash scripts/setup.sh makes .venv-spu") from None

    try:
        model = onnx.load(args.model)
    except Exception as exc:  # noqa: BLE001 - a junk file is a user error
        raise RunnerError(f"cannot read {args.model} as ONNX: {type(exc).__name__}") from None
    rank, peer = args.rank, 1 - args.rank
    plan = Plan(model, rank)
    x = np.load(args.input).astype(np.float32) if rank == 1 else None
    input_shape = tuple(int(d) for d in args.input_shape.split(","))
    plan.evaluate_static(input_shape)
    segments = compile_segments(plan, args.optimize_denominator)

    cfg = libspu.RuntimeConfig(
        protocol=getattr(libspu.ProtocolKind, args.protocol), field=getattr(libspu.FieldType, args.field),
        fxp_fraction_bits=args.fraction_bits,
    )
    cfg.enable_pphlo_profile = True
    io = spu.Io(2, cfg)
    desc = libspu.link.Desc()
    for r, port in enumerate(args.ports.split(",")):
        desc.add_party(f"party{r}", f"127.0.0.1:{port}")
    desc.recv_timeout_ms = int(args.timeout * 1000)
    desc.http_timeout_ms = int(args.timeout * 1000)
    desc.connect_retry_times = 120
    desc.connect_retry_interval_ms = 500
    lctx = libspu.link.create_brpc(desc, rank)
    rt = spu.Runtime(lctx, cfg)

    def share_from(owner: int, name: str, value: np.ndarray | None) -> int:
        """The owner secret-shares ``value`` and sends the peer its share; returns bytes sent."""
        if rank == owner:
            shares = io.make_shares(value, libspu.Visibility.VIS_SECRET)
            sent = _send_share(lctx, peer, shares[peer])
            rt.set_var(name, shares[rank])
            return sent
        rt.set_var(name, _recv_share(lctx, owner))
        return 0

    lctx.barrier()
    start = time.perf_counter()
    weight_sent = sum(share_from(0, name, plan.weights[name]) for name in plan.weights)
    weight_seconds = time.perf_counter() - start
    order, passes, output = [], [], None
    for i in range(args.runs + 1):  # pass 0 warms up: it carries the protocol's one-time set-up
        lctx.barrier()
        t0 = time.perf_counter()
        sent = share_from(1, plan.input_name, x)
        seg_times = []
        for seg in segments:
            t = time.perf_counter()
            rt.run(seg["exe"])
            seg_times.append(time.perf_counter() - t)
            order.append(seg["name"])
        out_share = rt.get_var(plan.output_names[0])
        if rank == 0:
            sent += _send_share(lctx, peer, out_share)
        else:
            output = io.reconstruct([_recv_share(lctx, 0), out_share])
        passes.append({"seconds": time.perf_counter() - t0, "seg_seconds": seg_times, "manual_sent": sent})
    lctx.stop_link()

    ctypes.CDLL(None).fflush(None)  # SPU logs through C stdio: flush before reading the log back
    profile = parse_profile(open(args.log, encoding="utf-8", errors="replace").read())
    if [p["name"] for p in profile] != order:
        raise RunnerError(f"SPU's profile log has {len(profile)} runs, expected {len(order)}")
    n = len(segments)
    for k, p in enumerate(passes):
        runs = profile[k * n: (k + 1) * n]
        p["sent"] = sum(r["sent"] for r in runs) + p["manual_sent"]
        p["actions"] = sum(r["actions"] for r in runs) + (1 if p["manual_sent"] else 0)
        p["segments"] = [{"sent": r["sent"], "actions": r["actions"], "ops": r["ops"]} for r in runs]
    if output is not None:
        np.save(args.output, output)
    return {
        "rank": rank,
        "weight_sent": weight_sent,
        "weight_seconds": weight_seconds,
        "passes": passes,
        "segments": [{k: v for k, v in s.items() if k != "exe"} for s in segments],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True, choices=[0, 1])
    parser.add_argument("--model", required=True)
    parser.add_argument("--input-shape", required=True)
    parser.add_argument("--input")
    parser.add_argument("--output")
    parser.add_argument("--protocol", required=True, choices=["CHEETAH", "SEMI2K"])
    parser.add_argument("--field", default="FM64")
    parser.add_argument("--fraction-bits", type=int, default=18)
    parser.add_argument("--ports", required=True)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--optimize-denominator", action="store_true",
                        help="SPU's enable_optimize_denominator_with_broadcast (softmax's division); off by default")
    parser.add_argument("--out", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args(argv)
    log = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)  # SPU's profiler writes here; read back after the runs
    os.dup2(log, 2)
    sys.stdout = sys.stderr = open(log, "w", buffering=1, closefd=False)
    try:
        result = run_party(args)
    except RunnerError as exc:
        result = {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one line to the parent; the traceback stays in the log
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
