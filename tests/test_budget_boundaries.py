"""Budgets at their edges: a Cost already met, resume across budgets of equal ReLU ceiling, a Cost with channel
gates or skipped sites, refine under a Cost, binarize with no room or negative room."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import dispatch_relus_per_sample

from test_cost_budget import CRYPTEN, SITE, SITE_ROUNDS, setup  # Tiny: two ReLU sites of 4x6x6, toy data

import snl_fx
from snl_fx import Cost, SnlFxError

FAST = dict(epochs=1, finetune_epochs=1, batch_size=16, progress=False)

pytestmark = pytest.mark.filterwarnings("ignore:the gates reached")  # 1-2 epochs: binarized to the budget anyway


def full_cost(model: nn.Module, x: torch.Tensor, protocol: str = "crypten", network: str = "wan"):
    return snl_fx.pi_cost(model, x[:1], protocol, network)


# ---- a Cost the original model already meets
@pytest.mark.parametrize("factor", [1.0, 1.5])  # 1.0: exactly the model's own predicted cost, met with nothing removed
@pytest.mark.parametrize("unit", ["seconds", "bytes", "rounds"])
def test_cost_met_by_the_original_model_returns_it_unchanged(unit, factor):
    model, x, data = setup()
    full = full_cost(model, x)
    limit = factor * getattr(full, unit)
    with pytest.warns(UserWarning, match="nothing to remove"):
        result = snl_fx.linearize(model, x, Cost(**{unit: limit}), data, **FAST)
    assert result.method == "unchanged" and result.history == []
    assert result.relu_count == result.relu_count_before == 2 * SITE
    assert result.sites == {"relu": {"before": SITE, "after": SITE}, "relu_1": {"before": SITE, "after": SITE}}
    assert result.cost["before"] == result.cost["after"] == {"bytes": full.bytes, "rounds": full.rounds,
                                                             "seconds": full.seconds}
    assert result.cost["met"] is True
    with torch.no_grad():
        assert torch.equal(result.model(x), model.eval()(x))


# ---- resume: the checkpoint's budget must be the same budget, not only the same ReLU ceiling
def test_resume_refuses_a_budget_of_equal_relu_ceiling(tmp_path):
    model, x, data = setup()
    rounds = full_cost(model, x).rounds
    # one site's rounds fewer (and half a round to spare) or exactly that: either way one site goes
    first, other_limit = Cost(rounds=rounds - SITE_ROUNDS + 0.5), Cost(rounds=rounds - SITE_ROUNDS)
    other_penalty = Cost(rounds=rounds - SITE_ROUNDS + 0.5, penalty="drop")
    ceilings = {snl_fx.linearize(model, x, b, None).budget for b in (first, other_limit, other_penalty)}
    assert ceilings == {SITE}  # the precondition: a check of the ReLU ceiling alone would let them resume
    snl_fx.linearize(model, x, first, data, out_dir=tmp_path, **FAST)

    for budget in (other_limit, other_penalty, SITE):  # SITE: a count budget equal to the Cost's ceiling
        with pytest.raises(SnlFxError) as err:
            snl_fx.linearize(model, x, budget, data, out_dir=tmp_path, resume=True, **FAST)
        message = str(err.value)
        assert "checkpoint" in message and "\n" not in message, message
        assert f"{first.rounds:g}" in message, message  # it names the checkpoint's budget
    resumed = snl_fx.linearize(model, x, first, data, out_dir=tmp_path, resume=True, **FAST)  # the same budget goes on
    assert resumed.cost["met"] and resumed.relu_count == SITE


# ---- a Cost with channel gates, and a Cost with skipped sites
@pytest.mark.parametrize("unit", ["seconds", "bytes"])
def test_cost_with_channel_gates_ends_under_its_cost(unit):
    model, x, data = setup()
    limit = 0.6 * getattr(full_cost(model, x), unit)
    result = snl_fx.linearize(model, x, Cost(**{unit: limit}), data, granularity="channel", epochs=2,
                              finetune_epochs=1, batch_size=16, progress=False)
    assert getattr(full_cost(result.model, x), unit) <= limit
    assert result.cost["met"] and result.granularity == "channel"
    assert all(s["after"] % (6 * 6) == 0 for s in result.sites.values())  # whole 6x6 channels kept or removed
    assert result.relu_count == snl_fx.relu_count(result.model, x[:1]).total == dispatch_relus_per_sample(result.model, x)
    assert result.relu_count == sum(s["after"] for s in result.sites.values()) < 2 * SITE


def test_cost_with_a_skipped_site_keeps_it_and_ends_under_its_cost():
    model, x, data = setup()
    full = full_cost(model, x)
    limit = full.bytes - CRYPTEN.bytes["relu"] * SITE / 2  # about half of relu_1's ReLUs must go; relu is skipped
    result = snl_fx.linearize(model, x, Cost(bytes=limit), data, skip=["relu"], epochs=2, finetune_epochs=1,
                              batch_size=16, progress=False)
    assert full_cost(result.model, x).bytes <= limit
    assert result.cost["met"]
    assert result.sites["relu"] == {"before": SITE, "after": SITE}  # the skipped site is a plain ReLU still
    assert result.sites["relu_1"]["after"] < SITE
    assert result.relu_count == snl_fx.relu_count(result.model, x[:1]).total == dispatch_relus_per_sample(result.model, x)
    assert result.relu_count == SITE + result.sites["relu_1"]["after"]


# ---- refine under a Cost
def test_refine_under_a_cost_warns_that_it_is_not_applied():
    model, x, data = setup()
    budget = Cost(rounds=full_cost(model, x).rounds - SITE_ROUNDS)
    with pytest.warns(UserWarning, match="refine"):
        result = snl_fx.linearize(model, x, budget, data, refine=True, **FAST)
    assert result.cost["met"]


# ---- binarize with no room left and with negative room
def test_binarize_with_no_room_left_closes_every_gate():
    model, x, _ = setup()
    gm = snl_fx.prepare(model, x, skip=["relu"])  # relu stays a plain ReLU: SITE ReLUs no gate can remove
    assert snl_fx.binarize(gm, SITE) == SITE
    (gate,) = snl_fx.gate_parameters(gm)
    assert not gate.requires_grad and bool((gate == 0).all())
    assert snl_fx.relu_count(snl_fx.convert(gm), x[:1]).total == SITE


def test_binarize_with_negative_room_is_a_one_line_error():
    model, x, _ = setup()
    gm = snl_fx.prepare(model, x, skip=["relu"])
    with pytest.raises(SnlFxError) as err:
        snl_fx.binarize(gm, SITE - 1)
    message = str(err.value)
    assert "\n" not in message and str(SITE) in message and str(SITE - 1) in message, message


def test_a_checkpoint_key_from_before_gated_sites_were_recorded_still_matches():
    """Checkpoints written before keys named the gated sites (runs/demo of an earlier version) resume."""
    from snl_fx.budget import bind

    model, x, _ = setup()
    plan = bind(40, snl_fx.prepare(model, x))
    older = {k: v for k, v in plan.key.items() if k != "gated"}
    assert plan.matches(plan.key) and plan.matches(older)
    assert not plan.matches({**older, "relus": 41}) and not plan.matches({**plan.key, "gated": ["relu"]})
