"""Count ReLUs per sample in an ONNX file: Relu, Clip(min=0) and Max(x, 0), plus other nonlinearities.

Other nonlinearities are counted per kind, with the torch inspector's names: gelu (the Gelu op, or
written out with Erf), gelu_tanh, silu (Sigmoid * x), sigmoid, tanh, erf, softmax, layernorm and
rmsnorm (with their row lengths), exp, div (by a value of the input), mul (a secret product: of two
values of the input, or of one and a weight tensor), max-pools, and more (:class:`_Composites`).

Shapes come from ONNX shape inference after the graph inputs are pinned to concrete dims, so
the counts are exact for any static graph, whichever exporter wrote it.
"""

from __future__ import annotations

import graphlib
import math
import os
from collections import Counter
from collections.abc import Iterator

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.inliner
import onnx.shape_inference
from google.protobuf.message import Error as ProtobufError
from onnx import numpy_helper

from snl_fx.errors import SnlFxError
from snl_fx.relu_rule import RELU, clamp_kind
from snl_fx.inspect.report import (
    LinearCount,
    OtherCount,
    ReluReport,
    ScaleCount,
    SiteCount,
    not_per_sample_note,
    relu_depth,
)

# ONNX op -> the torch side's kind name (passes/spellings.py); comparisons = output elements.
# Gelu, Erf, Sigmoid and Tanh may be parts of a GELU or SiLU written out (:class:`_Composites`).
_ELEMENTWISE_KINDS: dict[str, str] = {
    "LeakyRelu": "leaky_relu",
    "PRelu": "prelu",
    "Elu": "elu",
    "Selu": "selu",
    "Celu": "celu",
    "Gelu": "gelu",  # approximate="tanh": gelu_tanh (_classify)
    "Erf": "erf",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Softmax": "softmax",
    "LogSoftmax": "softmax",
    "LayerNormalization": "layernorm",
    "RMSNormalization": "rmsnorm",
    "Exp": "exp",
    "Log": "log",
    "Sqrt": "sqrt",
    "Reciprocal": "reciprocal",
    "Pow": "pow",
    "Softplus": "softplus",
    "Softsign": "softsign",
    "Abs": "abs",
    "Sign": "sign",
    "Floor": "round",
    "Ceil": "round",
    "Round": "round",
    "InstanceNormalization": "instancenorm",
    "GroupNormalization": "groupnorm",
    "HardSigmoid": "hardsigmoid",
    "HardSwish": "hardswish",
    "Mish": "mish",
}
# kinds that normalise rows: OtherCount.row is the row length
_ROW_KINDS = frozenset({"softmax", "layernorm", "rmsnorm"})
# ops on values that depend on the input's data (not only its shape): secret in 2PC, a kind each
_COMPARE_OPS = frozenset({"Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Equal"})
_REDUCE_MAX_OPS = frozenset({"ReduceMax", "ReduceMin", "ArgMax", "ArgMin"})
# ops that move a weight without computing on it (a Mul by their output is a Mul by the weight)
_MOVES = frozenset({"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Expand"})
_LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_GRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
_FLOAT_MAX = float(np.finfo(np.float32).max)
_BIG_INITIALIZER = 1 << 16  # bytes


def onnx_relu_report(path: str | os.PathLike, input_shapes: list[tuple[int, ...]] | None = None) -> ReluReport:
    """Count ReLUs per sample in the ONNX file at ``path``.

    ``input_shapes`` gives one shape per graph input (initializers excluded), batch first; it
    is needed only when an input has dynamic dims beyond dim 0 (a dynamic dim 0 is pinned to 1).
    The batch is dim 0 of the batched inputs (:func:`_batched_inputs`: not an option vector or a
    scalar); a node that no batched input flows into (a Relu on a weight) is not per sample: it
    is named in a note, not counted.
    Raises :class:`SnlFxError` for unreadable files, unpinned dynamic dims and unknown shapes.
    """
    model = _load(path)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    batch, batched_inputs = _pin_inputs(inputs, input_shapes)
    del graph.value_info[:]  # stale exporter annotations may disagree with the pinned dims
    try:
        inferred = _infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as e:
        raise SnlFxError(f"ONNX shape inference failed on {os.fspath(path)}: {_first_line(e)}") from e
    base_dir = os.path.dirname(os.path.abspath(path))
    shapes = _Shapes(_value_shapes(inferred.graph), model, inputs, base_dir)
    integral = _integral_values(inferred.graph)
    consts = _Constants(graph, initializers, base_dir)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    batched = _batched_values(graph, batched_inputs)
    data = _batched_values(graph, batched_inputs, through_shape=False)
    composites = _Composites(graph, consts, data, initializers, integral)

    sites: list[SiteCount] = []
    constant: list[tuple[str, str, int]] = []  # (name, kind, elements) of layers no batched input flows into
    others: list[OtherCount] = []
    linear: list[LinearCount] = []
    scales: list[ScaleCount] = []
    notes: list[str] = []
    relu_nodes: set[int] = set()
    ops_counted: Counter[str] = Counter()
    subgraph_ops: set[str] = set()
    for idx, node in enumerate(graph.node):
        name = node.name or (node.output[0] if node.output else f"{node.op_type}_{idx}")
        if node.op_type in _SUBGRAPH_OPS or any(a.type in _GRAPH_ATTRS for a in node.attribute):
            subgraph_ops.add(node.op_type)
        if node.domain not in ("", "ai.onnx"):
            continue
        per_sample = any(v in batched for v in _reads(node))
        if node.op_type in _LINEAR_OPS and not per_sample:
            constant.append((name, node.op_type, math.prod(shapes.get(node.output[0]) or (0,))))
            continue
        if node.op_type in _LINEAR_OPS:
            layer = _linear_count(node, name, shapes, initializers, batch, data)
            if layer is None:
                notes.append(f"{node.op_type} node '{name}' has no inferred shapes; left out of the linear layers")
            else:
                linear.append(layer)
            continue
        relu_op, kind = _classify(node, consts, opset, integral)
        if node.op_type == "ReduceMean" and not _is_spatial_mean(node, consts, opset, shapes):
            kind = None
        if relu_op is None:
            kind = composites.kind(idx, node, kind)
        if relu_op is not None:
            value = node.output[0] if relu_op == "Max(x,0)" else node.input[0]
            shape = shapes.get(value)
            if shape is None:
                raise SnlFxError(
                    f"cannot infer the shape of '{value}' at {node.op_type} node '{name}'; "
                    "pass --input-shape with concrete dims for every input"
                )
            if not per_sample:
                constant.append((name, "relu", math.prod(shape)))
                continue
            sites.append(SiteCount(name, relu_op, shape[1:], _per_sample(shape, batch)))
            relu_nodes.add(idx)
            ops_counted[relu_op] += 1
        elif kind is not None and not any(v in data for v in _reads(node)):  # weights, constants, shapes only
            constant.append((name, kind, math.prod(shapes.get(node.output[0]) or (0,))))
        elif kind == "scale":
            out_shape = shapes.get(node.output[0])
            if out_shape is None:
                notes.append(f"{node.op_type} node '{name}' has no inferred shape; left out of the scalings")
            else:
                scales.append(ScaleCount(name, node.op_type, out_shape[1:], _per_sample(out_shape, batch)))
        elif kind is not None:
            other = _other_count(node, name, kind, shapes, batch, opset)
            if other is None:
                notes.append(f"{node.op_type} node '{name}' has no inferred shape; left out of other nonlinearities")
            else:
                others.append(other)

    if ops_counted.keys() - {"Relu"}:
        counted = ", ".join(f"{ops_counted[op]} {op}" for op in ("Relu", "Clip(min=0)", "Max(x,0)") if ops_counted[op])
        notes.append(f"counted as ReLU: {counted} nodes (Clip with min 0 and no max, and Max(x, 0), compute a ReLU)")
    if composites.found:
        notes.append("counted once per composite (its Erf, Tanh or Sigmoid node's elements; its Muls not as mul): "
                     + ", ".join(f"{n} {kind}" for kind, n in sorted(composites.found.items())))
    if shapes.from_runtime:
        notes.append(
            f"shapes of {shapes.from_runtime} values came from one ONNX Runtime run on zeros "
            "(ONNX shape inference left them unresolved)"
        )
    if subgraph_ops:
        notes.append(f"subgraphs of {', '.join(sorted(subgraph_ops))} nodes were not inspected")
    if note := not_per_sample_note(constant):
        notes.append(note)
    return ReluReport(
        source=os.fspath(path),
        sites=sites,
        relu_depth=_onnx_relu_depth(graph, relu_nodes),
        others=others,
        notes=notes,
        linear=linear,
        outputs=sum(_per_sample(shapes.get(v.name) or (), batch) for v in graph.output if v.name in batched),
        scales=scales,
    )


def _linear_count(node: onnx.NodeProto, name: str, shapes: _Shapes, initializers: dict, batch: int,
                  data: set[str] | frozenset[str] = frozenset()) -> LinearCount | None:
    """Sizes of a Conv/ConvTranspose/Gemm/MatMul node; None when a shape is unknown.

    A MatMul of two values that depend on the input (``data``: q @ k^T, attention @ v) is labelled
    ``MatMul(activations)``; its second operand's elements are per sample.
    """
    a, b, y = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
    if a is None or b is None or y is None:
        return None
    output = _per_sample(y, batch)
    if node.op_type == "Conv":
        per_output = math.prod(b[1:])
    elif node.op_type == "ConvTranspose":
        per_output = b[0] * math.prod(b[2:]) // max(a[1], 1)
    else:
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        per_output = a[0] if trans_a else a[-1]
    weight = math.prod(b) if node.input[1] in initializers or len(b) < 3 else _per_sample(b, batch)
    op = node.op_type
    if op == "MatMul" and node.input[0] in data and node.input[1] in data:
        op = "MatMul(activations)"
    return LinearCount(name, op, _per_sample(a, batch), weight, output, output * per_output)


def _load(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model without its external data (only small constants are read, on demand)."""
    where = os.fspath(path)
    if not os.path.exists(where):
        raise SnlFxError(f"no such ONNX file: {where}")
    if not os.path.isfile(where):
        raise SnlFxError(f"not a file: {where}")
    try:
        model = onnx.load(where, load_external_data=False)
    except (ProtobufError, ValueError, OSError, RuntimeError) as e:
        raise SnlFxError(f"{where} is not a readable ONNX model (truncated or corrupt?): {_first_line(e)}") from e
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise SnlFxError(f"{where} is not an ONNX model (no IR version, graph or opset)")
    if model.functions:
        try:
            model = onnx.inliner.inline_local_functions(model)
        except (ValueError, RuntimeError) as e:
            raise SnlFxError(f"cannot inline the local functions of {where}: {_first_line(e)}") from e
    return model


def _pin_inputs(inputs: list[onnx.ValueInfoProto], input_shapes: list[tuple[int, ...]] | None) -> tuple[int, set[str]]:
    """Write concrete dims into the graph inputs; returns the batch size and the batched inputs' names
    (:func:`_batched_inputs`)."""
    if input_shapes is None:
        for v in inputs:
            dims = _dims(v)
            if dims is None or any(not isinstance(d, int) for d in dims[1:]):
                shown = "unknown" if dims is None else "(" + ", ".join(map(str, dims)) + ")"
                raise SnlFxError(
                    f"ONNX input '{v.name}' has dynamic dims {shown}; "
                    "pass --input-shape with concrete dims for every input (e.g. --input-shape 1,3,32,32)"
                )
        input_shapes = [tuple(d if isinstance(d, int) else 1 for d in _dims(v) or ()) for v in inputs]
    if len(input_shapes) != len(inputs):
        names = ", ".join(v.name for v in inputs)
        raise SnlFxError(
            f"the model has {len(inputs)} input(s) ({names}) but {len(input_shapes)} input shape(s) were given"
        )
    dynamic = []
    for v, given in zip(inputs, input_shapes):
        given = tuple(given)
        dims = _dims(v)
        dynamic.append(dims is None or not dims or not isinstance(dims[0], int))
        if not v.type.HasField("tensor_type"):
            raise SnlFxError(f"input '{v.name}' is not a tensor; only tensor inputs are supported")
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in given):
            raise SnlFxError(f"input shape {given} for '{v.name}' must be positive integers")
        if dims is not None and len(dims) != len(given):
            raise SnlFxError(
                f"input '{v.name}' has rank {len(dims)} with dims ({', '.join(map(str, dims))}) "
                f"but the input shape given has rank {len(given)}: {given}"
            )
        if dims is not None and any(isinstance(d, int) and d != g for d, g in zip(dims, given)):
            shown = ", ".join(map(str, dims))
            raise SnlFxError(f"input shape {given} for '{v.name}' disagrees with its static dims ({shown})")
        shape = v.type.tensor_type.shape
        shape.ClearField("dim")
        for g in given:
            shape.dim.add().dim_value = g
    if not inputs:
        return 1, set()
    batch, flags = _batched_inputs([tuple(g) for g in input_shapes], dynamic)
    return batch, {v.name for v, flag in zip(inputs, flags) if flag}


def _batched_inputs(shapes: list[tuple[int, ...]], dynamic: list[bool]) -> tuple[int, tuple[bool, ...]]:
    """The batch size, and which inputs carry it in dim 0: the torch inspector's rule
    (``snl_fx.passes.trace.batched_inputs``, which this module cannot import; a test holds them equal).

    Inputs of rank >= 2 (images, token ids, feature rows) are batch first; inputs of rank <= 1
    (option vectors, lengths, scalars) are not batched, unless no input has rank >= 2 (then the
    rank-1 inputs are). The file can say more than an example tensor: where some of these inputs
    have a dynamic dim 0 (``dynamic``), only those are batched. The batch size is dim 0 of the
    first batched input; an input whose dim 0 differs is not batched either. A value is per
    sample only when a batched input flows into it (:func:`_batched_values`).
    """
    min_rank = 2 if any(len(s) >= 2 for s in shapes) else 1
    candidates = [len(s) >= min_rank for s in shapes]
    if any(c and d for c, d in zip(candidates, dynamic)):
        candidates = [c and d for c, d in zip(candidates, dynamic)]
    first = next((s for s, c in zip(shapes, candidates) if c), None)
    if first is None:
        raise SnlFxError("no input of the ONNX model has a batch dimension (dim 0); every input is a scalar")
    return first[0], tuple(c and s[0] == first[0] for s, c in zip(shapes, candidates))


def _reads(node: onnx.NodeProto) -> Iterator[str]:
    """The values ``node`` reads: its inputs, and those its subgraphs (If, Loop, Scan) read."""
    yield from (v for v in node.input if v)
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                yield from _reads(inner)


def _batched_values(graph: onnx.GraphProto, batched_inputs: set[str], through_shape: bool = True) -> set[str]:
    """The values a batched input flows into: the per-sample ones (ONNX values are written once).

    ``through_shape=False``: only the values that depend on the inputs' data, not merely on their
    shapes (the outputs of Shape and Size, and what is computed from them alone, are public).
    """
    batched = set(batched_inputs)
    size = -1
    while size != len(batched):  # nodes are sorted in a valid file; the loop only guards against one that is not
        size = len(batched)
        for node in graph.node:
            if not through_shape and node.op_type in ("Shape", "Size"):
                continue
            if any(v in batched for v in _reads(node)):
                batched.update(o for o in node.output if o)
    return batched


def _dims(v: onnx.ValueInfoProto) -> tuple[int | str, ...] | None:
    """Dims of a tensor value: ints where known, the symbol (or '?') where not; None if no shape."""
    t = v.type.tensor_type
    if not v.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference with data propagation, without the bytes of big initializers.

    Inference serializes the whole model; weights matter to it only through their dims, so the
    raw data of initializers over 64 KiB is set aside meanwhile (a ResNet-50 file: ~0.5 s saved).
    """
    big = [t for t in model.graph.initializer if t.HasField("raw_data") and t.ByteSize() > _BIG_INITIALIZER]
    saved = [t.raw_data for t in big]
    for t in big:
        t.ClearField("raw_data")
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    finally:
        for t, data in zip(big, saved):
            t.raw_data = data


def _value_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of every value whose dims shape inference fully resolved."""
    out: dict[str, tuple[int, ...]] = {t.name: tuple(t.dims) for t in graph.initializer}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        dims = _dims(v)
        if dims is not None and all(isinstance(d, int) for d in dims):
            out[v.name] = dims  # type: ignore[assignment]
    return out


_FLOAT_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
    *(getattr(onnx.TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
      if hasattr(onnx.TensorProto, n)),
})


def _integral_values(graph: onnx.GraphProto) -> frozenset[str]:
    """Values whose element type is known and not floating point (integers, booleans)."""
    typed = [(t.name, t.data_type) for t in graph.initializer]
    typed += [(v.name, v.type.tensor_type.elem_type) for v in [*graph.input, *graph.value_info, *graph.output]
              if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type]
    return frozenset(name for name, elem in typed if elem not in _FLOAT_TYPES)


class _Shapes:
    """Value shapes: from ONNX shape inference, else from one ONNX Runtime run of the pinned graph.

    Shape inference stops where its data propagation does not follow the shape arithmetic
    (e.g. the legacy exporter's ``chunk``: Shape -> Gather -> Div -> Slice). The graph is static
    once its inputs are pinned, so a run on zeros gives the exact shapes; it is made only when a
    shape is missing, and a failed run leaves the shapes unknown for the caller to report.
    """

    def __init__(self, known: dict[str, tuple[int, ...]], model: onnx.ModelProto,
                 inputs: list[onnx.ValueInfoProto], base_dir: str) -> None:
        self._known = known
        self._model, self._inputs, self._base_dir = model, inputs, base_dir
        self._ran = False
        self.from_runtime = 0

    def get(self, name: str) -> tuple[int, ...] | None:
        if name not in self._known and not self._ran:
            self._ran = True
            found = self._run()
            self.from_runtime = len(found)
            self._known.update(found)
        return self._known.get(name)

    def _run(self) -> dict[str, tuple[int, ...]]:
        import onnxruntime as ort

        model = onnx.ModelProto()
        model.CopyFrom(self._model)
        outputs = {v.name for v in model.graph.output}
        names = [o for node in model.graph.node for o in node.output if o and o not in self._known]
        model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in outputs)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            onnx.external_data_helper.load_external_data_for_model(model, self._base_dir)
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            feeds = {
                v.name: np.zeros(
                    [d.dim_value for d in v.type.tensor_type.shape.dim],
                    onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type),
                )
                for v in self._inputs
            }
            values = session.run(names, feeds)
        except Exception:  # noqa: BLE001 - any runtime failure leaves the shapes unknown, reported by the caller
            return {}
        return {n: tuple(int(d) for d in np.shape(v)) for n, v in zip(names, values)}


class _Constants:
    """Values known before run time: initializers and Constant nodes (through Identity/Cast)."""

    def __init__(self, graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto], base_dir: str) -> None:
        self._initializers = initializers
        self._base_dir = base_dir
        self._producers = {out: node for node in graph.node for out in node.output}

    def get(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant, else None."""
        if name in self._initializers:
            try:
                return numpy_helper.to_array(self._initializers[name], self._base_dir)
            except (ValueError, OSError, TypeError, onnx.checker.ValidationError) as e:
                if self._initializers[name].data_location == onnx.TensorProto.EXTERNAL:  # the count needs it
                    raise SnlFxError(f"cannot read tensor {name!r} from its external data file: {_first_line(e)}") from e
                return None
        node = self._producers.get(name)
        if node is None:
            return None
        if node.op_type in ("Identity", "Cast") and node.input:
            return self.get(node.input[0])
        if node.op_type != "Constant" or not node.attribute:
            return None
        attr = node.attribute[0]
        if attr.name == "sparse_value":
            return None
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, onnx.TensorProto):
            return numpy_helper.to_array(value, self._base_dir)
        return np.asarray(value)


def _classify(node: onnx.NodeProto, consts: _Constants, opset: int,
              integral: frozenset[str] = frozenset()) -> tuple[str | None, str | None]:
    """(ReLU spelling, None) for a ReLU, (None, other kind) for another nonlinearity, else (None, None).

    ``integral`` names the values known to hold integers (a clamp of those is no ReLU).
    """
    op = node.op_type
    if op == "Relu":
        return "Relu", None
    if op == "Clip":  # the torch side's rule for clamp (snl_fx.relu_rule): a ReLU when min 0, no max
        kind = clamp_kind(*_clip_bounds(node, consts, opset), floating=node.input[0] not in integral)
        return ("Clip(min=0)", None) if kind == RELU else (None, kind)
    if op == "Max":  # Max(x, c) is clamp(x, min=c): the same rule, with a constant c of one value
        if len(node.input) == 2:
            a, b = (consts.get(i) for i in node.input)
            x = node.input[0] if a is None else node.input[1]
            c = a if a is not None else b
            if (a is None) != (b is None) and clamp_kind(_single_value(c), None, floating=x not in integral) == RELU:
                return "Max(x,0)", None
        return (None, "max") if len(node.input) > 1 else (None, None)
    if op in ("MaxPool", "GlobalMaxPool"):
        return None, "maxpool"
    if op == "Min":
        return (None, "min") if len(node.input) > 1 else (None, None)
    if op in ("AveragePool", "GlobalAveragePool", "ReduceMean"):
        return None, "avgpool"  # linear, but a fixed-point division: one truncation per output
    if op == "Gelu" and any(a.name == "approximate" and a.s == b"tanh" for a in node.attribute):
        return None, "gelu_tanh"
    return None, _ELEMENTWISE_KINDS.get(op)


def _is_spatial_mean(node: onnx.NodeProto, consts: _Constants, opset: int, shapes: _Shapes) -> bool:
    """A ReduceMean over spatial axes only (>= 2 of an N, C, ... input): a global average pool."""
    in_shape = shapes.get(node.input[0]) if node.input else None
    if in_shape is None or len(in_shape) < 3:
        return False
    if opset < 18:
        axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    else:
        value = consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    rank = len(in_shape)
    return bool(axes) and all(a % rank >= 2 for a in axes)


def _clip_bounds(node: onnx.NodeProto, consts: _Constants, opset: int) -> tuple[float | str | None, float | str | None]:
    """Clip's (min, max): a float, None when absent or infinite, or "dynamic" when not constant."""
    if opset < 11:
        attrs = {a.name: a.f for a in node.attribute}
        raw = [attrs.get("min"), attrs.get("max")]
    else:
        raw = []
        for i in (1, 2):
            name = node.input[i] if len(node.input) > i else ""
            if not name:
                raw.append(None)
                continue
            value = consts.get(name)
            if value is None or value.size != 1:
                raw.append("dynamic")
            else:
                raw.append(float(value.reshape(())))
    lo, hi = raw
    if isinstance(lo, float) and lo <= -_FLOAT_MAX:
        lo = None
    if isinstance(hi, float) and hi >= _FLOAT_MAX:
        hi = None
    return lo, hi


def _single_value(value: np.ndarray) -> float | str:
    """The one value every element of a constant holds, else ``"varies"`` (an empty one too)."""
    flat = value.reshape(-1)
    if flat.size == 0 or not bool(np.all(flat == flat[0])):
        return "varies"
    return float(flat[0])


def _other_count(node: onnx.NodeProto, name: str, kind: str, shapes: _Shapes, batch: int,
                 opset: int = 17) -> OtherCount | None:
    """Elements (comparisons for max-pool and max/min kinds) per sample of one nonlinearity node,
    and the row length of the kinds that normalise rows."""
    out_shape = shapes.get(node.output[0])
    if out_shape is None:
        return None
    outputs = _per_sample(out_shape, batch)
    if kind in _ROW_KINDS:
        return OtherCount(name, kind, out_shape[1:], outputs, _row(node, out_shape, opset))
    if node.op_type in _REDUCE_MAX_OPS:
        in_shape = shapes.get(node.input[0])
        if in_shape is None:
            return None
        return OtherCount(name, kind, out_shape[1:], _per_sample(in_shape, batch) - outputs)
    if node.op_type == "MaxPool":
        kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [1])
        comparisons = outputs * (math.prod(kernel) - 1)
    elif node.op_type == "GlobalMaxPool":
        in_shape = shapes.get(node.input[0])
        if in_shape is None:
            return None
        comparisons = outputs * (math.prod(in_shape[2:]) - 1)
    elif node.op_type in ("Max", "Min"):
        comparisons = outputs * (len(node.input) - 1)
    else:
        comparisons = outputs
    return OtherCount(name, kind, out_shape[1:], comparisons)


def _row(node: onnx.NodeProto, shape: tuple[int, ...], opset: int) -> int:
    """The row length of a Softmax/LogSoftmax (the size of its axis; before opset 13, the product of
    the dims from its axis, default 1) or a LayerNormalization/RMSNormalization (the product of the
    dims from its axis, default -1)."""
    legacy = node.op_type in ("Softmax", "LogSoftmax") and opset < 13
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1 if legacy else -1)
    axis = axis % len(shape) if shape else 0
    if node.op_type in ("Softmax", "LogSoftmax") and not legacy:
        return shape[axis] if shape else 1
    return math.prod(shape[axis:])


class _Composites:
    """Nonlinearities written out of several nodes, and the element-wise kinds that need data flow.

    * GELU, erf form (``x * 0.5 * (1 + erf(x / sqrt 2))``): kind ``gelu``, counted at its Erf node;
    * GELU, tanh form (``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``): ``gelu_tanh``,
      counted at its Tanh node;
    * SiLU (``x * sigmoid(x)``): ``silu``, counted at its Sigmoid node.
    Their Muls of two secret values are part of them, not ``mul``s. Elsewhere, with ``data`` the
    values that depend on the inputs' data (not only their shapes):
    * ``mul``: a Mul of two such values, or of one and a weight tensor of more than one element
      (an initializer, maybe reshaped: BatchNorm written as Mul + Add, a layer scale), or a
      BatchNormalization node (one the exporter did not fold into a conv): weights are
      secret-shared in 2PC, so all are secret products. A Mul by a scalar constant is not a kind;
    * ``div``: a Div whose divisor depends on the data;
    * ``compare`` (Less, Greater, Equal, ...), ``where`` (a Where with such a condition), and
      ``max``/``min`` for ReduceMax/ReduceMin/ArgMax/ArgMin of such values.
    A lone Erf stays ``erf``, a lone Tanh ``tanh``, a lone Sigmoid ``sigmoid``.
    """

    def __init__(self, graph: onnx.GraphProto, consts: _Constants, data: set[str],
                 initializers: dict[str, onnx.TensorProto], integral: frozenset[str]) -> None:
        self._nodes = list(graph.node)
        self._consts, self._data, self._initializers, self._integral = consts, data, initializers, integral
        self._producer = {out: i for i, node in enumerate(self._nodes) for out in node.output if out}
        self._consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self._nodes):
            for v in node.input:
                if v:
                    self._consumers.setdefault(v, []).append(i)
        self._weights: dict[str, bool] = {}
        self.kinds: dict[int, str] = {}  # node index -> the composite counted there
        self.absorbed: set[int] = set()  # Muls that are part of a composite
        self.found: Counter[str] = Counter()
        for i, node in enumerate(self._nodes):
            if node.domain not in ("", "ai.onnx") or not node.input or not node.output:
                continue
            match = {"Erf": self._gelu_erf, "Tanh": self._gelu_tanh, "Sigmoid": self._silu}.get(node.op_type)
            parts = match(node) if match else None
            if parts is not None:
                kind = {"Erf": "gelu", "Tanh": "gelu_tanh", "Sigmoid": "silu"}[node.op_type]
                self.kinds[i] = kind
                self.absorbed |= parts | (self._scalings_of(i, parts) if kind != "silu" else set())
                self.found[kind] += 1

    def kind(self, idx: int, node: onnx.NodeProto, kind: str | None) -> str | None:
        """The kind to count at node ``idx``: a composite's, a data-flow kind, else ``kind`` as classified."""
        if idx in self.kinds:
            return self.kinds[idx]
        if idx in self.absorbed:
            return None
        op = node.op_type
        if op == "BatchNormalization":  # one that follows no conv (else folded): x * scale + shift by weights
            return "mul" if node.input and node.input[0] in self._data else None
        if op in ("Mul", "Div", "Where") or op in _COMPARE_OPS or op in _REDUCE_MAX_OPS:
            if op in ("Mul", "Div") and (not node.output or node.output[0] in self._integral):
                return None  # integer arithmetic (indices, lengths): no fixed-point product
            ins = [v for v in node.input if v]
            if op == "Mul" and len(ins) == 2:
                a, b = (v in self._data for v in ins)
                if (a and b) or (a and self._weight(ins[1])) or (b and self._weight(ins[0])):
                    return "mul"
                return "scale" if a or b else None  # by a public float: a fixed-point truncation
            if op == "Div" and len(ins) == 2:
                if ins[1] in self._data:
                    return "div"
                return "scale" if ins[0] in self._data else None
            if op == "Where":
                return "where" if ins and ins[0] in self._data else None
            if op in _COMPARE_OPS:
                return "compare" if any(v in self._data for v in ins) else None
            if ins and ins[0] in self._data:  # ReduceMax, ArgMax, ...
                return "max" if op in ("ReduceMax", "ArgMax") else "min"
            return None
        return kind

    # --- helpers ---
    def _scaling(self, i: int) -> bool:
        """Whether node ``i`` is a Mul or Div of a value by a scalar constant (x -> c*x, x/c)."""
        node = self._nodes[i]
        if node.op_type not in ("Mul", "Div") or len(node.input) != 2 or not node.output:
            return False
        return self._scalar(node.input[1]) is not None or (node.op_type == "Mul" and self._scalar(node.input[0]) is not None)

    def _scalings_of(self, core: int, parts: set[int]) -> set[int]:
        """The scalings by constants inside a composite (GELU's x / sqrt 2, * 0.5, * 0.044715,
        * sqrt(2/pi)): the backend runs them with it, so they are no ``scale`` of their own. Those
        that only the core or the parts read, and those that read the core or a part."""
        group = parts | {core}
        found: set[int] = set()
        for g in list(group):
            for v in self._nodes[g].input:
                i = self._producer.get(v)
                while i is not None and i not in group and self._scaling(i) and \
                        all(c in group | found for c in self._consumers.get(self._nodes[i].output[0], [])):
                    found.add(i)
                    node = self._nodes[i]
                    i = self._producer.get(node.input[0] if self._scalar(node.input[1]) is not None else node.input[1])
            for out in self._nodes[g].output:
                found |= {i for i in self._consumers.get(out, []) if i not in group and self._scaling(i)}
        return found

    def _scalar(self, v: str) -> float | None:
        value = self._consts.get(v) if v else None
        if value is None or value.size != 1:
            return None
        try:
            return float(value.reshape(()))
        except (TypeError, ValueError):
            return None

    def _node(self, v: str) -> onnx.NodeProto | None:
        i = self._producer.get(v)
        return None if i is None else self._nodes[i]

    def _strip(self, v: str) -> str:
        """``v`` with its scalings by constants taken off: c*x, x*c, x/c -> x."""
        for _ in range(8):
            node = self._node(v)
            if node is None or node.op_type not in ("Mul", "Div") or len(node.input) != 2:
                return v
            a, b = node.input
            if self._scalar(b) is not None:
                v = a
            elif node.op_type == "Mul" and self._scalar(a) is not None:
                v = b
            else:
                return v
        return v

    def _scaled(self, v: str) -> list[str]:
        """``v`` and the values made from it by scalings with constants (x -> c*x, x/c)."""
        out, todo = [v], [v]
        while todo and len(out) < 16:
            v = todo.pop()
            for i in self._consumers.get(v, []):
                node = self._nodes[i]
                if node.op_type in ("Mul", "Div") and len(node.input) == 2 and node.output:
                    other = node.input[0] if node.input[1] == v else node.input[1]
                    if self._scalar(other) is not None and (node.op_type == "Mul" or other == node.input[1]):
                        out.append(node.output[0])
                        todo.append(node.output[0])
        return out

    def _closing_mul(self, value: str, x: str) -> set[int] | None:
        """The Mul that multiplies ``1 + value`` (maybe scaled) by ``x`` (maybe scaled): {its index}."""
        for v in self._scaled(value):
            for i in self._consumers.get(v, []):
                add = self._nodes[i]
                if add.op_type != "Add" or len(add.input) != 2 or not add.output:
                    continue
                other = add.input[1] if add.input[0] == v else add.input[0]
                one = self._scalar(other)
                if one is None or abs(one - 1.0) > 1e-3:
                    continue
                for s in self._scaled(add.output[0]):
                    for j in self._consumers.get(s, []):
                        mul = self._nodes[j]
                        if mul.op_type == "Mul" and len(mul.input) == 2:
                            rest = mul.input[1] if mul.input[0] == s else mul.input[0]
                            if self._strip(rest) == x:
                                return {j}
        return None

    def _gelu_erf(self, node: onnx.NodeProto) -> set[int] | None:
        pre = self._node(node.input[0])
        if pre is None or pre.op_type not in ("Div", "Mul") or len(pre.input) != 2:
            return None
        a, b = pre.input
        want = math.sqrt(2) if pre.op_type == "Div" else 1 / math.sqrt(2)
        if (c := self._scalar(b)) is not None and abs(c - want) < 1e-3:
            x = a
        elif pre.op_type == "Mul" and (c := self._scalar(a)) is not None and abs(c - want) < 1e-3:
            x = b
        else:
            return None
        return self._closing_mul(node.output[0], x)

    def _gelu_tanh(self, node: onnx.NodeProto) -> set[int] | None:
        add = self._node(self._strip(node.input[0]))
        if add is None or add.op_type != "Add" or len(add.input) != 2:
            return None
        for x, rest in (add.input, add.input[::-1]):
            cube = self._cube(self._strip(rest), x)
            if cube is not None:
                closing = self._closing_mul(node.output[0], x)
                return None if closing is None else cube | closing
        return None

    def _cube(self, v: str, x: str) -> set[int] | None:
        """The nodes computing ``x**3`` as Mul(x, Mul(x, x)) or Pow(x, 3), if ``v`` is that."""
        i = self._producer.get(v)
        node = None if i is None else self._nodes[i]
        if node is None or len(node.input) != 2:
            return None
        if node.op_type == "Pow":
            return {i} if node.input[0] == x and self._scalar(node.input[1]) == 3.0 else None
        if node.op_type != "Mul" or x not in node.input:
            return None
        other = node.input[1] if node.input[0] == x else node.input[0]
        j = self._producer.get(other)
        square = None if j is None else self._nodes[j]
        if square is not None and square.op_type == "Mul" and list(square.input) == [x, x]:
            return {i, j}
        if square is not None and square.op_type == "Pow" and square.input[0] == x and self._scalar(square.input[1]) == 2.0:
            return {i, j}
        return None

    def _silu(self, node: onnx.NodeProto) -> set[int] | None:
        x, s = node.input[0], node.output[0]
        for i in self._consumers.get(s, []):
            mul = self._nodes[i]
            if mul.op_type == "Mul" and sorted(mul.input) == sorted([x, s]):
                return {i}
        return None

    def _weight(self, v: str) -> bool:
        """Whether ``v`` is a weight tensor of more than one element: an initializer, maybe moved
        (reshaped, transposed, cast), not a value of the data."""
        if v in self._weights:
            return self._weights[v]
        self._weights[v] = False  # guards against a cycle
        if v in self._initializers:
            found = math.prod(self._initializers[v].dims) > 1
        else:
            node = self._node(v)
            found = node is not None and node.op_type in _MOVES and bool(node.input) and self._weight(node.input[0])
        self._weights[v] = found
        return found


def _per_sample(shape: tuple[int, ...], batch: int) -> int:
    """Elements per sample: numel / batch (rounded up for values without a batch dim)."""
    return -(-math.prod(shape) // batch)


def _onnx_relu_depth(graph: onnx.GraphProto, relu_nodes: set[int]) -> int:
    """Longest chain of ReLU nodes along any path of the node graph."""
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    edges = ((producers[v], i) for i, node in enumerate(graph.node) for v in node.input if v in producers)
    try:
        return relu_depth(range(len(graph.node)), edges, relu_nodes)
    except graphlib.CycleError as exc:
        raise SnlFxError("the ONNX graph has a cycle; cannot compute the ReLU depth") from exc


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
