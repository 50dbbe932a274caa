"""Cost(penalty="sites"): the sites are chosen first on validation data, among selections that include
layer culling's whole-site answer; the gates then train inside the kept sites only (issue 20)."""

from __future__ import annotations

import pytest
import torch
from test_cost_budget import SITE, Tiny

import snl_fx
from snl_fx import Cost, SnlFxError, passes
from snl_fx.select import best_selection, selection_masks, site_criticality


def _setup() -> tuple[torch.nn.Module, torch.Tensor, torch.utils.data.Dataset]:
    """Tiny whose second site never sees a negative input (linearizing it changes nothing), labelled
    by its own outputs: the first site is the one the model needs."""
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.c2.weight.abs_()  # relu(c1) >= 0, weights >= 0, bias > 0: the second site's input is positive
        model.c2.bias.fill_(0.1)
        model.fc.weight.mul_(3.0)
    x = torch.randn(96, 1, 6, 6)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x[:8], torch.utils.data.TensorDataset(x, y)


def _one_site_cost(model: torch.nn.Module, x: torch.Tensor, penalty: str = "sites") -> Cost:
    """Seconds for exactly one whole site; on a 10 Mbit/s link without RTT a site costs about 110
    ReLUs' worth, so two sites of 34 ReLUs in all are within it too."""
    plan = Cost(seconds=1.0, network="10,0").plan(snl_fx.prepare(model, x))
    return Cost(seconds=plan.base + plan.per_site + SITE * plan.per_relu, network="10,0", penalty=penalty)


def test_criticality_finds_the_site_the_model_needs():
    model, x, data = _setup()
    crit = site_criticality(snl_fx.prepare(model, x), data)
    assert crit["relu_1"] == {"loss": pytest.approx(0.0, abs=1e-6), "accuracy": 0.0}
    assert crit["relu"]["loss"] > 0


def test_candidates_hold_the_whole_site_answer_and_the_choice_takes_it():
    model, x, data = _setup()
    gm = snl_fx.prepare(model, x)
    plan = _one_site_cost(model, x).plan(gm)
    candidates = plan.site_candidates(gm, site_criticality(gm, data), snl_fx.linearization_scores(gm, x))
    kept = [{n: int(m.sum()) for n, m in c.items()} for c in candidates]
    assert {"relu": SITE, "relu_1": 0} in kept  # culling's answer: the most critical site, whole
    # the two sites open, thinner (the second is worth nothing here, so both fills give its ReLUs to the first)
    assert {"relu": plan.open_relus(["relu", "relu_1"]), "relu_1": 0} in kept
    for c in candidates:  # every candidate is within the Cost
        assert plan.value({n: int(m.sum()) for n, m in c.items()}) <= plan.budget.limit + 1e-9
    best, losses = best_selection(gm, data, candidates)
    assert kept[best] == {"relu": SITE, "relu_1": 0} and len(losses) == len(candidates)
    calibrated, _ = best_selection(gm, data, candidates, calibrate=data)  # on copies: gm stays as it is
    assert kept[calibrated] == {"relu": SITE, "relu_1": 0}
    assert all(bool(g.weight.eq(1).all()) for g in passes.gates(gm).values())  # gates restored


def test_linearize_with_sites_keeps_the_best_whole_site_within_the_cost():
    model, x, data = _setup()
    budget = _one_site_cost(model, x)
    result = snl_fx.linearize(model, x, budget, data, val_data=data, epochs=2, finetune_epochs=1, batch_size=16,
                              progress=False)
    assert {n: s["after"] for n, s in result.sites.items()} == {"relu": SITE, "relu_1": 0}
    assert result.cost["met"] and result.cost["site_choice"]["open_sites"] == ["relu"]
    gates = [h for h in result.history if h["phase"] == "gates"]
    tuned = [h for h in result.history if h["phase"] == "finetune"]
    assert gates == [] and len(tuned) == 2 + 1  # the kept site is whole: no gate epoch, all of them fine-tune
    assert result.relu_count == snl_fx.relu_count(result.model, x[:1]).total


def test_selection_masks_leave_the_model_as_it_was():
    model, x, _ = _setup()
    gm = snl_fx.prepare(model, x)
    masks = selection_masks(gm, 10, snl_fx.linearization_scores(gm, x))
    assert sum(int(m.sum()) for m in masks.values()) == 10
    assert all(g.weight.requires_grad and bool(g.weight.eq(1).all()) for g in passes.gates(gm).values())


def test_sites_objective_needs_the_choice_first_and_train_gates_makes_it():
    model, x, data = _setup()
    gm = snl_fx.prepare(model, x)
    plan = _one_site_cost(model, x).plan(gm)
    with pytest.raises(SnlFxError, match="chooses its sites on data before the gate phase"):
        plan.objective(gm)
    records = snl_fx.train_gates(gm, data, plan, snl_fx.TrainConfig(epochs=1, batch_size=16, progress=False))
    assert records == [] and plan.open_sites == ["relu"]  # the chosen selection meets the objective already
    assert snl_fx.binarize(gm, plan) == SITE and snl_fx.site_relu_counts(gm) == {"relu": SITE, "relu_1": 0}


def test_sites_is_the_default_formulation():
    assert Cost(seconds=1.0).penalty == "sites"


def test_resume_of_a_sites_run_is_bit_exact(tmp_path):
    from test_snl import _interrupt_after_checkpoints

    model, x, data = _setup()
    opts = dict(val_data=data, epochs=2, finetune_epochs=1, batch_size=16, progress=False)
    budget = _one_site_cost(model, x)
    straight = snl_fx.linearize(model, x, budget, data, out_dir=tmp_path / "a", **opts)
    with pytest.raises(KeyboardInterrupt):  # after the first of 3 fine-tune epochs (2 of them moved)
        _interrupt_after_checkpoints(1, lambda: snl_fx.linearize(model, x, budget, data, out_dir=tmp_path / "b", **opts))
    resumed = snl_fx.linearize(model, x, budget, data, out_dir=tmp_path / "b", resume=True, **opts)
    for (k, a), b in zip(straight.gated.state_dict().items(), resumed.gated.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["moved_epochs"] for h in resumed.history] == [2, 2, 2]
