"""PartialReLU forms (scatter, gather): same outputs, exact ReLU counts in torch and in ONNX files."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from conftest import TinyCNN, dispatch_relus_per_sample

import snl_fx
from snl_fx import passes


def lowered_tiny(granularity: str) -> tuple[torch.nn.Module, int]:
    """TinyCNN lowered with about half of every site kept (both sites partial); its ReLUs per sample."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    gm = snl_fx.prepare(TinyCNN(), x, granularity)
    for g in passes.gates(gm).values():
        g.weight.data = (torch.rand_like(g.weight) > 0.5).float()
        g.weight.data.view(-1)[:2] = torch.tensor([0.0, 1.0])  # never all or none kept
    kept = sum(passes.kept_counts(gm).values())
    return snl_fx.convert(gm).eval(), kept


def forms(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    out = {}
    for form in passes.lower.FORMS:
        out[form] = copy.deepcopy(model)
        passes.set_form(out[form], form)
    return out


@pytest.mark.parametrize("granularity", ["pixel", "channel"])
def test_forms_give_identical_outputs_and_relu_counts(granularity):
    model, kept = lowered_tiny(granularity)
    partial = [m for m in model.modules() if isinstance(m, passes.PartialReLU)]
    assert len(partial) == 2 and all(m.form == ("gather" if granularity == "channel" else "scatter") for m in partial)
    x = torch.randn(5, 1, 8, 8)
    by_form = forms(model)
    with torch.no_grad():
        outs = {f: m(x) for f, m in by_form.items()}
    assert torch.equal(outs["scatter"], outs["gather"])
    for m in by_form.values():
        assert dispatch_relus_per_sample(m, x) == kept
        assert snl_fx.relu_count(m, x[:1]).total == kept


@pytest.mark.parametrize("granularity", ["pixel", "channel"])
@pytest.mark.parametrize("profile", ["default", "pi"])
def test_onnx_files_of_both_forms_match_ort_and_count_exactly(tmp_path, granularity, profile):
    model, kept = lowered_tiny(granularity)
    x = torch.randn(1, 1, 8, 8)
    for form, m in forms(model).items():
        path = tmp_path / f"{form}.onnx"
        result = snl_fx.export_onnx(m, x, path, profile=profile)  # raises unless ORT matches and the count is exact
        assert result.relu_count == kept and result.max_abs_error <= 1e-5
        batch = 3 if profile == "default" else 1  # pi: a fixed batch size
        assert snl_fx.relu_count(str(path), input_shapes=[(batch, 1, 8, 8)]).total == kept
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        if profile == "pi" or form == "gather":  # the pi profile always writes the gather form
            assert "ScatterElements" not in ops and {"Gather", "Concat"} <= ops
        else:
            assert "ScatterElements" in ops and "Concat" not in ops


def test_unknown_form_is_refused():
    model, _ = lowered_tiny("pixel")
    with pytest.raises(passes.PassError, match="form must be one of"):
        passes.set_form(model, "mask")
