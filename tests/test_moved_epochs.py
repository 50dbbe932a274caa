"""Gate epochs a gate phase leaves unused go to linearize's fine-tune, stated in its records (issue 20)."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyCNN
from test_cost_budget import setup
from test_snl import FAST, _interrupt_after_checkpoints, toy_data

import snl_fx
from snl_fx import Cost, SnlFxError
from snl_fx.train.phases import moved_epochs


def _phases(history):
    gates = [h for h in history if h["phase"] == "gates"]
    return gates, [h for h in history if h["phase"] == "finetune"]


def test_count_budget_moves_the_unused_gate_epochs_to_the_fine_tune():
    torch.manual_seed(0)
    result = snl_fx.linearize(TinyCNN(), torch.randn(4, 1, 8, 8), 0.1, toy_data(512), **FAST)
    gates, tuned = _phases(result.history)
    moved = FAST["epochs"] - len(gates)
    assert moved > 0  # this gate phase meets its budget early
    assert len(tuned) == FAST["finetune_epochs"] + moved
    assert [h["moved_epochs"] for h in tuned] == [moved] * len(tuned)
    assert [h["epoch"] for h in tuned] == list(range(1, len(tuned) + 1))


def test_cost_budget_records_the_moved_epochs():
    model, x, data = setup()
    full = snl_fx.pi_cost(model, x[:1], "crypten", "wan")
    result = snl_fx.linearize(model, x, Cost(seconds=0.7 * full.seconds), data, epochs=6, finetune_epochs=1,
                              batch_size=16, progress=False)
    gates, tuned = _phases(result.history)
    assert len(gates) + len(tuned) == 6 + 1  # every epoch given is trained
    assert all(h["moved_epochs"] == 6 - len(gates) for h in tuned)
    assert all(h["val_acc"] is not None for h in gates)  # a damaged gate phase can be seen per epoch


def test_moved_epochs_counts_gate_records_only():
    cfg = snl_fx.TrainConfig(epochs=5)
    assert moved_epochs(cfg, [{"phase": "gates"}] * 2 + [{"phase": "finetune"}] * 4) == 3
    assert moved_epochs(cfg, [{"phase": "gates"}] * 5) == 0


def test_resume_in_a_fine_tune_with_moved_epochs_is_bit_exact(tmp_path):
    x = torch.randn(4, 1, 8, 8)
    torch.manual_seed(0)
    straight = snl_fx.linearize(TinyCNN(), x, 0.1, toy_data(512), out_dir=tmp_path / "a", **FAST)
    gates, tuned = _phases(straight.history)
    assert len(tuned) > FAST["finetune_epochs"]
    torch.manual_seed(0)
    model = TinyCNN()
    with pytest.raises(KeyboardInterrupt):  # stop after the first fine-tune epoch, one of the moved ones
        _interrupt_after_checkpoints(len(gates) + 1, lambda: snl_fx.linearize(
            model, x, 0.1, toy_data(512), out_dir=tmp_path / "b", **FAST))
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert (state["phase"], state["epoch"], state["moved_epochs"]) == ("finetune", 1, len(tuned) - 1)
    resumed = snl_fx.linearize(model, x, 0.1, toy_data(512), out_dir=tmp_path / "b", resume=True, **FAST)
    for (k, a), b in zip(straight.gated.state_dict().items(), resumed.gated.state_dict().values()):
        assert torch.equal(a, b), k
    assert [(h["phase"], h["epoch"], h.get("moved_epochs")) for h in straight.history] == \
        [(h["phase"], h["epoch"], h.get("moved_epochs")) for h in resumed.history]


def test_fine_tune_resume_with_other_moved_epochs_is_refused(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    gm = snl_fx.prepare(TinyCNN(), x)
    snl_fx.binarize(gm, 100)
    cfg = snl_fx.TrainConfig(finetune_epochs=1, batch_size=64, progress=False)
    records = snl_fx.finetune(gm, None, toy_data(), cfg, checkpoint=tmp_path, moved_epochs=1)
    assert len(records) == 2
    with pytest.raises(SnlFxError, match="for a fine-tune with 1 moved epochs, not 0"):
        snl_fx.finetune(gm, None, toy_data(), cfg, checkpoint=tmp_path, resume=True)
