"""Reliability, groups 3 and 4 of issue 17: per-sample counts that do not depend on the batch,
and the caller's objects never changed.

Rules under test: the batch is dim 0 of the batched inputs (rank >= 2, or rank 1 when no input
has rank >= 2; in an ONNX file, those with a dynamic dim 0 where some have one), and a value is
per sample only when a batched input flows into it. A ReLU on a weight or a constant is named in
a note, never a site, never gated, never in ``total``, in the torch and the ONNX inspector alike.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import snl_fx
from snl_fx import SnlFxError
from snl_fx.inspect.onnx_model import _batched_inputs, onnx_relu_report
from snl_fx.passes.trace import batched_inputs


def _notes(report) -> str:
    return " ".join(report.notes)


# --- one rule for the batched inputs, in both inspectors ----------------------------------------
RULE_CASES = {
    "one image": ([(4, 3, 8, 8)], (4, (True,))),
    "vector first, then the image": ([(2,), (4, 3, 8, 8)], (4, (False, True))),
    "scalar and image": ([(), (1, 3, 8, 8)], (1, (False, True))),
    "two batched inputs": ([(4, 16), (4, 3, 8, 8)], (4, (True, True))),
    "a rank-2 input of another dim 0": ([(4, 3, 8, 8), (7, 5)], (4, (True, False))),
    "rank-1 inputs only": ([(5,), (5,)], (5, (True, True))),
}


@pytest.mark.parametrize("case", RULE_CASES)
def test_the_torch_and_onnx_rules_pick_the_same_batched_inputs(case):
    shapes, expected = RULE_CASES[case]
    assert batched_inputs(shapes) == expected
    assert _batched_inputs(shapes, [False] * len(shapes)) == expected  # an all-static ONNX file


def test_a_dynamic_dim_0_marks_the_batched_onnx_inputs():
    # a static rank-2 side input with the same dim 0 as the image is not batched when the image's dim 0 is dynamic
    assert _batched_inputs([(4, 3, 8, 8), (4, 5)], [True, False]) == (4, (True, False))
    assert _batched_inputs([(4, 3, 8, 8), (4, 5)], [False, False]) == (4, (True, True))


@pytest.mark.parametrize("shapes", [[()], [(), ()]])
def test_no_input_with_a_batch_dim_is_refused(shapes):
    with pytest.raises(SnlFxError, match="batch dim"):
        batched_inputs(shapes)
    with pytest.raises(SnlFxError, match="batch dim"):
        _batched_inputs(shapes, [False] * len(shapes))


# --- ONNX: the batch from the batched input, ReLUs on constants apart --------------------------
def _build(tmp_path, nodes, inputs, inits=(), name="m.onnx") -> str:
    """``inputs`` is [(name, elem type, dims)], a str dim is symbolic."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, t, dims) for n, t, dims in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=list(inits),
    )
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


VEC = ("v", TensorProto.INT64, [2])
IMAGE = ("x", TensorProto.FLOAT, ["batch", 4, 4, 4])
STATIC_IMAGE = ("x", TensorProto.FLOAT, [1, 4, 4, 4])
W = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32), "w")
B = numpy_helper.from_array(np.ones((1, 4, 1, 1), np.float32), "b")

# name: (nodes, inputs, initializers, ReLUs per sample, note expected)
ONNX_CASES = {
    "vector input first, dynamic batch": ([helper.make_node("Relu", ["x"], ["y"])], [VEC, IMAGE], [], 4 * 4 * 4, False),
    "vector input first, static batch": ([helper.make_node("Relu", ["x"], ["y"])], [VEC, STATIC_IMAGE], [], 64, False),
    "image first": ([helper.make_node("Relu", ["x"], ["y"])], [IMAGE, VEC], [], 64, False),
    "relu on a weight": ([helper.make_node("Relu", ["w"], ["y"])], [VEC, IMAGE], [W], 0, True),
    "relu on the unbatched vector": (
        [helper.make_node("Cast", ["v"], ["f"], to=TensorProto.FLOAT), helper.make_node("Relu", ["f"], ["y"])],
        [VEC, IMAGE], [], 0, True),
    "relu on weight + input is per sample": (
        [helper.make_node("Add", ["x", "b"], ["s"]), helper.make_node("Relu", ["s"], ["y"])], [VEC, IMAGE], [B], 64, False),
    "sigmoid on a weight": (
        [helper.make_node("Sigmoid", ["w"], ["s"]), helper.make_node("Relu", ["x"], ["y"])], [IMAGE], [W], 64, True),
}


def _dynamic(inputs) -> bool:
    return any(isinstance(d, str) for _, _, dims in inputs for d in dims)


@pytest.mark.parametrize("case, batch", [(c, b) for c, spec in ONNX_CASES.items()
                                         for b in ((1, 4) if _dynamic(spec[1]) else (1,))])
def test_onnx_counts_per_sample_from_the_batched_input(tmp_path, case, batch):
    nodes, inputs, inits, relus, noted = ONNX_CASES[case]
    path = _build(tmp_path, nodes, inputs, inits)
    shapes = [tuple(batch if isinstance(d, str) else d for d in dims) for _, _, dims in inputs]
    report = onnx_relu_report(path, shapes)
    assert report.total == relus
    assert report.others == [] and all(s.relus == relus for s in report.sites)
    assert ("not per sample" in _notes(report)) is noted
    assert report.relu_layers == (1 if relus else 0)


def test_onnx_relu_on_a_weight_is_named_with_its_size(tmp_path):
    report = onnx_relu_report(_build(tmp_path, [helper.make_node("Relu", ["w"], ["y"], name="wrelu")], [IMAGE], [W]))
    assert report.sites == [] and report.total == 0 and report.relu_depth == 0
    assert "relu 'wrelu' (128 elements)" in _notes(report)
    assert snl_fx.pi_cost(report).by_kind().get("relu") is None  # costs nothing per sample


def test_onnx_batch_4_with_a_vector_first_is_not_4x(tmp_path):
    """The issue's case: the first input (length 2) was taken as the batch: 256 instead of 64."""
    path = _build(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [VEC, IMAGE])
    assert onnx_relu_report(path, [(2,), (1, 4, 4, 4)]).total == 64
    assert onnx_relu_report(path).total == 64


# --- torch: the same counts at batch 1 and 4 ---------------------------------------------------
class WeightRelu(nn.Module):
    """A ReLU on a weight of the given shape next to one on the activations."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(*shape))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)).flatten(1).sum(1, keepdim=True) + torch.relu(self.w).sum()


class GatedByWeight(nn.Module):
    """sigmoid(weight) scales the activations; a matmul of two weights feeds a bias."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(4, 1, 1))
        self.a, self.b = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(8, 4))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        bias = (self.a @ self.b).diagonal().view(4, 1, 1)
        return torch.relu(self.conv(x) * torch.sigmoid(self.alpha) + bias)


class VectorFirst(nn.Module):
    """Two inputs: an option vector of length 2, then the image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, v, x):
        return torch.relu(self.conv(x) * v.float().sum())


class ReluOnTheVector(VectorFirst):
    """A ReLU on the unbatched option vector alone: not per sample."""

    def forward(self, v, x):
        return torch.relu(self.conv(x)) * torch.relu(v.float()).sum()


class FilledFromWeight(nn.Module):
    """A tensor computed from a weight, then filled in place with the input: the ReLU after it is
    per sample (not a constant)."""

    def __init__(self, batch):
        super().__init__()
        self.p = nn.Parameter(torch.ones(batch, 8))

    def forward(self, x):
        h = self.p * 0
        h[:, :4] = x
        return torch.relu(h)


# name: (model, inputs at batch b, ReLUs per sample, note expected)
TORCH_CASES = {
    "relu on a (4, 32) weight": (lambda: WeightRelu((4, 32)), lambda b: torch.randn(b, 3, 8, 8), 4 * 8 * 8, True),
    "relu on a (128,) weight": (lambda: WeightRelu((128,)), lambda b: torch.randn(b, 3, 8, 8), 4 * 8 * 8, True),
    "sigmoid and matmul of weights": (GatedByWeight, lambda b: torch.randn(b, 3, 8, 8), 4 * 8 * 8, True),
    "vector input first": (VectorFirst, lambda b: (torch.tensor([1, 2]), torch.randn(b, 3, 8, 8)), 4 * 8 * 8, False),
    "relu on the vector input": (ReluOnTheVector, lambda b: (torch.tensor([1, 2]), torch.randn(b, 3, 8, 8)), 4 * 8 * 8,
                                 True),
}


@pytest.mark.parametrize("case", TORCH_CASES)
def test_torch_counts_are_the_same_at_batch_1_and_4(case):
    make, inputs, relus, noted = TORCH_CASES[case]
    torch.manual_seed(0)
    model = make()
    one, four = snl_fx.relu_count(model, inputs(1)), snl_fx.relu_count(model, inputs(4))
    assert one.total == four.total == relus
    assert [(s.name, s.shape, s.relus) for s in one.sites] == [(s.name, s.shape, s.relus) for s in four.sites]
    assert one.others == four.others and one.linear == four.linear and one.outputs == four.outputs
    assert one.notes == four.notes and ("not per sample" in _notes(one)) is noted


def test_a_relu_on_a_weight_is_reported_apart_and_never_gated():
    model, x = WeightRelu((4, 32)), torch.randn(2, 3, 8, 8)
    report = snl_fx.relu_count(model, x)
    assert [s.name for s in report.sites] == ["relu"] and report.total == 4 * 8 * 8
    assert "relu 'relu_1' (128 elements)" in _notes(report)
    gm = snl_fx.prepare(model, x)
    assert list(snl_fx.passes.get_meta(gm).gates) == ["relu"]
    assert [c.name for c in snl_fx.passes.get_meta(gm).constant] == ["relu_1"]
    result = snl_fx.linearize(model, x, 100)
    assert result.relu_count == snl_fx.relu_count(result.model, x[:1]).total == 100


def test_a_buffer_written_with_the_input_is_per_sample():
    """Data flow through in-place writes: without it the ReLU would be taken for a constant."""
    report = snl_fx.relu_count(FilledFromWeight(4), torch.randn(4, 4))
    assert report.total == 8 and "not per sample" not in _notes(report)


def test_a_batched_value_without_the_batch_in_dim_0_is_still_refused():
    """Negative: a per-sample value is never taken for a constant; one that mixes the samples is refused."""

    class Flat(nn.Module):
        def forward(self, x):
            return torch.relu(x.flatten())

    with pytest.raises(SnlFxError, match="not the batch size 2"):
        snl_fx.relu_count(Flat(), torch.randn(2, 8))


@pytest.mark.parametrize("case", ["relu on a (4, 32) weight", "sigmoid and matmul of weights"])
def test_torch_and_onnx_agree_at_batch_1_and_4(tmp_path, case):
    make, inputs, relus, _ = TORCH_CASES[case]
    torch.manual_seed(0)
    model, x = make(), inputs(4)
    exported = snl_fx.export_onnx(model, x[:1], tmp_path / "m.onnx")
    assert exported.relu_count == relus
    for batch in (1, 4):
        assert onnx_relu_report(tmp_path / "m.onnx", [(batch, 3, 8, 8)]).total == relus
        assert snl_fx.relu_count(model, x[:batch]).total == relus


def test_two_input_export_with_a_vector_first_counts_per_sample(tmp_path):
    torch.manual_seed(0)
    model, (v, x) = VectorFirst(), TORCH_CASES["vector input first"][1](4)
    exported = snl_fx.export_onnx(model, (v, x[:1]), tmp_path / "m.onnx")
    assert exported.relu_count == 4 * 8 * 8
    assert onnx_relu_report(tmp_path / "m.onnx", [(2,), (4, 3, 8, 8)]).total == 4 * 8 * 8


# --- the caller's objects are never changed ----------------------------------------------------
class CountsCalls(nn.Module):
    """A forward that counts its calls in a buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class ScalesItsInput(CountsCalls):
    """An in-place op on the input."""

    def forward(self, x):
        x.mul_(2)
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _seconds(model, x):
    return snl_fx.pi_cost(copy.deepcopy(model), x.clone()[:1]).seconds


ENTRY_POINTS = {
    "relu_count": lambda m, x: snl_fx.relu_count(m, x),
    "pi_cost": lambda m, x: snl_fx.pi_cost(m, x),
    "prepare": lambda m, x: snl_fx.prepare(m, x),
    "linearize count": lambda m, x: snl_fx.linearize(m, x, 100),
    "linearize Cost": lambda m, x: snl_fx.linearize(m, x, snl_fx.Cost(seconds=0.9 * _seconds(m, x))),
    "export_onnx": lambda m, x: snl_fx.export_onnx(m, x[:1], _TMP[0] / "m.onnx"),
}
_TMP: list = []


@pytest.mark.parametrize("make, entry", [
    pytest.param(make, entry, id=f"{make.__name__}-{entry}")
    for make in (CountsCalls, ScalesItsInput) for entry in ENTRY_POINTS
])
def test_the_callers_model_and_input_are_bit_identical_after(tmp_path, make, entry):
    _TMP[:] = [tmp_path]
    torch.manual_seed(0)
    model, x = make(), torch.randn(2, 3, 8, 8)
    state, x_before = copy.deepcopy(model.state_dict()), x.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ENTRY_POINTS[entry](model, x)
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state), [k for k in state if not torch.equal(after[k], state[k])]
    assert torch.equal(x, x_before)
    assert model.training  # the mode too


def test_trace_shares_parameters_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model[1].running_mean.uniform_()
    gm = snl_fx.passes.trace(model, torch.randn(1, 3, 8, 8), share_weights=True)
    conv, bn = gm.get_submodule("0"), gm.get_submodule("1")
    assert conv.weight is model[0].weight
    assert bn.running_mean is not model[1].running_mean and torch.equal(bn.running_mean, model[1].running_mean)
