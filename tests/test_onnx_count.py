"""The ONNX ReLU inspector, on small models built inline and on two torch exports."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from conftest import dispatch_relus_per_sample
from onnx import TensorProto, helper, numpy_helper

from snl_fx import SnlFxError
from snl_fx.inspect.onnx_model import onnx_relu_report

INF = np.float32(np.inf)


def const(name: str, value) -> onnx.NodeProto:
    """A Constant node holding a float32 array."""
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.float32), name))


def init(name: str, value, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def build(tmp_path, nodes, inputs, outputs=("y",), inits=(), opset=17, name="m.onnx") -> str:
    """Write a one-graph model; ``inputs`` is [(name, dims)], a str dim is symbolic."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n, dims in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / name
    onnx.save(model, path)
    return str(path)


def conv_relu(tmp_path, dims=(1, 3, 8, 8)) -> str:
    """x -> Conv(16 out channels, 3x3, pad 1) -> Relu."""
    w = np.random.default_rng(0).standard_normal((16, 3, 3, 3))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    return build(tmp_path, nodes, [("x", list(dims))], inits=[init("w", w)])


X = [("x", [1, 4, 5, 5])]
N = 4 * 5 * 5  # elements per sample of X


# --- what is counted as a ReLU ---------------------------------------------------------------
RELU_CASES = {
    "relu": ([helper.make_node("Relu", ["x"], ["y"])], [], 17, "Relu"),
    "clip_min0_constant": ([const("lo", 0.0), helper.make_node("Clip", ["x", "lo"], ["y"])], [], 17, "Clip(min=0)"),
    "clip_min0_max_inf_init": ([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
                               [init("lo", 0.0), init("hi", INF)], 17, "Clip(min=0)"),
    "clip_min0_empty_max": ([helper.make_node("Clip", ["x", "lo", ""], ["y"])], [init("lo", 0.0)], 13, "Clip(min=0)"),
    "clip_min0_attr_opset6": ([helper.make_node("Clip", ["x"], ["y"], min=0.0)], [], 6, "Clip(min=0)"),
    "max_x_zero_scalar": ([const("z", 0.0), helper.make_node("Max", ["x", "z"], ["y"])], [], 17, "Max(x,0)"),
    "max_zero_tensor_x": ([helper.make_node("Max", ["z", "x"], ["y"])], [init("z", np.zeros((1, 4, 1, 1)))], 17,
                          "Max(x,0)"),
}


@pytest.mark.parametrize("case", RELU_CASES)
def test_relu_spellings_are_counted(tmp_path, case):
    nodes, inits, opset, op = RELU_CASES[case]
    report = onnx_relu_report(build(tmp_path, nodes, X, inits=inits, opset=opset))
    assert report.total == N
    assert [(s.op, s.shape, s.relus) for s in report.sites] == [(op, (4, 5, 5), N)]
    assert report.relu_depth == 1
    assert report.others == []
    if op == "Relu":
        assert report.notes == []
    else:
        assert any(op in n and "counted as ReLU" in n for n in report.notes)


# --- what is reported apart, never counted ---------------------------------------------------
OTHER_CASES = {
    "clip_0_6_is_relu6": ([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], [init("lo", 0.0), init("hi", 6.0)],
                          17, "relu6", N),
    "clip_0_6_attr_opset6": ([helper.make_node("Clip", ["x"], ["y"], min=0.0, max=6.0)], [], 6, "relu6", N),
    "clip_minus1_1_is_clamp": ([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
                               [init("lo", -1.0), init("hi", 1.0)], 17, "clamp", N),
    "max_x_y": ([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["x"], ["s"]),
                 helper.make_node("Max", ["x", "s"], ["y"])], [], 17, "max", N),
    "max_x_one": ([helper.make_node("Max", ["x", "one"], ["y"])], [init("one", 1.0)], 17, "max", N),
    "maxpool_2x2": ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])], [], 17,
                    "maxpool", 4 * 2 * 2 * (2 * 2 - 1)),
    "maxpool_3x3_pad1": ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])], [],
                         17, "maxpool", 4 * 5 * 5 * (3 * 3 - 1)),
    "global_maxpool": ([helper.make_node("GlobalMaxPool", ["x"], ["y"])], [], 17, "maxpool", 4 * (5 * 5 - 1)),
    "sigmoid": ([helper.make_node("Sigmoid", ["x"], ["y"])], [], 17, "sigmoid", N),
    "leaky_relu": ([helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.1)], [], 17, "leaky_relu", N),
    "softmax": ([helper.make_node("Softmax", ["x"], ["y"], axis=1)], [], 17, "softmax", N),
    "gelu": ([helper.make_node("Gelu", ["x"], ["y"])], [], 20, "gelu", N),
}


@pytest.mark.parametrize("case", OTHER_CASES)
def test_other_nonlinearities_are_reported_apart(tmp_path, case):
    nodes, inits, opset, kind, comparisons = OTHER_CASES[case]
    report = onnx_relu_report(build(tmp_path, nodes, X, inits=inits, opset=opset))
    relus = sum(n.op_type == "Relu" for n in nodes) * N  # only max_x_y has a (separate) Relu
    assert report.total == relus
    assert not any("Clip" in n or "Max" in n for n in report.notes)
    assert report.other_totals()[kind] == comparisons


def test_relu_on_conv_output(tmp_path):
    report = onnx_relu_report(conv_relu(tmp_path))
    assert report.total == 16 * 8 * 8
    assert [(s.name, s.op, s.shape) for s in report.sites] == [("relu", "Relu", (16, 8, 8))]
    assert report.relu_depth == 1 and report.source.endswith("m.onnx")


@pytest.mark.parametrize("from_constant", [True, False])
def test_relu_on_gathered_subset_counts_only_the_subset(tmp_path, from_constant):
    k = 10
    idx = np.array([0, 3, 7, 11, 20, 31, 50, 64, 99, 143], np.int64)
    assert len(idx) == k
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], axis=1),
        helper.make_node("Gather", ["f", "idx"], ["g"], axis=1),
        helper.make_node("Relu", ["g"], ["y"]),
    ]
    idx_tensor = numpy_helper.from_array(idx, "idx")
    if from_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["idx"], value=idx_tensor))
    inits = [] if from_constant else [idx_tensor]
    report = onnx_relu_report(build(tmp_path, nodes, [("x", [1, 4, 6, 6])], inits=inits))
    assert report.total == k
    assert report.sites[0].shape == (k,)


def test_dynamic_batch_counts_per_sample_with_or_without_input_shape(tmp_path):
    path = conv_relu(tmp_path, dims=("batch", 3, 8, 8))
    assert onnx_relu_report(path).total == 16 * 8 * 8
    pinned = onnx_relu_report(path, input_shapes=[(8, 3, 8, 8)])
    assert pinned.total == 16 * 8 * 8
    assert pinned.sites[0].shape == (16, 8, 8)


def test_dynamic_spatial_dims_need_input_shape(tmp_path):
    path = conv_relu(tmp_path, dims=("batch", 3, "h", "w"))
    with pytest.raises(SnlFxError, match=r"'x'.*\(batch, 3, h, w\).*--input-shape"):
        onnx_relu_report(path)
    assert onnx_relu_report(path, input_shapes=[(2, 3, 6, 10)]).total == 16 * 6 * 10


@pytest.mark.parametrize(
    "shapes, message",
    [
        ([(1, 3, 8)], "rank"),
        ([(1, 3, 8, 8), (1, 3, 8, 8)], "1 input"),
        ([(1, 4, 8, 8)], "disagrees"),
        ([(0, 3, 8, 8)], "positive"),
    ],
)
def test_bad_input_shapes_raise(tmp_path, shapes, message):
    path = conv_relu(tmp_path, dims=("batch", 3, 8, 8))
    with pytest.raises(SnlFxError, match=message):
        onnx_relu_report(path, input_shapes=shapes)


def _missing(tmp_path):
    return tmp_path / "nope.onnx"


def _text(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("these are not the weights you are looking for\n" * 20)
    return path


def _truncated(tmp_path):
    data = (tmp_path / "m.onnx").read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "make, problem",
    [
        (_missing, "no such ONNX file"),
        (_text, "not a readable ONNX model"),
        (_truncated, "not a readable ONNX model"),
        (_empty, "not an ONNX model"),
        (lambda p: p, "not a file"),
    ],
)
def test_unreadable_files_raise_one_line_errors_naming_file_and_problem(tmp_path, make, problem):
    conv_relu(tmp_path)
    path = make(tmp_path)
    with pytest.raises(SnlFxError) as info:
        onnx_relu_report(path)
    message = str(info.value)
    assert "\n" not in message
    assert problem in message and str(path) in message


def test_relu_with_uninferable_shape_raises(tmp_path):
    nodes = [helper.make_node("Mystery", ["x"], ["m"], domain="custom"), helper.make_node("Relu", ["m"], ["y"])]
    graph = onnx.load(build(tmp_path, nodes, X))
    graph.opset_import.append(helper.make_opsetid("custom", 1))
    onnx.save(graph, tmp_path / "custom.onnx")
    with pytest.raises(SnlFxError, match="cannot infer the shape"):
        onnx_relu_report(tmp_path / "custom.onnx")


def test_shapes_that_inference_leaves_unresolved_come_from_a_runtime_run(tmp_path):
    """The legacy exporter's chunk: Slice ends computed by Shape -> Gather -> Div, which data
    propagation does not follow; the Relu on the first half still gets its exact shape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["c"], axis=0),
        helper.make_node("Div", ["c", "two"], ["half"]),
        helper.make_node("Slice", ["x", "zero", "half", "one"], ["h"]),
        helper.make_node("Relu", ["h"], ["y"]),
    ]
    ints = [init("zero", [0], np.int64), init("one", [1], np.int64), init("two", [2], np.int64)]
    report = onnx_relu_report(build(tmp_path, nodes, [("x", [3, 4, 5, 5])], inits=ints))
    assert report.total == 2 * 5 * 5
    assert report.sites[0].shape == (2, 5, 5)
    assert any("ONNX Runtime run" in n for n in report.notes)


@pytest.mark.parametrize("raw", [True, False])
def test_big_constant_operand_is_still_read(tmp_path, raw):
    """Max(x, zeros) with 80 KB of zeros, as raw bytes or as float_data (shape inference sets big data aside)."""
    n = 20_000
    if raw:
        zeros = init("z", np.zeros((1, n)))
    else:
        zeros = helper.make_tensor("z", TensorProto.FLOAT, [1, n], [0.0] * n)
    report = onnx_relu_report(build(tmp_path, [helper.make_node("Max", ["x", "z"], ["y"])], [("x", [1, n])],
                                    inits=[zeros]))
    assert [(s.op, s.relus) for s in report.sites] == [("Max(x,0)", n)]


def test_relu_depth_is_the_longest_relu_chain(tmp_path):
    nodes = [
        helper.make_node("Relu", ["x"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["a2"]),
        helper.make_node("Relu", ["a2"], ["a3"]),
        helper.make_node("Relu", ["x"], ["b1"]),
        helper.make_node("Add", ["a3", "b1"], ["y"]),
    ]
    report = onnx_relu_report(build(tmp_path, nodes, X))
    assert report.relu_depth == 3
    assert report.total == 4 * N
    assert report.relu_layers == 4


def test_relu_depth_refuses_a_cycle():
    import graphlib

    from snl_fx.inspect.report import relu_depth

    assert relu_depth("abcd", [("a", "b"), ("b", "c"), ("a", "d"), ("d", "c")], {"a", "b", "c"}) == 3
    with pytest.raises(graphlib.CycleError):
        relu_depth("ab", [("a", "b"), ("b", "a")], {"a"})


def test_the_report_has_no_cost_section(tmp_path):
    """One cost model: a report's price is snl_fx.pi_cost's, never a second estimate in the report."""
    report = onnx_relu_report(conv_relu(tmp_path))
    assert not hasattr(report, "costs") and "costs" not in report.to_dict()
    assert " MB" not in report.table() and "estimated" not in report.table()


def test_model_without_relu(tmp_path):
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Add", ["s", "x"], ["y"])]
    report = onnx_relu_report(build(tmp_path, nodes, X))
    assert (report.total, report.relu_depth, report.sites) == (0, 0, [])
    assert report.other_totals() == {"sigmoid": N}


def test_subgraphs_are_noted(tmp_path):
    branch = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"])], "b", [], [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)]
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        const("zero", 0.0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
    ]
    report = onnx_relu_report(build(tmp_path, nodes, X))
    assert report.total == 0
    assert any("If" in n and "not inspected" in n for n in report.notes)


# --- torch exports against a dispatch-level oracle ---------------------------------------------
class SmallCNN(nn.Module):
    """conv-relu-maxpool-conv-relu-flatten-linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_export_matches_dispatch_count(tmp_path, dynamo):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / f"cnn_{dynamo}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
    report = onnx_relu_report(path)
    assert report.total == dispatch_relus_per_sample(model, x) == 8 * 8 * 8 + 8 * 4 * 4
    assert report.relu_depth == 2
    assert report.other_totals() == {"maxpool": 8 * 4 * 4 * 3}
