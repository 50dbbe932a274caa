"""Budgets in cost units: Cost parsing and errors, cost-budget runs, the group term; count mode is the plain life cycle."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import dispatch_relus_per_sample

import snl_fx
from snl_fx import Cost, SnlFxError, parse_cost, passes
from snl_fx.cost import cost_table, parse_network

CRYPTEN = cost_table("crypten")
SITE = 4 * 6 * 6  # ReLUs of each of Tiny's two sites
SITE_ROUNDS = CRYPTEN.rounds["relu_layer"]  # rounds a CrypTen ReLU layer costs while it keeps anything


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
        ({"seconds": 1.0, "penalty": "l2"}, "Cost penalty must be one of ('group', 'drop', 'sites'), got 'l2'"),
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
    # CrypTen, WAN: a ReLU is its calibrated bytes on the link plus its compute; a site its rounds of one RTT each
    wan = parse_network("wan")
    assert plan.per_relu == pytest.approx(wan.seconds(CRYPTEN.bytes["relu"], 0) + CRYPTEN.seconds["relu"])
    assert plan.per_site == pytest.approx(wan.seconds(0, SITE_ROUNDS) + SITE_ROUNDS * CRYPTEN.seconds["round"])
    kept = {"relu": 10, "relu_1": 0}
    assert plan.value(kept) == pytest.approx(plan.pi_cost(kept).seconds)


@pytest.mark.parametrize("unit", ["seconds", "bytes", "rounds"])
def test_cost_budget_run_ends_under_its_cost_and_says_so(unit):
    model, x, data = setup()
    full = snl_fx.pi_cost(model, x[:1], "crypten", "wan")
    limit = {"seconds": 0.7 * full.seconds, "bytes": 0.5 * full.bytes, "rounds": full.rounds - SITE_ROUNDS}[unit]
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
    result = snl_fx.linearize(model, x, Cost(rounds=snl_fx.pi_cost(model, x[:1]).rounds - SITE_ROUNDS), None)
    # one ReLU layer's rounds fewer: exactly one ReLU site goes, the other keeps all its ReLUs
    assert sorted(s["after"] for s in result.sites.values()) == [0, SITE]
    assert result.cost["after"]["rounds"] == result.cost["before"]["rounds"] - SITE_ROUNDS


def test_cost_budget_that_cannot_be_met_is_refused():
    model, x, _ = setup()
    base = snl_fx.pi_cost(model, x[:1]).rounds - 2 * SITE_ROUNDS  # the model with both ReLU sites removed
    with pytest.raises(SnlFxError, match=rf"^the budget 1 rounds cannot be met: the model costs {base:g} without any gated ReLU$"):
        snl_fx.linearize(model, x, Cost(rounds=1), None)


def _gates_after_penalty(network: str) -> dict[str, int]:
    """Projected gradient on the cost penalty minus a per-element utility (a stand-in for the loss)."""
    model, x, _ = setup()
    gm = snl_fx.prepare(model, x)
    objective = snl_fx.plan_cost(Cost(seconds=1.0, network=network, penalty="group"), model, x, gm).objective(gm)
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
    wan = _gates_after_penalty("wan")  # a site costs its rounds of 40 ms RTT each: thousands of ReLUs' worth
    assert wan["relu"] == 0 and wan["relu_1"] > 0
    cheap = _gates_after_penalty("10,0")  # 10 Mbit/s, no RTT: a site costs about 110 ReLUs' worth
    assert cheap["relu"] > 0 and cheap["relu_1"] > 0


def _split(data: torch.utils.data.TensorDataset, n_train: int) -> tuple[torch.utils.data.TensorDataset, ...]:
    x, y = data.tensors
    return torch.utils.data.TensorDataset(x[:n_train], y[:n_train]), torch.utils.data.TensorDataset(x[n_train:], y[n_train:])


@pytest.mark.filterwarnings("ignore:the gates reached")  # 3 epochs may end above the budget: binarized to it
def test_relu_count_mode_is_the_plain_life_cycle():
    """A count budget through linearize is prepare -> train_gates -> binarize -> finetune -> convert called
    by hand, bit for bit on this machine (no figure pinned: training floats differ between CPUs)."""
    model, x, data = setup()
    train, val = _split(data, 80)  # 5 steps of 16 per epoch; val given, so linearize splits nothing
    opts = dict(epochs=3, finetune_epochs=1, batch_size=16, progress=False)
    r = snl_fx.linearize(model, x, 40, train, val_data=val, **opts)

    cfg = snl_fx.TrainConfig(**opts)
    gm = snl_fx.prepare(model, x)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    history = snl_fx.train_gates(gm, train, 40, cfg, teacher=teacher, val_data=val)
    assert snl_fx.binarize(gm, 40, tie_break=snl_fx.linearization_scores(gm, x)) == 40
    history += snl_fx.finetune(gm, teacher, train, cfg, val_data=val, budget=40, history=history)
    by_hand = snl_fx.convert(gm.eval()).eval()

    assert list(r.gated.state_dict()) == list(gm.state_dict())
    for key, value in gm.state_dict().items():
        assert torch.equal(r.gated.state_dict()[key], value), key
    untimed = lambda records: [{k: v for k, v in h.items() if k != "seconds"} for h in records]  # noqa: E731
    assert untimed(r.history) == untimed(history)
    with torch.no_grad():
        assert torch.equal(r.model(x), by_hand(x))

    # invariants of the run itself
    assert r.method == "snl" and r.cost is None
    assert r.relu_count == r.budget == 40 == sum(s["after"] for s in r.sites.values())
    assert {n: s["before"] for n, s in r.sites.items()} == {"relu": SITE, "relu_1": SITE}
    assert dispatch_relus_per_sample(r.model, x) == 40
    gates = [h for h in r.history if h["phase"] == "gates"]
    assert [h["relu_count"] for h in r.history if h["phase"] == "finetune"] == [40]
    assert all(h["lambda"] > 0 and all(lam > 0 for _, _, lam in h["path"]) for h in gates)
    _assert_lambda_rises_above_the_target_path(gates, budget=40, start=2 * SITE, total_steps=3 * 5)


def _assert_lambda_rises_above_the_target_path(gates: list, budget: int, start: int, total_steps: int) -> None:
    """Target schedule: after every step whose count is above the target path, lambda has grown."""
    path = snl_fx.train.LambdaSchedule(1.0, budget=budget, lowest=start, total_steps=total_steps)
    above = 0
    for record in gates:
        previous = record["lambda"]  # lambda at the start of the epoch
        assert [step for step, _, _ in record["path"]] == list(range(record["path"][0][0], record["path"][-1][0] + 1))
        for step, count, lam in record["path"]:  # every step is recorded: fewer than 20 steps per epoch
            if count > path.target(step):
                above += 1
                assert lam > previous, (step, count, path.target(step), previous, lam)
            previous = lam
    assert above > 0  # the first steps start above the path: the check is not vacuous


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
