"""Issue 17, group 1: valid models are accepted and never silently changed.

* One rule of which ops compute a ReLU (``snl_fx.relu_rule``), read by the compiler and by the ONNX
  inspector: ``clamp(min=0)`` with no max, in every spelling, is a ReLU site that is gated, lowered,
  exported and counted the same on both sides; any other clamp stays a look-alike.
* An in-place ReLU that would change another tensor (a view, an alias) read after it is refused
  in one line that names the site; one whose aliases are never read again (or only disjoint
  parts of them) is de-inplaced and works.
* ``prepare`` checks that the prepared model computes what the original computes, without
  changing the caller's model or example input.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import snl_fx
from snl_fx import gated, passes
from snl_fx.errors import SnlFxError
from snl_fx.relu_rule import clamp_kind

C, H, W = 4, 4, 4
SITE = C * H * W  # ReLUs per sample at the one conv-sized site


class ConvAct(nn.Module):
    """conv -> act -> conv -> ReLU -> linear: two sites of C*H*W ReLUs, the first one ``act``."""

    def __init__(self, act):
        super().__init__()
        self.act = act
        self.c1, self.c2 = nn.Conv2d(3, C, 3, padding=1), nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)
        self.fc = nn.Linear(SITE, 5)

    def forward(self, x):
        h = self.act(self.bn(self.c1(x)))
        return self.fc(torch.relu(self.c2(h)).flatten(1))


class _Module(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# every spelling of clamp(min=0), no max: (name, activation, the site's op)
RELU_CLAMPS = [
    ("torch.clamp", lambda x: torch.clamp(x, min=0), "torch.clamp(min=0)"),
    ("torch.clamp_positional", lambda x: torch.clamp(x, 0), "torch.clamp(min=0)"),
    ("torch.clamp_max_None", lambda x: torch.clamp(x, 0.0, None), "torch.clamp(min=0)"),
    ("torch.clamp_max_inf", lambda x: torch.clamp(x, min=0, max=float("inf")), "torch.clamp(min=0)"),
    ("torch.clip", lambda x: torch.clip(x, min=0), "torch.clip(min=0)"),
    ("torch.clamp_min", lambda x: torch.clamp_min(x, 0), "torch.clamp_min(min=0)"),
    ("Tensor.clamp", lambda x: x.clamp(min=0), "Tensor.clamp(min=0)"),
    ("Tensor.clip", lambda x: x.clip(0), "Tensor.clip(min=0)"),
    ("Tensor.clamp_min", lambda x: x.clamp_min(0), "Tensor.clamp_min(min=0)"),
    ("torch.clamp_", lambda x: torch.clamp_(x, min=0), "torch.clamp_(min=0)"),
    ("torch.clamp_min_", lambda x: torch.clamp_min_(x, 0), "torch.clamp_min_(min=0)"),
    ("Tensor.clamp_", lambda x: x.clamp_(min=0), "Tensor.clamp_(min=0)"),
    ("Tensor.clamp_min_", lambda x: x.clamp_min_(0), "Tensor.clamp_min_(min=0)"),
    ("Tensor.clip_", lambda x: x.clip_(min=0), "Tensor.clip_(min=0)"),
]


def _x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(0))


def _model(act) -> nn.Module:
    torch.manual_seed(0)
    return ConvAct(_Module(act)).eval()


@pytest.mark.parametrize("name, act, op", RELU_CLAMPS, ids=[c[0] for c in RELU_CLAMPS])
def test_clamp_min_0_is_a_relu_site_gated_lowered_exported_and_counted(tmp_path, name, act, op):
    model, x = _model(act), _x()
    gm = snl_fx.prepare(model, x)
    sites = passes.get_meta(gm).sites
    assert [(s.op, s.numel) for s in sites] == [(op, SITE), ("torch.relu", SITE)]
    assert snl_fx.relu_count(model, x).total == 2 * SITE
    assert gated.max_abs_diff(model, gm, x) == 0.0  # all gates open == the original
    keep = SITE + 7
    assert snl_fx.binarize(gm, keep) == keep
    lowered = snl_fx.convert(gm).eval()
    assert gated.max_abs_diff(gm, lowered, x) == 0.0
    result = snl_fx.export_onnx(lowered, x[:1], tmp_path / "m.onnx")  # checks ONNX Runtime == torch
    assert snl_fx.relu_count(tmp_path / "m.onnx").total == snl_fx.relu_count(lowered, x[:1]).total == keep
    assert result.relu_count == keep
    # unchanged, the original model exports and both inspectors agree (the "512 vs 256")
    assert snl_fx.export_onnx(model, x[:1], tmp_path / "orig.onnx").relu_count == 2 * SITE


@pytest.mark.parametrize("name, act", [(c[0], c[1]) for c in RELU_CLAMPS[::3]], ids=[c[0] for c in RELU_CLAMPS[::3]])
def test_linearize_one_shot_meets_the_budget_exactly_with_clamp(tmp_path, name, act):
    model, x = _model(act), _x()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    budget = SITE // 2 + 3
    result = snl_fx.linearize(model, x, budget)
    assert result.relu_count == budget and result.relu_count_before == 2 * SITE
    assert snl_fx.export_onnx(result.model, x[:1], tmp_path / "m.onnx").relu_count == budget
    assert snl_fx.relu_count(tmp_path / "m.onnx").total == snl_fx.relu_count(result.model, x[:1]).total == budget
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# clamps that are not a ReLU: (name, activation, kind reported by both inspectors)
LOOK_ALIKES = [
    ("min_0.1", lambda x: torch.clamp(x, min=0.1), "clamp"),
    ("min_-1", lambda x: x.clamp(min=-1.0), "clamp"),
    ("clamp_min_0.5", lambda x: torch.clamp_min(x, 0.5), "clamp"),
    ("0_6", lambda x: torch.clamp(x, 0, 6), "relu6"),
    ("max_only", lambda x: torch.clamp(x, max=0), "clamp"),
    ("0_1", lambda x: x.clip(0, 1), "clamp"),
]


@pytest.mark.parametrize("name, act, kind", LOOK_ALIKES, ids=[c[0] for c in LOOK_ALIKES])
def test_other_clamps_stay_look_alikes_on_both_sides(tmp_path, name, act, kind):
    model, x = _model(act), _x()
    gm = snl_fx.prepare(model, x)
    assert [s.op for s in passes.get_meta(gm).sites] == ["torch.relu"]
    report = snl_fx.relu_count(model, x)
    assert report.total == SITE and report.other_totals() == {kind: SITE}
    snl_fx.binarize(gm, 10)
    lowered = snl_fx.convert(gm).eval()
    snl_fx.export_onnx(lowered, x[:1], tmp_path / "m.onnx")
    onnx_report = snl_fx.relu_count(tmp_path / "m.onnx")
    assert onnx_report.total == snl_fx.relu_count(lowered, x[:1]).total == 10
    assert onnx_report.other_totals().get(kind) == SITE


@pytest.mark.parametrize("lo, hi, kind", [
    (0, None, "relu"), (0.0, float("inf"), "relu"), (-0.0, None, "relu"), (None, None, None),
    (0.1, None, "clamp"), (0, 6, "relu6"), (0.0, 6.0, "relu6"), (0, 1, "clamp"), (None, 0, "clamp"),
    (float("-inf"), None, None), ("dynamic", None, "clamp"), (0, "dynamic", "clamp"), (True, None, "clamp"),
])
def test_the_one_clamp_rule(lo, hi, kind):
    assert clamp_kind(lo, hi) == kind


def test_the_rule_imports_nothing():
    """Both the compiler and the torch-free ONNX inspector read it."""
    tree = ast.parse(Path(snl_fx.relu_rule.__file__).read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [getattr(n, "module", None) for n in imports] == ["__future__"]


def test_skipped_clamp_site_counts_the_same_in_onnx(tmp_path):
    """A clamp(min=0) site left ungated by ``skip`` stays a clamp: exported as Clip/Max, still a ReLU."""
    model, x = _model(lambda x: torch.clamp(x, min=0)), _x()
    gm = snl_fx.prepare(model, x, skip=["act.relu"])
    assert list(snl_fx.gates(gm)) == ["relu"]
    snl_fx.binarize(gm, SITE + 5)
    lowered = snl_fx.convert(gm).eval()
    snl_fx.export_onnx(lowered, x[:1], tmp_path / "m.onnx")
    assert snl_fx.relu_count(tmp_path / "m.onnx").total == snl_fx.relu_count(lowered, x[:1]).total == SITE + 5


# --- in-place ReLUs and aliases -------------------------------------------------------------


class Lin(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.l, self.l2 = nn.Linear(4, 4), nn.Linear(4, 3)
        self.relu_ip, self.ident = nn.ReLU(inplace=True), nn.Identity()
        self.body = body

    def forward(self, x):
        return self.l2(self.body(self, self.l(x)))


# refused: the ReLU writes through a view (or alias) of a tensor read after it
ALIASED = [
    ("relu_on_slice", lambda m, h: (torch.relu_(h[:, :2]), h)[1]),
    ("nn.ReLU_inplace_on_view", lambda m, h: (m.relu_ip(h.view(-1, 2, 2)), h * 2)[1]),
    ("F.relu_inplace_on_slice", lambda m, h: (F.relu(h[:, 1:], inplace=True), h + 1)[1]),
    ("method_relu_on_transpose", lambda m, h: (h.view(-1, 2, 2).transpose(1, 2).relu_(), h)[1]),
    ("clamp_on_slice", lambda m, h: (h[:, :2].clamp_(min=0), h)[1]),
    ("base_relu_viewed_before", lambda m, h: (lambda v: (torch.relu_(h), torch.cat([v, v], 1))[1])(h[:, :2])),
    ("relu_on_identity_alias", lambda m, h: (lambda a: (torch.relu_(a), h - 1)[1])(m.ident(h))),
]


@pytest.mark.parametrize("name, body", ALIASED, ids=[c[0] for c in ALIASED])
def test_inplace_relu_through_a_view_is_refused_in_one_line(name, body):
    torch.manual_seed(0)
    model, x = Lin(body).eval(), torch.randn(8, 4)
    before, x_before = copy.deepcopy(model.state_dict()), x.clone()
    with pytest.raises(SnlFxError, match=r"^site \S+ applies an in-place ReLU .* write the ReLU out of place") as err:
        snl_fx.prepare(model, x)
    assert "\n" not in str(err.value)
    assert torch.equal(x, x_before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# accepted: in-place, but no other tensor sharing the written elements is read afterwards
DE_INPLACED = [
    ("relu_on_slice_base_unused", lambda m, h: torch.relu_(h[:, :2]).repeat(1, 2)),
    ("chunk_disjoint_other_half",
     lambda m, h: (lambda t: torch.cat([F.relu(t[0], inplace=True), t[1]], 1))(h.chunk(2, 1))),
    ("view_then_inplace_relu_result_read", lambda m, h: m.relu_ip(h.view(-1, 2, 2)).flatten(1)),
    ("inplace_relu_then_base_read", lambda m, h: (torch.relu_(h), h + 1)[1]),
    ("iadd_then_inplace_relu", lambda m, h: m.relu_ip(h.__iadd__(1.0))),
    ("advanced_index_copy", lambda m, h: torch.cat([torch.relu_(h[:, [0, 1]]), h[:, 2:]], 1)),
]


@pytest.mark.parametrize("name, body", DE_INPLACED, ids=[c[0] for c in DE_INPLACED])
def test_inplace_relu_without_live_aliases_is_de_inplaced_and_linearizes(tmp_path, name, body):
    torch.manual_seed(0)
    model, x = Lin(body).eval(), torch.randn(8, 4)
    x_before = x.clone()
    gm = snl_fx.prepare(model, x)
    assert gated.max_abs_diff(model, gm, x) == 0.0
    total = gated.total_relus(gm)
    result = snl_fx.linearize(model, x, total - 1)
    assert result.relu_count == total - 1
    assert snl_fx.export_onnx(result.model, x[:1], tmp_path / "m.onnx").relu_count == total - 1
    assert snl_fx.relu_count(tmp_path / "m.onnx").total == total - 1
    assert torch.equal(x, x_before)


def test_the_pass_itself_refuses_and_names_the_view():
    class M(nn.Module):
        def forward(self, x):
            h = x * 2
            torch.relu_(h[:, :2])
            return h

    gm = passes.find_relus(passes.trace(M(), torch.randn(3, 4)))
    with pytest.raises(passes.PassError, match=r"site relu applies an in-place ReLU \(torch.relu_\) to `getitem`, "
                                                r"which shares memory with `mul`"):
        passes.make_out_of_place(gm)


# --- the guard: the prepared model computes what the original computes -----------------------


class Counter(nn.Module):
    """Its output depends on how often forward ran: the traced graph freezes the first count."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.relu(self.bn(self.c(x))) * self.calls


def test_guard_refuses_a_prepared_model_that_differs_and_changes_nothing(monkeypatch):
    """A de-inplacing that misses an alias (here: the alias check is switched off) is still caught."""
    torch.manual_seed(0)
    model, x = Lin(ALIASED[0][1]).train(), torch.randn(8, 4)
    model.register_buffer("seen", torch.zeros(3))
    before, x_before = copy.deepcopy(model.state_dict()), x.clone()
    monkeypatch.setattr(passes.gate, "_tensor_memory", lambda gm: None)
    with pytest.raises(SnlFxError, match=r"differs from the original by .* likely at the in-place ReLU site\(s\) relu"):
        snl_fx.prepare(model, x)
    assert torch.equal(x, x_before) and model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_guard_runs_on_copies_batchnorm_stats_and_python_state_untouched():
    torch.manual_seed(0)
    model, x = Counter().train(), _x()
    before = copy.deepcopy(model.state_dict())
    gm = snl_fx.prepare(model, x)
    assert model.calls == 0 and model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(snl_fx.gates(gm)) == 1


def test_guard_names_no_site_when_the_trace_itself_differs():
    class TraceAware(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            scale = 2.0 if torch.fx._symbolic_trace.is_fx_tracing() else 1.0  # the graph bakes in 2.0
            return torch.relu(self.l(x)) * scale

    with pytest.raises(SnlFxError, match="differs from the original by .*the traced graph computes something else"):
        snl_fx.prepare(TraceAware(), torch.randn(3, 4))


def test_guard_lets_a_model_with_noise_in_forward_through():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.l(x)) + torch.randn_like(x)

    assert len(snl_fx.gates(snl_fx.prepare(Noisy(), torch.randn(3, 4)))) == 1


def test_guard_compares_every_leaf_of_tuple_and_dict_outputs():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            h = self.l(x)
            y = torch.relu(h)
            return {"a": y, "b": (h.argmax(1), y.sum(1) > 0)}

    gm = snl_fx.prepare(Heads(), torch.randn(3, 4))
    assert len(snl_fx.gates(gm)) == 1
    assert gated._output_diff({"a": torch.ones(2), "b": (torch.ones(2, dtype=torch.long),)},
                              {"a": torch.ones(2), "b": (torch.zeros(2, dtype=torch.long),)}) == float("inf")


# --- integers: a clamp of indices is no activation, on either side -------------------------------


class IndexClamp(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.l = nn.Embedding(10, 4), nn.Linear(4, 4)

    def forward(self, idx):
        return torch.relu(self.l(self.e((idx - 2).clamp(min=0))))


def test_a_clamp_of_integers_is_no_relu_site_and_both_sides_agree(tmp_path):
    model, x = IndexClamp().eval(), torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(0))
    gm = snl_fx.prepare(model, x)
    assert [s.op for s in passes.get_meta(gm).sites] == ["torch.relu"]
    assert snl_fx.relu_count(model, x).total == 5 * 4
    assert snl_fx.export_onnx(model, x[:1], tmp_path / "m.onnx").relu_count == 5 * 4


def _onnx_file(tmp_path, node, elem, extra=()):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    np_type = onnx.helper.tensor_dtype_to_np_dtype(elem)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", elem, [1, 3, 4])],
        [helper.make_tensor_value_info("y", elem, [1, 3, 4])],
        [numpy_helper.from_array(np.array(v, np_type), n) for n, v in extra],
    )
    path = tmp_path / "t.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("elem_name, relus", [("FLOAT", 12), ("DOUBLE", 12), ("INT64", 0), ("INT32", 0)])
@pytest.mark.parametrize("op", ["Clip", "Max"])
def test_onnx_clip_and_max_of_integers_are_no_relu(tmp_path, op, elem_name, relus):
    import onnx
    from onnx import helper

    elem = getattr(onnx.TensorProto, elem_name)
    node = helper.make_node(op, ["x", "zero"], ["y"])
    report = snl_fx.relu_count(_onnx_file(tmp_path, node, elem, [("zero", 0)]))
    assert report.total == relus
    assert report.other_totals() == ({} if relus else {"clamp" if op == "Clip" else "max": 12})
