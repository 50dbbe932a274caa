"""Cost budgets refuse what they cannot price, parse units with their case, and plan before training."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from test_cost_budget import setup  # Tiny: two ReLU sites of 4x6x6, toy data

import snl_fx
from snl_fx import Cost, SnlFxError
from snl_fx.budget import Relus, as_budget

FAST = dict(epochs=1, finetune_epochs=1, batch_size=16, progress=False)
pytestmark = pytest.mark.filterwarnings("ignore:the gates reached")


def test_spu_semi2k_bytes_budget_is_met():
    """Its fitted fixed cost per ReLU layer is slightly negative: that must not refuse the budget."""
    model, x, data = setup()
    full = snl_fx.pi_cost(model, x[:1], "spu-semi2k")
    budget = Cost(bytes=0.9 * full.bytes, protocol="spu-semi2k")
    result = snl_fx.linearize(model, x, budget, data, **FAST)
    after = snl_fx.pi_cost(result.model, x[:1], "spu-semi2k")
    assert result.cost["met"] and after.bytes <= budget.limit < full.bytes
    assert snl_fx.relu_count(result.model, x[:1]).total == result.relu_count


@pytest.mark.parametrize(
    ("model", "protocol", "unpriced"),
    [
        (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 1, 1), nn.Flatten(), nn.Linear(144, 3)),
         "spu-semi2k", "maxpool9"),
        (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)), "delphi", "Conv2d"),
    ],
)
def test_a_cost_that_cannot_price_a_layer_refuses_before_training(model, protocol, unpriced):
    _, x, data = setup()
    assert any(la.bytes is None for la in snl_fx.pi_cost(model, x[:1], protocol).layers)
    with pytest.raises(SnlFxError, match=rf"^{protocol} cannot price \d+ layer\(s\) of this model: .*\({unpriced}\)") as err:
        snl_fx.linearize(model, x, Cost(bytes=1e9, protocol=protocol), data, **FAST)
    assert "\n" not in str(err.value)


def test_an_infeasible_cost_is_refused_before_any_training(monkeypatch):
    model, x, data = setup()
    linear_only = snl_fx.pi_cost(model, x[:1], "spu-cheetah").by_kind()["linear"]["bytes"]

    def no_training(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr("snl_fx.lifecycle.train_gates", no_training)
    with pytest.raises(SnlFxError, match="cannot be met: the model costs"):
        snl_fx.linearize(model, x, Cost(bytes=0.5 * linear_only, protocol="spu-cheetah"), data, **FAST)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("800Mb", Cost(bytes=1e8)), ("800MB", Cost(bytes=8e8)), ("64kb", Cost(bytes=8e3)), ("1Gb", Cost(bytes=1.25e8)),
     ("1000000B", Cost(bytes=1e6)), ("1.5S", Cost(seconds=1.5)), ("150Rounds", Cost(rounds=150.0)),
     ("15000", Relus(15000)), ("5%", Relus(0.05)), ("1e-2", Relus(0.01))],
)
def test_one_parser_keeps_the_case_of_traffic_units(text, expected):
    assert as_budget(text) == expected


@pytest.mark.parametrize("text", ["800mb", "2gb", "1.5", "0", "5 parsecs", "-3"])
def test_ambiguous_or_bad_budgets_are_one_line_errors(text):
    with pytest.raises(SnlFxError) as err:
        as_budget(text)
    assert "\n" not in str(err.value)


def test_the_api_takes_the_cli_spellings():
    model, x, _ = setup()
    by_text = snl_fx.linearize(model, x, "10%")
    by_number = snl_fx.linearize(model, x, 0.1)
    assert by_text.relu_count == by_number.relu_count == round(0.1 * 288)
    assert all(torch.equal(a, b) for a, b in zip(by_text.model.state_dict().values(), by_number.model.state_dict().values()))


def test_resume_under_another_penalty_is_refused(tmp_path):
    model, x, data = setup()
    seconds = 0.8 * snl_fx.pi_cost(model, x[:1]).seconds
    snl_fx.linearize(model, x, Cost(seconds=seconds), data, out_dir=tmp_path, **FAST)
    with pytest.raises(SnlFxError, match="is for budget"):
        snl_fx.linearize(model, x, Cost(seconds=seconds, penalty="drop"), data, out_dir=tmp_path, resume=True, **FAST)


def test_the_checkpoint_records_true_relus_under_a_cost(tmp_path):
    model, x, data = setup()
    result = snl_fx.linearize(model, x, Cost(seconds=0.8 * snl_fx.pi_cost(model, x[:1]).seconds), data,
                              out_dir=tmp_path, **FAST)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["relu_count"] == result.relu_count == sum(s["after"] for s in result.sites.values())
    assert state["budget"]["relus"] == result.budget and state["budget"]["unit"] == "seconds"


def test_a_cost_already_met_with_skip_does_not_train(monkeypatch):
    model, x, data = setup()
    monkeypatch.setattr("snl_fx.lifecycle.train_gates", lambda *a, **k: pytest.fail("trained"))
    with pytest.warns(UserWarning, match="nothing to remove"):
        result = snl_fx.linearize(model, x, Cost(seconds=2 * snl_fx.pi_cost(model, x[:1]).seconds), data,
                                  skip=["relu"], **FAST)
    assert result.method == "unchanged" and result.relu_count == 288


def test_resuming_the_fine_tune_twice_keeps_the_true_count(tmp_path):
    model, x, data = setup()
    snl_fx.linearize(model, x, 50, data, out_dir=tmp_path, **FAST)
    for epochs in (2, 3):
        result = snl_fx.linearize(model, x, 50, data, out_dir=tmp_path, resume=True, **{**FAST, "finetune_epochs": epochs})
        assert [h["relu_count"] for h in result.history if h["phase"] == "finetune"] == [50] * epochs
        assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["relu_count"] == 50


def test_resume_with_another_skip_is_refused(tmp_path):
    model, x, data = setup()
    snl_fx.linearize(model, x, 150, data, out_dir=tmp_path, **FAST)
    with pytest.raises(SnlFxError, match="is for budget"):
        snl_fx.linearize(model, x, 150, data, out_dir=tmp_path, resume=True, skip=["relu"], **FAST)


class ReluAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.fc = nn.Linear(4 * 8, 3)

    def forward(self, x):
        q, k, v = torch.relu(self.qkv(x)).chunk(3, -1)
        return self.fc(torch.nn.functional.scaled_dot_product_attention(q, k, v).flatten(1))


def test_a_cost_prices_the_graph_pi_cost_prices():
    """prepare decomposes attention as the inspector does: the softmax SDPA hides is priced, never free."""
    torch.manual_seed(0)
    model, x = ReluAttention(), torch.randn(4, 4, 8)
    gm = snl_fx.prepare(model, x)
    assert any(o.kind == "softmax" for o in snl_fx.passes.get_meta(gm).others)
    for protocol in snl_fx.cost.protocols():
        full = snl_fx.pi_cost(model, x[:1], protocol)
        if full.complete:
            plan = Cost(bytes=2 * full.bytes, protocol=protocol).plan(gm)
            assert plan.pi_cost().bytes == full.bytes and plan.pi_cost().rounds == full.rounds
        else:
            with pytest.raises(SnlFxError, match=r"cannot price \d+ layer\(s\) of this model"):
                Cost(bytes=1e12, protocol=protocol).plan(gm)
