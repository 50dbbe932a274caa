"""The ONNX inspector on the nonlinearities private inference pays for besides ReLU.

GELU (the Gelu op, or written out with Erf or Tanh), SiLU (Sigmoid * x), sigmoid, tanh, softmax and
LayerNorm with their row lengths, exp, division by a tensor, and secret x secret products (``mul``):
each is counted per sample under its kind, the parts of a written-out GELU or SiLU once. Graphs
are built inline; expected counts are written as formulas.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import snl_fx
from snl_fx.inspect.onnx_model import onnx_relu_report

X = [("x", [2, 4, 6, 8])]  # batch 2
N = 4 * 6 * 8  # elements per sample of x


def const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.float32), name))


def init(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def build(tmp_path, nodes, inputs=X, outputs=("y",), inits=(), opset=17) -> str:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n, dims in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return str(path)


def node(op: str, ins: list[str], out: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, ins, [out], name=out, **attrs)


def gelu_erf(x: str = "x", out: str = "y") -> list[onnx.NodeProto]:
    """torch's legacy ONNX export of nn.GELU(): x * (1 + erf(x / sqrt 2)) * 0.5."""
    return [const("sqrt2", math.sqrt(2)), node("Div", [x, "sqrt2"], "d"), node("Erf", ["d"], "e"),
            const("one", 1.0), node("Add", ["e", "one"], "a"), node("Mul", [x, "a"], "m"),
            const("half", 0.5), node("Mul", ["m", "half"], out)]


def gelu_tanh(x: str = "x", out: str = "y") -> list[onnx.NodeProto]:
    """torch's legacy ONNX export of nn.GELU(approximate="tanh")."""
    return [node("Mul", [x, x], "sq"), node("Mul", [x, "sq"], "cube"), const("c1", 0.044715),
            node("Mul", ["c1", "cube"], "c3"), node("Add", [x, "c3"], "inner"), const("c2", math.sqrt(2 / math.pi)),
            node("Mul", ["c2", "inner"], "arg"), node("Tanh", ["arg"], "t"), const("one", 1.0),
            node("Add", ["one", "t"], "a"), node("Mul", [x, "a"], "m"), const("half", 0.5),
            node("Mul", ["half", "m"], out)]


# --- one kind per graph ------------------------------------------------------------------------
CASES = {
    "gelu_op": ([node("Gelu", ["x"], "y")], [], 20, {"gelu": N}),
    "gelu_op_tanh": ([node("Gelu", ["x"], "y", approximate="tanh")], [], 20, {"gelu_tanh": N}),
    "gelu_erf_pattern": (gelu_erf(), [], 17, {"gelu": N}),
    "gelu_tanh_pattern": (gelu_tanh(), [], 17, {"gelu_tanh": N}),
    "lone_erf": ([node("Erf", ["x"], "y")], [], 17, {"erf": N}),
    "lone_tanh": ([node("Tanh", ["x"], "y")], [], 17, {"tanh": N}),
    "silu": ([node("Sigmoid", ["x"], "s"), node("Mul", ["s", "x"], "y")], [], 17, {"silu": N}),
    "sigmoid": ([node("Sigmoid", ["x"], "y")], [], 17, {"sigmoid": N}),
    "sigmoid_times_tanh": ([node("Sigmoid", ["x"], "s"), node("Tanh", ["x"], "t"), node("Mul", ["s", "t"], "y")], [],
                           17, {"sigmoid": N, "tanh": N, "mul": N}),
    "exp": ([node("Exp", ["x"], "y")], [], 17, {"exp": N}),
    "div_by_tensor": ([node("Exp", ["x"], "e"), node("Div", ["x", "e"], "y")], [], 17, {"exp": N, "div": N}),
    "div_by_constant": ([const("c", 3.0), node("Div", ["x", "c"], "y")], [], 17, {}),
    "div_by_weight": ([node("Div", ["x", "w"], "y")], [init("w", np.ones((1, 4, 1, 1)))], 17, {}),
    "mul_secret_by_secret": ([node("Mul", ["x", "x"], "y")], [], 17, {"mul": N}),
    "mul_by_scalar": ([const("c", 3.0), node("Mul", ["c", "x"], "y")], [], 17, {}),
    "mul_by_one_element_weight": ([node("Mul", ["x", "w"], "y")], [init("w", [2.0])], 17, {}),
    # BatchNorm as the `pi` profile writes it: x * scale + shift, per-channel weights (secret-shared)
    "mul_by_channel_weight": ([node("Mul", ["x", "w"], "m"), node("Add", ["m", "b"], "y")],
                              [init("w", np.ones((1, 4, 1, 1))), init("b", np.zeros((1, 4, 1, 1)))], 17, {"mul": N}),
    "mul_by_reshaped_weight": ([const("shape", [1, 4, 1, 1]), node("Cast", ["shape"], "shape64", to=TensorProto.INT64),
                                node("Reshape", ["w", "shape64"], "wr"), node("Mul", ["wr", "x"], "y")],
                               [init("w", np.ones(4))], 17, {"mul": N}),
    "mul_by_shape_value": ([node("Shape", ["x"], "shp"), node("Cast", ["shp"], "f", to=TensorProto.FLOAT),
                            node("ReduceSum", ["f"], "n", keepdims=0), node("Mul", ["x", "n"], "y")], [], 17, {}),
    "sqrt_of_shape": ([node("Shape", ["x"], "shp"), node("Cast", ["shp"], "f", to=TensorProto.FLOAT),
                       node("Sqrt", ["f"], "r"), node("ReduceSum", ["r"], "n", keepdims=0), node("Div", ["x", "n"], "y")],
                      [], 17, {}),  # attention's 1/sqrt(d) from the shape (legacy MHA export): public, once
    "erf_of_weight": ([node("Erf", ["w"], "ew"), node("Mul", ["x", "ew"], "y")],
                      [init("w", np.ones((1, 4, 1, 1)))], 17, {}),  # the Erf is on a weight: not per sample
}


@pytest.mark.parametrize("case", CASES)
def test_each_kind_is_counted_per_sample(tmp_path, case):
    nodes, inits, opset, expected = CASES[case]
    report = onnx_relu_report(build(tmp_path, nodes, inits=inits, opset=opset))
    assert report.total == 0
    assert report.other_totals() == expected


def test_shape_arithmetic_is_noted_not_counted(tmp_path):
    nodes = CASES["sqrt_of_shape"][0]
    report = onnx_relu_report(build(tmp_path, nodes))
    assert any(n.startswith("not per sample: sqrt 'r'") and "input shapes" in n for n in report.notes)


def test_written_out_gelu_and_silu_are_counted_once_and_said(tmp_path):
    nodes = gelu_erf(out="g") + [node("Sigmoid", ["g"], "s"), node("Mul", ["g", "s"], "y")]
    report = onnx_relu_report(build(tmp_path, nodes))
    assert [(o.name, o.kind, o.comparisons) for o in report.others] == [("e", "gelu", N), ("s", "silu", N)]
    assert any("1 gelu, 1 silu" in n for n in report.notes)


def test_gelu_pattern_needs_its_constants(tmp_path):
    """Erf of x / 2 is not a GELU: it stays an erf, and the product with x is a mul."""
    nodes = gelu_erf()
    nodes[0] = const("sqrt2", 2.0)
    assert onnx_relu_report(build(tmp_path, nodes)).other_totals() == {"erf": N, "mul": N}


# --- rows ------------------------------------------------------------------------------------
ROWS = {
    "softmax_last": (node("Softmax", ["x"], "y", axis=-1), 17, "softmax", 8),
    "softmax_axis1": (node("Softmax", ["x"], "y", axis=1), 17, "softmax", 4),
    "softmax_opset11_default": (node("Softmax", ["x"], "y"), 11, "softmax", 4 * 6 * 8),  # 2-D coercion from axis 1
    "log_softmax": (node("LogSoftmax", ["x"], "y", axis=2), 17, "softmax", 6),
    "layernorm_last": (node("LayerNormalization", ["x", "g", "b"], "y"), 17, "layernorm", 8),
    "layernorm_axis2": (node("LayerNormalization", ["x", "g2", "b2"], "y", axis=2), 17, "layernorm", 6 * 8),
}


@pytest.mark.parametrize("case", ROWS)
def test_row_kinds_carry_their_row_length(tmp_path, case):
    n, opset, kind, row = ROWS[case]
    inits = [init("g", np.ones(8)), init("b", np.zeros(8)), init("g2", np.ones((6, 8))), init("b2", np.zeros((6, 8)))]
    report = onnx_relu_report(build(tmp_path, [n], inits=inits, opset=opset))
    assert [(o.kind, o.shape, o.comparisons, o.row) for o in report.others] == [(kind, (4, 6, 8), N, row)]
    assert f"{kind}: {N:,} elements per sample in rows of {row:,}" in report.table()


@pytest.mark.skipif(not hasattr(onnx.defs, "get_schema") or onnx.defs.onnx_opset_version() < 23,
                    reason="RMSNormalization needs opset 23")
def test_rmsnorm(tmp_path):
    n = node("RMSNormalization", ["x", "g"], "y", axis=-1)
    report = onnx_relu_report(build(tmp_path, [n], inits=[init("g", np.ones(8))], opset=23))
    assert [(o.kind, o.comparisons, o.row) for o in report.others] == [("rmsnorm", N, 8)]


# --- matmuls ---------------------------------------------------------------------------------
def test_matmul_of_two_activations_is_a_linear_layer(tmp_path):
    """q @ k^T (both from the input) stays in the linear layers, labelled as such; x @ W too."""
    nodes = [node("MatMul", ["x", "w"], "q"), node("Transpose", ["q"], "kt", perm=[0, 1, 3, 2]),
             node("MatMul", ["q", "kt"], "s"), node("Softmax", ["s"], "y", axis=-1)]
    report = onnx_relu_report(build(tmp_path, nodes, inits=[init("w", np.ones((8, 5)))]))
    assert [(la.op, la.input, la.weight, la.output, la.macs) for la in report.linear] == [
        ("MatMul", N, 8 * 5, 4 * 6 * 5, 4 * 6 * 5 * 8),
        ("MatMul(activations)", 4 * 6 * 5, 4 * 5 * 6, 4 * 6 * 6, 4 * 6 * 6 * 5),
    ]
    assert report.other_totals() == {"softmax": 4 * 6 * 6}
    assert report.others[0].row == 6


# --- a torch model exported ------------------------------------------------------------------
class Block(nn.Module):
    """Linear -> GELU -> LayerNorm -> self-attention (softmax) -> GELU(tanh) -> SiLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.gelu, self.gelu_tanh, self.silu = nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()
        self.ln = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.gelu(self.l1(x)))
        h = torch.softmax(h @ h.transpose(-1, -2) / 4.0, dim=-1) @ h
        return self.l2(self.silu(self.gelu_tanh(h)))


def test_exported_model_counts_equal_the_formulas_and_the_torch_inspector(tmp_path):
    model, x = Block().eval(), torch.randn(3, 8, 16)
    path = tmp_path / "block.onnx"
    snl_fx.export_onnx(model, x[:1], path)
    onnx_report = snl_fx.relu_count(path)
    tokens, dim = 8, 32
    assert onnx_report.other_totals() == {
        "gelu": tokens * dim, "layernorm": tokens * dim, "softmax": tokens * tokens,
        "gelu_tanh": tokens * dim, "silu": tokens * dim,
    }
    assert {o.kind: o.row for o in onnx_report.others if o.row} == {"layernorm": dim, "softmax": tokens}
    assert [la.op for la in onnx_report.linear] == ["MatMul", "MatMul(activations)", "MatMul(activations)", "MatMul"]
    torch_report = snl_fx.relu_count(model, x)
    assert torch_report.other_totals() == onnx_report.other_totals()
    assert sorted((o.kind, o.row) for o in torch_report.others) == sorted((o.kind, o.row) for o in onnx_report.others)
    assert [la.macs for la in torch_report.linear] == [la.macs for la in onnx_report.linear]


def test_pi_profile_batchnorm_without_conv_is_a_mul(tmp_path):
    """A pre-activation BatchNorm (no conv before it) is written as Mul + Add by secret-shared
    weights under the `pi` profile: a secret product, counted as `mul`."""
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "pre.onnx"
    snl_fx.export_onnx(model, x[:1], path, profile="pi")
    report = snl_fx.relu_count(path)
    assert report.other_totals() == {"mul": 3 * 8 * 8}
    assert report.total == 3 * 8 * 8 + 4 * 8 * 8
    snl_fx.export_onnx(model, x[:1], tmp_path / "pre_default.onnx")  # a BatchNormalization node: the same product
    assert snl_fx.relu_count(tmp_path / "pre_default.onnx").other_totals() == {"mul": 3 * 8 * 8}
