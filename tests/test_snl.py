"""The SNL algorithm: budget handling, schedule, binarize, training to a budget, resume, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from conftest import TinyCNN, dispatch_relus_per_sample
from torch.utils.data import TensorDataset

import snl_fx
from snl_fx import passes

TOTAL = 2 * 4 * 8 * 8  # TinyCNN: two ReLU sites of 4x8x8


def toy_data(n: int = 256, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, :, :4].mean((1, 2)) > 0).long()
    return TensorDataset(x, y)


FAST = dict(epochs=10, finetune_epochs=1, lr=1e-3, gate_lr=0.1, lambda0=1e-2, kappa=2.0, batch_size=64, progress=False)


@pytest.mark.parametrize(
    ("budget", "expected"), [(100, 100), (0.25, round(0.25 * TOTAL)), (1, 1)]
)
def test_resolve_budget(budget, expected):
    assert snl_fx.resolve_budget(budget, TOTAL) == expected


@pytest.mark.parametrize("bad", [0, -5, 0.0, 1.0, 1.5, "ten", "0%", True])
def test_bad_budget_is_rejected(tiny_cnn, bad):
    with pytest.raises(snl_fx.SnlFxError, match="budget"):
        snl_fx.linearize(tiny_cnn, torch.randn(2, 1, 8, 8), bad)


def test_budget_at_or_above_total_is_a_noop(tiny_cnn):
    x = torch.randn(2, 1, 8, 8)
    with pytest.warns(UserWarning, match="nothing to remove"):
        result = snl_fx.linearize(tiny_cnn, x, TOTAL)
    assert result.method == "unchanged" and result.relu_count == TOTAL
    assert torch.allclose(result.model(x), tiny_cnn.eval()(x))


def test_model_without_relu_and_wrong_input_are_clear_errors(tiny_cnn):
    with pytest.raises(snl_fx.SnlFxError, match="no ReLU"):
        snl_fx.linearize(nn.Sequential(nn.Linear(4, 2), nn.Tanh()), torch.randn(2, 4), 1)
    with pytest.raises(snl_fx.SnlFxError, match="example input.*conv1"):
        snl_fx.linearize(tiny_cnn, torch.randn(2, 3, 8, 8), 10)
    with pytest.raises(snl_fx.SnlFxError, match="unknown option"):
        snl_fx.linearize(tiny_cnn, torch.randn(2, 1, 8, 8), 10, epoch=3)


def test_paper_schedule_raises_lambda_only_when_count_stalls():
    s = snl_fx.LambdaSchedule(1.0, 2.0, "paper", budget=10, max_epochs=50, lowest=100)
    assert [s.step(c, e) for e, c in enumerate([90, 89, 89, 95, 80], 1)] == [1.0, 1.0, 2.0, 4.0, 4.0]


def test_budget_schedule_accelerates_while_behind_and_holds_when_on_track():
    s = snl_fx.LambdaSchedule(1.0, 2.0, "budget", budget=10, max_epochs=4, lowest=1000)
    # needs a factor (10/990)**(1/3) ~ 0.22 per epoch: 990 is far behind, twice in a row
    assert s.step(990, 1) == 2.0 and s.step(980, 2) == 2.0 * 4.0
    assert s.step(50, 3) == 8.0  # fell to 5% of 980: on track, lambda held


def test_target_schedule_follows_a_geometric_path_and_steers_lambda_by_the_mass():
    s = snl_fx.LambdaSchedule(1.0, budget=10, lowest=1000, total_steps=100, reach=0.5, gain=0.1, band=0.05)
    assert s.target(0) == 1000 and math.isclose(s.target(25), 100) and math.isclose(s.target(50), 10)
    assert math.isclose(s.target(100), 0.1)  # on below the budget after reach
    lam = s.after_step(1000, 1000.0)
    assert math.isclose(lam, math.exp(0.1))  # step 1: 10% above the target, full gain up
    steps = [((1000, 1.0), 0.05), ((1, 0.5), -0.1)]  # count above, mass below: half the gain; both below: down
    for (count, mass), change in steps:
        before, lam = lam, s.after_step(count, mass)
        assert math.isclose(lam / before, math.exp(change))
    on_track = s.target(4)
    before, lam = lam, s.after_step(math.ceil(on_track), on_track)
    assert math.isclose(lam, before, rel_tol=1e-3)  # on the target: about held
    assert s.steps == 4 and s.step(5, 1) == s.lam  # the per-epoch call leaves the target mode alone


def test_target_schedule_needs_its_step_count():
    with pytest.raises(snl_fx.SnlFxError, match="total_steps"):
        snl_fx.LambdaSchedule(1e-5, budget=10, lowest=100)


def test_soft_relu_count_weighs_channel_gates_by_their_pixels(tiny_cnn):
    x = torch.randn(2, 1, 8, 8)
    gm = snl_fx.prepare(tiny_cnn, x, "channel")
    first, second = snl_fx.gate_parameters(gm)
    first.data.fill_(0.5)
    second.data.zero_()
    second.data[0] = 0.25
    assert snl_fx.soft_relu_count(gm) == 0.5 * 4 * 64 + 0.25 * 64


def test_binarize_breaks_ties_by_the_given_scores(tiny_cnn):
    gm = snl_fx.prepare(tiny_cnn, torch.randn(2, 1, 8, 8))
    first, second = snl_fx.gate_parameters(gm)
    first.data.zero_()
    second.data.zero_()
    first.data.view(-1)[:10] = 0.5  # 10 clear winners; the other 5 come from the tie at 0
    ties = {name: torch.zeros_like(w) for name, w in zip(passes.gates(gm), (first, second))}
    ties[list(ties)[1]].view(-1)[-5:] = 1.0  # the tie-break prefers the last 5 elements of site 2
    assert snl_fx.binarize(gm, 15, tie_break=ties) == 15
    assert first.view(-1)[:10].sum() == 10 and first.sum() == 10
    assert second.view(-1)[-5:].sum() == 5 and second.sum() == 5


def test_defaults_reach_the_budget_with_the_gates(recwarn):
    """No tuned option: only the epoch counts. The gates, not binarize, must meet the budget."""
    torch.manual_seed(0)
    result = snl_fx.linearize(TinyCNN(), torch.randn(4, 1, 8, 8), 0.1, toy_data(512), epochs=10, finetune_epochs=1,
                              batch_size=32, progress=False)
    gates = [h for h in result.history if h["phase"] == "gates"]
    assert gates[-1]["relu_count"] <= result.budget
    assert not [w for w in recwarn if "binarizing to the budget anyway" in str(w.message)]
    assert result.relu_count == result.budget


@pytest.mark.parametrize("granularity", ["pixel", "channel"])
def test_binarize_hits_exact_budget_with_deterministic_ties(tiny_cnn, granularity):
    gm = snl_fx.prepare(tiny_cnn, torch.randn(2, 1, 8, 8), granularity)
    for w in snl_fx.gate_parameters(gm):
        w.data.fill_(0.7)  # all tied
    final = snl_fx.binarize(gm, 100)
    masks = [w.detach() for w in snl_fx.gate_parameters(gm)]
    assert all(bool(((m == 0) | (m == 1)).all()) and not m.requires_grad for m in masks)
    if granularity == "pixel":
        assert final == 100
        assert masks[0].flatten()[:100].sum() == 100 and masks[1].sum() == 0  # ties: site order, index
    else:
        assert final == 64  # one whole 8x8 channel fits, a second would not
    assert snl_fx.relu_count_gated(gm, 0.5) == final


def test_one_shot_selection_without_data(tiny_cnn):
    x = torch.randn(16, 1, 8, 8)
    result = snl_fx.linearize(tiny_cnn, x, 50)
    assert result.method == "one-shot" and result.relu_count == 50
    assert dispatch_relus_per_sample(result.model, x) == 50
    assert sum(s["after"] for s in result.sites.values()) == 50


@pytest.mark.parametrize("granularity", ["pixel", "channel"])
def test_training_reaches_budget_and_exports(tmp_path, granularity):
    torch.manual_seed(0)
    model = TinyCNN()
    budget = 48
    x = torch.randn(4, 1, 8, 8)
    result = snl_fx.linearize(model, x, budget, toy_data(), granularity=granularity, **{**FAST, "epochs": 20})
    gate_epochs = [h for h in result.history if h["phase"] == "gates"]
    assert gate_epochs[-1]["relu_count"] <= budget, "the gates themselves reached the budget"
    if granularity == "pixel":
        assert result.relu_count == budget
    else:
        assert result.relu_count <= budget and result.relu_count % 64 == 0
    assert (result.model(x) - result.gated.eval()(x)).abs().max() <= 1e-5
    exported = snl_fx.export_onnx(result.model, x, tmp_path / "m.onnx")
    assert exported.relu_count == result.relu_count and exported.max_abs_error <= 1e-4
    assert snl_fx.relu_count(str(tmp_path / "m.onnx")).total == result.relu_count


def test_kd_loss_takes_the_values_it_uses():
    g = torch.Generator().manual_seed(0)
    student, teacher, labels = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), torch.arange(8) % 5
    ce = nn.functional.cross_entropy(student, labels)
    assert torch.equal(snl_fx.kd_loss(student, None, labels, temperature=4.0, weight=0.5), ce)
    t = 2.0
    p, q = (teacher / t).softmax(1), (student / t).softmax(1)
    kl = (p * (p.log() - q.log())).sum(1).mean()  # KL(teacher || student), batch mean
    got = snl_fx.kd_loss(student, teacher, labels, temperature=t, weight=0.75)
    assert torch.allclose(got, 0.25 * ce + 0.75 * t * t * kl)
    with pytest.raises(TypeError):
        snl_fx.kd_loss(student, teacher, labels, 4.0, 0.5)  # temperature and weight are keywords


def test_resume_gives_the_same_model(tmp_path):
    x = torch.randn(4, 1, 8, 8)
    opts = dict(FAST, epochs=4, finetune_epochs=2, lambda0=1e-4, kappa=1.5)
    torch.manual_seed(0)
    straight = snl_fx.linearize(TinyCNN(), x, 20, toy_data(), out_dir=tmp_path / "a", **opts)

    torch.manual_seed(0)
    model = TinyCNN()
    with pytest.raises(KeyboardInterrupt):  # stop the run after the second gate epoch
        _interrupt_after_checkpoints(2, lambda: snl_fx.linearize(model, x, 20, toy_data(), out_dir=tmp_path / "b", **opts))
    resumed = snl_fx.linearize(model, x, 20, toy_data(), out_dir=tmp_path / "b", resume=True, **opts)
    for (k, a), b in zip(straight.gated.state_dict().items(), resumed.gated.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["relu_count"] for h in straight.history] == [h["relu_count"] for h in resumed.history]
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert state["phase"] == "finetune"


def _interrupt_after_checkpoints(n: int, run):
    from snl_fx.train import loop as _train

    original, calls = _train.Checkpoint.save, []

    def save(self, state):
        original(self, state)
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt

    _train.Checkpoint.save = save
    try:
        run()
    finally:
        _train.Checkpoint.save = original


def test_nan_loss_stops_with_clear_error(tmp_path, tiny_cnn):
    data = toy_data()
    data.tensors[0][5, 0, 0, 0] = float("nan")
    with pytest.raises(snl_fx.SnlFxError, match="loss became nan"):
        snl_fx.linearize(tiny_cnn, torch.randn(2, 1, 8, 8), 20, data, out_dir=tmp_path, **FAST)


def test_pieces_from_own_loop(tiny_cnn):
    x, y = toy_data(64).tensors
    gm = snl_fx.prepare(tiny_cnn, x[:2])
    opt = torch.optim.Adam(gm.parameters(), lr=0.05)
    schedule = snl_fx.LambdaSchedule(lam=1e-3, budget=32, lowest=TOTAL, total_steps=5)
    for epoch in range(1, 6):
        loss = nn.functional.cross_entropy(gm(x), y) + schedule.lam * snl_fx.lasso_penalty(gm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        snl_fx.clamp_gates(gm)
        schedule.after_step(snl_fx.relu_count_gated(gm), snl_fx.soft_relu_count(gm))  # one step per epoch here
        schedule.step(snl_fx.relu_count_gated(gm), epoch)
    assert schedule.steps == 5 and schedule.lam > 1e-3  # the count stayed above the target: lambda rose
    assert snl_fx.binarize(gm, 32) == 32
    lowered = snl_fx.convert(gm)
    assert dispatch_relus_per_sample(lowered, x[:3]) == 32
    assert math.isclose(float((lowered(x) - gm.eval()(x)).abs().max()), 0.0, abs_tol=1e-5)
    assert not any(isinstance(m, passes.Gate) for m in lowered.modules())


def test_relu_count_refuses_a_gated_model_and_counts_the_lowered_one(tiny_cnn):
    x = torch.randn(2, 1, 8, 8)
    gm = snl_fx.prepare(tiny_cnn, x)
    with pytest.raises(snl_fx.SnlFxError, match="relu_count_gated"):
        snl_fx.relu_count(gm, x)
    snl_fx.binarize(gm, 37)
    assert snl_fx.relu_count(snl_fx.convert(gm), x).total == snl_fx.relu_count_gated(gm) == 37


class OneUsefulChannel(nn.Module):
    """x copied to 2 channels -> ReLU -> logits (sum of channel 1, 0): the label is always 0, so the loss
    falls as channel 1 grows, and ReLU(x) >= x. Channel 0 is read by nothing: its ReLUs are worthless."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return torch.stack([y[:, 1].sum((1, 2)), torch.zeros_like(y[:, 1, 0, 0])], 1)


@pytest.mark.parametrize("granularity", ["pixel", "channel"])
def test_refine_selection_moves_kept_relus_to_where_they_lower_the_loss(granularity):
    """All of channel 0 kept, none of channel 1: both granularities must swap exactly to channel 1."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, 1, 4, 4, generator=g), torch.zeros(256, dtype=torch.long))
    gm = snl_fx.prepare(OneUsefulChannel(), data.tensors[0][:2], granularity)
    (gate,) = snl_fx.gate_parameters(gm)
    with torch.no_grad():
        gate.zero_()
        gate[0] = 1.0  # a poor selection: the channel nothing reads
    snl_fx.train.freeze_gates(gm)
    info = snl_fx.refine_selection(gm, data, snl_fx.TrainConfig(batch_size=16, progress=False))
    per_channel = gate.detach().expand(2, 4, 4).sum((1, 2)).tolist()
    assert per_channel == [0.0, 16.0]  # every kept ReLU moved to the useful channel, the count unchanged
    assert snl_fx.relu_count_gated(gm, 0.5) == 4 * 4
    assert not gate.requires_grad
    assert info["swaps"] == (16 if granularity == "pixel" else 1)  # one swap per gate element moved
    assert info["loss_after"] < info["loss_before"]


def test_refine_selection_needs_binary_gates(tiny_cnn):
    gm = snl_fx.prepare(tiny_cnn, torch.randn(2, 1, 8, 8))
    snl_fx.gate_parameters(gm)[0].data.fill_(0.5)
    with pytest.raises(snl_fx.SnlFxError, match="binarize first"):
        snl_fx.refine_selection(gm, toy_data(64))


def test_linearize_with_refine_keeps_the_exact_budget(tiny_cnn):
    x = torch.randn(4, 1, 8, 8)
    result = snl_fx.linearize(tiny_cnn, x, 40, toy_data(256), refine=True, **{**FAST, "epochs": 3})
    assert result.relu_count == 40 == dispatch_relus_per_sample(result.model, x)
    assert (result.model(x) - result.gated.eval()(x)).abs().max() <= 1e-5
