"""Budgets in cost units: Cost parsing and errors, cost-budget runs, the group term, count mode unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import passes
import snl_fx
from snl_fx import Cost, SnlFxError, parse_cost


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


def setup() -> tuple[nn.Module, torch.Tensor, torch.utils.data.Dataset]:
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(8, 1, 6, 6)
    data = torch.utils.data.TensorDataset(torch.randn(96, 1, 6, 6), torch.randint(0, 3, (96,)))
    return model, x, data


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "a Cost needs exactly one of seconds, bytes or rounds, got none"),
        ({"seconds": 1.0, "bytes": 2e6}, "a Cost needs exactly one of seconds, bytes or rounds, got ['seconds', 'bytes']"),
        ({"seconds": -1.0}, "a Cost's seconds must be a positive number, got -1.0"),
        ({"rounds": 0}, "a Cost's rounds must be a positive number, got 0"),
        ({"bytes": 1e6, "protocol": "nope"}, "unknown protocol 'nope'; choose one of:"),
        ({"seconds": 1.0, "network": "fast"}, "network must be lan, wan or MBPS,RTT_MS"),
        ({"seconds": 1.0, "penalty": "l2"}, "Cost penalty must be one of ('group', 'drop'), got 'l2'"),
    ],
)
def test_cost_errors_are_one_line(kwargs, message):
    with pytest.raises(SnlFxError) as err:
        Cost(**kwargs)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "unit", "limit"),
    [("1.5s", "seconds", 1.5), ("800ms", "seconds", 0.8), ("200MB", "bytes", 2e8), ("1.5GB", "bytes", 1.5e9),
     ("500kB", "bytes", 5e5), ("150rounds", "rounds", 150.0), ("150 rounds", "rounds", 150.0)],
)
def test_parse_cost_forms(text, unit, limit):
    cost = parse_cost(text, "crypten", "lan")
    assert (cost.unit, cost.limit, cost.protocol, cost.network) == (unit, pytest.approx(limit), "crypten", "lan")


def test_parse_cost_leaves_relu_budgets_and_refuses_unknown_units():
    assert parse_cost("15000") is None and parse_cost("0.05") is None and parse_cost("5%") is None
    with pytest.raises(SnlFxError, match=r"^--budget '3parsecs': unknown unit 'parsecs'; use a latency"):
        parse_cost("3parsecs")


def test_plan_prices_sites_like_pi_cost():
    model, x, _ = setup()
    gm = snl_fx.prepare(model, x)
    plan = snl_fx.plan_cost(Cost(seconds=1.0), model, x, gm)
    # CrypTen, WAN: a ReLU is 464 B on 100 Mbit/s plus its compute; a site 9 rounds of 40 ms plus their compute
    table = snl_fx._cost.cost_table("crypten")
    assert plan.per_relu == pytest.approx(464 * 8 / 1e8 + table.seconds["relu"])
    assert plan.per_site == pytest.approx(9 * (0.040 + table.seconds["round"]))
    kept = {"relu": 10, "relu_1": 0}
    assert plan.value(kept) == pytest.approx(plan.pi_cost(kept).seconds)


@pytest.mark.parametrize("unit", ["seconds", "bytes", "rounds"])
def test_cost_budget_run_ends_under_its_cost_and_says_so(unit):
    model, x, data = setup()
    full = snl_fx.pi_cost(model, x[:1], "crypten", "wan")
    limit = {"seconds": 0.7 * full.seconds, "bytes": 0.5 * full.bytes, "rounds": full.rounds - 9}[unit]
    budget = Cost(**{unit: limit})
    result = snl_fx.linearize(model, x, budget, data, epochs=2, finetune_epochs=1, batch_size=16, progress=False)
    after = snl_fx.pi_cost(result.model, x[:1], "crypten", "wan")
    assert getattr(after, unit) <= limit
    assert result.cost["after"] == {"bytes": after.bytes, "rounds": after.rounds, "seconds": after.seconds}
    assert result.cost["before"] == {"bytes": full.bytes, "rounds": full.rounds, "seconds": full.seconds}
    assert result.cost["met"] and result.cost["budget"]["limit"] == limit
    assert result.relu_count == snl_fx.relu_count(result.model, x[:1]).total
    assert "cost" in result.to_dict()


def test_rounds_budget_one_shot_empties_whole_sites():
    model, x, _ = setup()
    result = snl_fx.linearize(model, x, Cost(rounds=snl_fx.pi_cost(model, x[:1]).rounds - 9), None)
    # 9 rounds fewer: exactly one ReLU site goes, the other keeps all its 144 ReLUs
    assert sorted(s["after"] for s in result.sites.values()) == [0, 144]
    assert result.cost["after"]["rounds"] == result.cost["before"]["rounds"] - 9


def test_cost_budget_that_cannot_be_met_is_refused():
    model, x, _ = setup()
    with pytest.raises(SnlFxError, match=r"^the budget 1 rounds cannot be met: the model costs 4 without any gated ReLU$"):
        snl_fx.linearize(model, x, Cost(rounds=1), None)


def _gates_after_penalty(network: str) -> dict[str, int]:
    """Projected gradient on the cost penalty minus a per-element utility (a stand-in for the loss)."""
    model, x, _ = setup()
    gm = snl_fx.prepare(model, x)
    objective = snl_fx.plan_cost(Cost(seconds=1.0, network=network), model, x, gm).objective(gm)
    gen = torch.Generator().manual_seed(0)
    gates = passes.gates(gm)
    # site relu keeps little value, relu_1 much: elements worth 0.2 and 2 ReLU equivalents on average
    utility = {n: torch.rand(g.weight.shape, generator=gen) * (0.4 if n == "relu" else 4.0) for n, g in gates.items()}
    opt = torch.optim.SGD(snl_fx.gate_parameters(gm), lr=0.05)
    for _ in range(300):
        loss = objective.penalty() - sum((utility[n] * g.weight).sum() for n, g in gates.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
        snl_fx.clamp_gates(gm)
    return snl_fx.site_relu_counts(gm, 0.01)


def test_group_term_empties_a_whole_site_when_rounds_are_expensive():
    wan = _gates_after_penalty("wan")  # a site costs 9 x 44 ms, a ReLU 41 us: ~9,800 ReLU equivalents
    assert wan["relu"] == 0 and wan["relu_1"] > 0
    cheap = _gates_after_penalty("10,0")  # 10 Mbit/s, no RTT: a site costs about 110 ReLUs' worth
    assert cheap["relu"] > 0 and cheap["relu_1"] > 0


def test_relu_count_mode_unchanged():
    """Count mode through the objective hook, fixed seed: first pinned at c7b964a (before cost budgets,
    identical numbers), re-pinned after 845c736/56ee5a7 changed the target schedule's defaults."""
    model, x, data = setup()
    r = snl_fx.linearize(model, x, 40, data, epochs=3, finetune_epochs=1, batch_size=16, progress=False)
    assert r.relu_count == 40 and r.cost is None
    assert r.sites == {"relu": {"before": 144, "after": 21}, "relu_1": {"before": 144, "after": 19}}
    assert [h["relu_count"] for h in r.history] == [288, 288, 31, 40]
    assert [round(h["lambda"], 12) for h in r.history if h["lambda"]] == [0.000270809542, 0.195194434447, 30.727031303925]
    with torch.no_grad():
        # the same to float32 rounding (the gate arithmetic may be reordered; the selection above is exact)
        assert float(r.model(x).double().sum()) == pytest.approx(0.7573549002408981, rel=1e-6)


class ConvBnChain(nn.Module):
    """conv -> BN -> ReLU -> 1x1 conv -> ReLU -> linear: with the first ReLU removed, BN folds and the 1x1 merges."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))).flatten(1))


def test_plan_merge_merges_what_a_removed_site_leaves_and_keeps_the_output():
    torch.manual_seed(0)
    model, x = ConvBnChain().eval(), torch.randn(8, 1, 6, 6)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    budget = Cost(rounds=snl_fx.pi_cost(model, x[:1]).rounds - 9)  # one site must go
    gm = snl_fx.prepare(model, x)
    plan = snl_fx.plan_cost(budget, model, x, gm)
    plan.select(gm, scores={"relu": torch.zeros(4, 6, 6), "relu_1": torch.ones(4, 6, 6)})
    lowered = snl_fx.convert(gm.eval()).eval()
    reference = lowered(x).detach()
    before = plan.budget.predict(lowered, x[:1])
    merged, n = plan.merge(lowered, x)
    assert n == 2  # the BatchNorm fold and conv -> 1x1 conv
    assert sum(isinstance(m, nn.Conv2d) for m in merged.modules()) == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in merged.modules())
    assert torch.allclose(merged(x), reference, atol=1e-4)
    after = plan.budget.predict(merged, x[:1])
    assert after.rounds <= before.rounds <= budget.limit and after.bytes <= before.bytes
    assert snl_fx.relu_count(merged, x[:1]).total == 144
