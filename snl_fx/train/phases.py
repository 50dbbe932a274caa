"""The two training phases of SNL, public: ``train_gates`` (Algorithm 1) and ``finetune`` (KD).

``linearize`` runs prepare -> :func:`train_gates` -> ``binarize`` -> :func:`finetune` -> ``convert``;
call the phases yourself to put your own steps between them (a different selection, a different
fine-tune length). Both write a checkpoint every epoch to ``checkpoint`` (a folder) and continue
from it with ``resume=True``, bit-identical to an uninterrupted run with the same seed.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any, TypedDict

import torch
import torch.nn as nn
from torch.fx import GraphModule
from torch.utils.data import DataLoader, Dataset

from snl_fx import passes
from snl_fx.budget import bind
from snl_fx.train.objective import GateObjective
from snl_fx.errors import SnlFxError
from snl_fx.gated import clamp_gates, gate_parameters, relu_count_gated
from snl_fx.train import distributed
from snl_fx.train.config import FinetuneSchedule, TrainConfig
from snl_fx.train.loop import (
    Checkpoint,
    announce,
    epoch_line,
    evaluate,
    make_loader,
    seed_epoch,
    timed,
    train_epoch,
)
from snl_fx.train.schedule import LambdaSchedule, gate_lr, starting_lambda

__all__ = ["EpochRecord", "finetune", "moved_epochs", "train_gates"]


EpochRecord = TypedDict(  # functional form: "lambda" is a keyword
    "EpochRecord",
    {
        "phase": str,  # "gates" or "finetune"
        "epoch": int,  # 1-based, per phase
        "relu_count": int,  # gates: #(c > eps) at the end of the epoch; finetune: the binarized count
        "lambda": float | None,  # gates: lambda at the start of the epoch; finetune: None
        "loss": float,
        "train_acc": float,
        "val_acc": float | None,
        "seconds": float,
        "path": list[tuple[int, int, float]],  # gates: (step, count, lambda), about 20 per epoch
        "moved_epochs": int,  # finetune: gate epochs the gate phase left unused, added to this fine-tune
        "counts": dict[str, int],  # when families other than ReLU are gated: family -> elements kept
    },
    total=False,
)
EpochRecord.__doc__ = """One epoch of a phase, as kept in ``LinearizeResult.history`` and ``report.json``.

    A dict (TypedDict) with these keys:

    Args:
        phase: ``"gates"`` or ``"finetune"``.
        epoch: 1-based, per phase.
        relu_count: gates: ``#(c > eps)`` at the end of the epoch; finetune: the binarized count.
        lambda: gates: lambda at the start of the epoch; finetune: None.
        loss: mean training loss of the epoch (gates: penalty included).
        train_acc: top-1 accuracy in percent on the epoch's training batches.
        val_acc: top-1 accuracy in percent on the validation data; None without it.
        seconds: wall time of the epoch's training steps.
        path: gates only: ``(step, count, lambda)`` about 20 times per epoch.
        counts: when families other than ReLU are gated: family -> elements kept
            (``c > eps``), e.g. ``{"gelu": 2176, "softmax": 1156}``.
        moved_epochs: finetune only: the gate epochs the gate phase left unused (it met the budget
            early) that this fine-tune got on top of ``finetune_epochs`` (see :func:`finetune`).

    Example:
        >>> history = snl_fx.train_gates(gm, train_set, 2000)
        >>> [(r["epoch"], r["relu_count"], r["lambda"]) for r in history]
    """


def train_gates(
    gm: GraphModule,
    data: Dataset | DataLoader,
    budget: Any,
    config: TrainConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    val_data: Dataset | DataLoader | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    objective: GateObjective | None = None,
) -> list[EpochRecord]:
    """Algorithm 1 on a prepared model: Adam on weights and gates + lambda * penalty, until the
    budget is met (``#(c > eps) <= budget`` for a ReLU budget; checked after every step) or
    ``config.epochs`` epochs.

    Args:
        gm: a model from :func:`snl_fx.prepare`, on the device of ``config``.
        data: (input, label) pairs; a Dataset is shuffled per epoch with a seed of ``config.seed``.
        budget: ReLUs per sample (an int), a fraction of the model's ReLUs (a float in (0, 1)),
            a :class:`snl_fx.Cost`, or a plan made by :func:`snl_fx.budget.bind`.
        config: training settings (default ``TrainConfig()``): ``schedule``, ``epochs``, ``lr``,
            ``gate_lr``, ``lambda0``, ``eps``, ``kd``...
        teacher: the original model, for knowledge distillation (``config.kd``); None: plain loss.
        val_data: evaluated after every epoch (``val_acc`` of the records).
        checkpoint, resume: a folder for a checkpoint per epoch; continue from it.
        objective: what the penalty prices and where the phase stops (default: the budget's,
            ``bind(budget, gm).objective(gm)``: ``sum|c|`` and the ReLU count for a ReLU budget).

    Returns:
        One :class:`EpochRecord` per epoch (those of the checkpoint first, when resuming). The
        gates are left soft; :func:`snl_fx.binarize` makes them exact. Warns when the gates did
        not reach the budget in the epochs given.

    Example:
        >>> gm = snl_fx.prepare(model, x)
        >>> records = snl_fx.train_gates(gm, train_set, 2000, snl_fx.TrainConfig(epochs=8), teacher=model)
        >>> snl_fx.binarize(gm, 2000)
    """
    cfg = config or TrainConfig()
    store = Checkpoint(checkpoint)
    state = _resume_state(store, resume, "gates")
    plan = bind(budget, gm)
    if not any(w.requires_grad for w in gate_parameters(gm)):  # some may be closed by the plan (Cost "sites")
        raise SnlFxError("the gates of this model are binarized and frozen: train_gates needs the soft gates of "
                         "snl_fx.prepare (after binarize, fine-tune with snl_fx.finetune)")
    if state is not None and not plan.matches(state.get("budget")):
        raise SnlFxError(f"the checkpoint in {store.path} is for budget {state.get('budget')}, not {plan.key}: "
                         "use another folder or drop resume")
    plan.before_gates(gm, data, val_data, cfg, None)  # a choice some plans make first (Cost "sites"), once per plan
    obj = objective or plan.objective(gm)
    steps_per_epoch = len(make_loader(data, cfg, shuffle=True, epoch_seed=0, shard=True))
    lambda0 = cfg.lambda0 if cfg.lambda0 is not None else starting_lambda(gm, teacher, data, cfg)
    schedule = LambdaSchedule(lambda0, cfg.kappa, cfg.schedule, obj.limit, cfg.epochs, lowest=obj.start,
                              total_steps=cfg.epochs * steps_per_epoch)
    gates = set(map(id, gate_parameters(gm)))
    weights = [p for p in gm.parameters() if id(p) not in gates and p.requires_grad]
    optimizer = torch.optim.Adam(
        [{"params": weights}, {"params": gate_parameters(gm), "lr": gate_lr(cfg, schedule)}], lr=cfg.lr
    )
    records: list[EpochRecord] = []
    start, count = 0, obj.hard(cfg.eps)
    if state is not None:
        gm.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, count, records = state["epoch"], state.get("objective", state["relu_count"]), list(state["history"])
    path: list[tuple[int, int, float]] = []
    every = max(1, steps_per_epoch // 20)

    def step_done() -> bool:
        # Checked every step, not only per epoch: once lambda dominates, many gates cross eps
        # together, and a per-epoch check lets the count crash far below the budget.
        clamp_gates(gm)
        now = distributed.from_rank0(obj.hard(cfg.eps))
        schedule.after_step(now, distributed.from_rank0(obj.soft()))
        if schedule.steps % every == 0 or now <= obj.limit:
            path.append((schedule.steps, now, schedule.lam))
        return now <= obj.limit

    with distributed.data_parallel(gm, cfg.resolved_device(), cfg.sync_bn) as net:
        for epoch in range(start + 1, cfg.epochs + 1):
            if count <= obj.limit:
                break
            lam, path[:] = schedule.lam, []
            loader = make_loader(data, cfg, shuffle=True, epoch_seed=seed_epoch(cfg, "gates", epoch), shard=True)
            stats = timed(lambda: train_epoch(
                net, teacher, loader, optimizer, cfg, penalty=lambda: schedule.lam * obj.penalty(),
                after_step=step_done, desc=f"gates {epoch}/{cfg.epochs}",
            ))
            distributed.broadcast_state(gm)  # BatchNorm statistics of the last step: rank 0's
            count = distributed.from_rank0(obj.hard(cfg.eps))
            schedule.step(count, epoch)
            record: EpochRecord = {"phase": "gates", "epoch": epoch, "relu_count": relu_count_gated(gm, cfg.eps), "lambda": lam,
                                   **_family_counts(gm, cfg.eps), **distributed.mean_over_ranks(stats),
                                   "val_acc": distributed.on_rank0(lambda: evaluate(gm, val_data, cfg)), "path": list(path)}
            records.append(record)
            announce(epoch_line(record), cfg)
            store.save({"phase": "gates", "epoch": epoch, "relu_count": record["relu_count"], "objective": count,
                        "budget": plan.key,
                        "granularity": passes.get_meta(gm).granularity, "model": gm.state_dict(),
                        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "history": records})
    if count > obj.limit and distributed.is_main():
        warnings.warn(
            f"the gates reached {count:,.0f} {obj.unit}, not the budget {obj.limit:,.0f}, in {cfg.epochs} epochs; binarizing to "
            "the budget anyway (raise epochs for a better-trained selection)",
            stacklevel=4,  # user -> linearize -> _train -> train_gates
        )
    return records


def _family_counts(gm: GraphModule, eps: float) -> dict[str, dict[str, int]]:
    """``{"counts": family -> elements kept}`` when other families than ReLU are gated, else nothing."""
    families = dict.fromkeys(passes.get_meta(gm).site(n).family for n in passes.get_meta(gm).gates)
    if set(families) <= {"relu"}:
        return {}
    return {"counts": {f: relu_count_gated(gm, eps, f) for f in families}}


def finetune(
    gm: GraphModule,
    teacher: nn.Module | None,
    data: Dataset | DataLoader,
    config: TrainConfig | None = None,
    *,
    val_data: Dataset | DataLoader | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    budget: Any = None,
    history: Sequence[EpochRecord] = (),
    moved_epochs: int = 0,
) -> list[EpochRecord]:
    """Fine-tune the weights of a binarized model with KD from ``teacher``; keep the best epoch.

    SGD (``config.finetune_lr``, momentum, weight decay; cosine decay over
    ``config.finetune_epochs + moved_epochs`` unless ``finetune_schedule="constant"``). After the last epoch
    ``gm`` holds the weights of the epoch with the best ``val_data`` accuracy (the last epoch
    without ``val_data``).

    Args:
        gm: a binarized model (:func:`snl_fx.binarize`); its gates stay frozen.
        teacher: the original model (None, or ``config.kd=False``: plain cross-entropy).
        data, val_data, config, checkpoint, resume: as for :func:`train_gates`.
        budget, history: recorded in the checkpoints (the run's budget, e.g. a plan's ``key``, and
            earlier records), so that a resumed run can refuse another budget and report the whole run.
        moved_epochs: epochs on top of ``config.finetune_epochs``: :func:`snl_fx.linearize` gives
            the fine-tune the gate epochs a gate phase left when it met the budget early
            (:func:`moved_epochs`). Recorded in every record and checkpoint; a resume with
            another number is refused.

    Returns:
        One :class:`EpochRecord` per fine-tune epoch (those of the checkpoint first, when resuming).

    Example:
        >>> snl_fx.binarize(gm, 2000)
        >>> snl_fx.finetune(gm, model, train_set, snl_fx.TrainConfig(finetune_epochs=8), val_data=val_set)
    """
    cfg = config or TrainConfig()
    if moved_epochs < 0:
        raise SnlFxError(f"moved_epochs must be >= 0, got {moved_epochs}")
    epochs = cfg.finetune_epochs + moved_epochs
    store = Checkpoint(checkpoint)
    state = _resume_state(store, resume, "finetune")
    if state is not None and state.get("moved_epochs", 0) != moved_epochs:
        raise SnlFxError(f"the checkpoint in {store.path} is for a fine-tune with {state.get('moved_epochs', 0)} moved "
                         f"epochs, not {moved_epochs}: use another folder or drop resume")
    params = [p for p in gm.parameters() if p.requires_grad]
    if not params:
        warnings.warn("the model has no trainable weights (all frozen): fine-tune skipped", stacklevel=4)
        return []
    optimizer = torch.optim.SGD(params, lr=cfg.finetune_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: _lr_factor(e, epochs, cfg.finetune_schedule))
    records: list[EpochRecord] = []
    start = 0
    best_acc = distributed.on_rank0(lambda: evaluate(gm, val_data, cfg))
    best_state = copy.deepcopy(gm.state_dict())
    if state is not None:
        gm.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, best_acc, best_state = state["epoch"], state["best_acc"], state["best_model"]
        records = [r for r in state["history"] if r["phase"] == "finetune"]
    final = relu_count_gated(gm)  # after a resumed state is loaded: the binarized count, never the fresh gates'
    with distributed.data_parallel(gm, cfg.resolved_device(), cfg.sync_bn) as net:
        for epoch in range(start + 1, epochs + 1):
            loader = make_loader(data, cfg, shuffle=True, epoch_seed=seed_epoch(cfg, "finetune", epoch), shard=True)
            stats = timed(lambda: train_epoch(net, teacher, loader, optimizer, cfg, desc=f"finetune {epoch}/{epochs}"))
            scheduler.step()
            distributed.broadcast_state(gm)
            acc = distributed.on_rank0(lambda: evaluate(gm, val_data, cfg))
            record: EpochRecord = {"phase": "finetune", "epoch": epoch, "relu_count": final, "lambda": None,
                                   **_family_counts(gm, passes.COUNT_EPS), **distributed.mean_over_ranks(stats),
                                   "val_acc": acc, "moved_epochs": moved_epochs}
            records.append(record)
            announce(epoch_line(record), cfg)
            if acc is None or best_acc is None or acc >= best_acc:
                best_acc, best_state = acc, copy.deepcopy(gm.state_dict())
            store.save({"phase": "finetune", "epoch": epoch, "relu_count": final, "budget": budget, "moved_epochs": moved_epochs,
                        "granularity": passes.get_meta(gm).granularity, "model": gm.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "best_acc": best_acc,
                        "best_model": best_state, "history": [*history, *records]})
    gm.load_state_dict(best_state)
    return records


def moved_epochs(config: TrainConfig, gate_records: Sequence[EpochRecord]) -> int:
    """Gate epochs a gate phase left unused: ``config.epochs`` less the gate epochs it ran (its
    last, partial epoch counted whole); what :func:`snl_fx.linearize` adds to the fine-tune.

    Args:
        config: the run's settings (``epochs``: the gate phase's length).
        gate_records: the gate phase's records (from :func:`train_gates`; other phases ignored).

    Returns:
        The number of epochs, 0 when the gate phase ran all its epochs.

    Example:
        >>> records = snl_fx.train_gates(gm, train_set, 2000, cfg)
        >>> snl_fx.finetune(gm, model, train_set, cfg, moved_epochs=moved_epochs(cfg, records))
    """
    return max(0, config.epochs - sum(1 for r in gate_records if r.get("phase") == "gates"))


def _resume_state(store: Checkpoint, resume: bool, phase: str) -> dict[str, Any] | None:
    """The checkpoint's state when resuming this phase; None to start afresh."""
    if not resume:
        return None
    state = store.load()
    if state is None or state["phase"] == phase:
        return state
    if phase == "gates":
        raise SnlFxError(f"the checkpoint in {store.path} is past the gate phase: resume with finetune, or drop resume")
    return None  # a gate-phase checkpoint: the fine-tune starts afresh


def _lr_factor(epoch: int, epochs: int, schedule: FinetuneSchedule) -> float:
    """Fine-tune lr factor of 0-based ``epoch``: 1 throughout (``constant``) or a cosine from 1 to 0."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
