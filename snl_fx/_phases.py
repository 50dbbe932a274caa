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

import passes

from . import distributed
from ._cost_budget import GateObjective, count_objective
from ._errors import SnlFxError
from ._snl import (
    LambdaSchedule,
    clamp_gates,
    gate_parameters,
    gradient_scale,
    relu_count_gated,
)
from ._train import (
    Checkpoint,
    FinetuneSchedule,
    TrainConfig,
    announce,
    epoch_line,
    evaluate,
    kd_loss,
    make_loader,
    seed_epoch,
    timed,
    train_epoch,
)

__all__ = ["EpochRecord", "finetune", "gate_lr", "refine_selection", "train_gates"]


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
    },
    total=False,
)
EpochRecord.__doc__ = "One epoch of a phase, as kept in ``LinearizeResult.history`` and ``report.json``."


def train_gates(
    gm: GraphModule,
    data: Dataset | DataLoader,
    budget: int,
    config: TrainConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    val_data: Dataset | DataLoader | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    objective: GateObjective | None = None,
) -> list[EpochRecord]:
    """Algorithm 1 on a prepared model: Adam on weights and gates + lambda * sum|c|, until
    ``#(c > eps) <= budget`` (checked after every step) or ``config.epochs`` epochs.

    Args:
        gm: a model from :func:`snl_fx.prepare`, on the device of ``config``.
        data: (input, label) pairs; a Dataset is shuffled per epoch with a seed of ``config.seed``.
        budget: ReLUs per sample to reach (an int; see :func:`snl_fx.resolve_budget`).
        config: training settings (default ``TrainConfig()``): ``schedule``, ``epochs``, ``lr``,
            ``gate_lr``, ``lambda0``, ``eps``, ``kd``...
        teacher: the original model, for knowledge distillation (``config.kd``); None: plain loss.
        val_data: evaluated after every epoch (``val_acc`` of the records).
        checkpoint, resume: a folder for a checkpoint per epoch; continue from it.
        objective: what the penalty prices and where the phase stops (default: ``sum|c|`` and the
            ReLU count down to ``budget``; for a Cost budget, ``CostPlan.objective``).

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
    obj = objective or count_objective(gm, budget)
    steps_per_epoch = len(make_loader(data, cfg, shuffle=True, epoch_seed=0, shard=True))
    lambda0 = cfg.lambda0 if cfg.lambda0 is not None else _starting_lambda(gm, teacher, data, cfg)
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
        start, count, records = state["epoch"], state["relu_count"], list(state["history"])
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
            relus = count if objective is None else relu_count_gated(gm, cfg.eps)
            record: EpochRecord = {"phase": "gates", "epoch": epoch, "relu_count": relus, "lambda": lam,
                                   **distributed.mean_over_ranks(stats),
                                   "val_acc": distributed.on_rank0(lambda: evaluate(gm, val_data, cfg)), "path": list(path)}
            records.append(record)
            announce(epoch_line(record), cfg)
            store.save({"phase": "gates", "epoch": epoch, "relu_count": count, "budget": budget,
                        "granularity": passes.get_meta(gm).granularity, "model": gm.state_dict(),
                        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "history": records})
    if count > obj.limit and distributed.is_main():
        warnings.warn(
            f"the gates reached {count:,.0f} {obj.unit}, not the budget {obj.limit:,.0f}, in {cfg.epochs} epochs; binarizing to "
            "the budget anyway (raise epochs for a better-trained selection)",
            stacklevel=3,
        )
    return records


def _starting_lambda(gm: GraphModule, teacher: nn.Module | None, data: Dataset | DataLoader, cfg: TrainConfig) -> float:
    """``lambda0=None``: the paper's 1e-5, or for the target schedule the gates' gradient scale on the
    first batch (eval mode: no BatchNorm statistics or RNG touched, so resuming stays exact)."""
    if cfg.schedule != "target":
        return 1e-5
    x, y = next(iter(make_loader(data, cfg, shuffle=False)))
    x, y = x.to(cfg.resolved_device()), y.to(cfg.resolved_device())
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            target = teacher(x) if teacher is not None and cfg.kd else None
        scale = gradient_scale(gm, kd_loss(gm(x), target, y, temperature=cfg.temperature, weight=cfg.kd_weight))
    finally:
        gm.train(was_training)
    return distributed.from_rank0(scale)


def gate_lr(cfg: TrainConfig, schedule: LambdaSchedule) -> float:
    """Adam lr of the gates: ``cfg.gate_lr`` if set; else, for the target schedule, fast enough that a
    gate can fall from 1 to 0 in a third of the steps to the budget (Adam moves a gate by about its
    lr per step), at least ``cfg.lr`` and at most 0.1; for the other schedules ``cfg.lr``."""
    if cfg.gate_lr is not None:
        return cfg.gate_lr
    if schedule.mode != "target":
        return cfg.lr
    return min(0.1, max(cfg.lr, 3.0 / (schedule.reach * schedule.total_steps)))


@torch.no_grad()
def _probe_loss(gm: GraphModule, teacher: nn.Module | None, batches: list, cfg: TrainConfig) -> float:
    kd = {"temperature": cfg.temperature, "weight": cfg.kd_weight}
    return sum(float(kd_loss(gm(x), teacher(x) if teacher is not None and cfg.kd else None, y, **kd)) for x, y in batches)


def refine_selection(
    gm: GraphModule,
    data: Dataset | DataLoader,
    config: TrainConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    rounds: int = 16,
    batches: int = 8,
) -> dict[str, float]:
    """Swap kept and removed ReLUs of a binarized model while the measured loss falls; the count stays.

    Flipping gate element ``i`` changes the loss by about ``g_i * (1 - 2 c_i)``, ``g = dL/dc`` at
    the binary gates. Kept and removed elements of equal weight (channel gates weigh H*W) are
    paired best with best; pairs whose estimate is negative are swapped in blocks, best first.
    A block stays only when the loss on a fixed probe set (``batches`` batches other than the
    ``batches`` the gradient is taken on; eval mode, the fine-tune's loss) falls; else it is
    halved. At most ``rounds`` blocks are tried.

    Returns:
        ``{"swaps", "loss_before", "loss_after", "rounds"}`` (losses summed over the probe batches).

    Example:
        >>> snl_fx.binarize(gm, 2000)
        >>> info = snl_fx.refine_selection(gm, train_set, teacher=model)  # still 2,000 ReLUs
        >>> info["loss_after"] <= info["loss_before"]
        True
    """
    cfg = config or TrainConfig()
    device = cfg.resolved_device()
    meta = passes.get_meta(gm)
    gate_modules = passes.gates(gm)
    weights = gate_parameters(gm)
    if any(not bool(((w == 0) | (w == 1)).all()) for w in weights):
        raise SnlFxError("refine_selection needs binary gates: call snl_fx.binarize first")
    loader = make_loader(data, cfg, shuffle=True, epoch_seed=cfg.seed * 1_000_003 + 30_013)
    drawn = []
    for x, y in loader:
        drawn.append((x.to(device), y.to(device)))
        if len(drawn) == 2 * batches:
            break
    grad_batches, probe = drawn[: len(drawn) // 2] or drawn, drawn[len(drawn) // 2 :] or drawn
    size = torch.cat([torch.full((g.weight.numel(),), meta.site(n).numel // g.weight.numel()) for n, g in gate_modules.items()])
    was_training = gm.training
    gm.eval()
    best = before = _probe_loss(gm, teacher, probe, cfg)
    swaps, block, tried = 0, None, 0
    try:
        while tried < rounds:
            for w in weights:
                w.requires_grad_(True)
            grads = [torch.zeros_like(w) for w in weights]
            for x, y in grad_batches:
                with torch.no_grad():
                    target = teacher(x) if teacher is not None and cfg.kd else None
                loss = kd_loss(gm(x), target, y, temperature=cfg.temperature, weight=cfg.kd_weight)
                for acc, g in zip(grads, torch.autograd.grad(loss, weights)):
                    acc += g
            for w in weights:
                w.requires_grad_(False)
            c = torch.cat([w.detach().flatten() for w in weights]).cpu()
            g = torch.cat([a.flatten() for a in grads]).cpu()
            pairs = []  # (estimated change of the loss, kept index, removed index)
            for s in size.unique().tolist():
                kept = torch.nonzero((c == 1) & (size == s)).flatten()
                gone = torch.nonzero((c == 0) & (size == s)).flatten()
                kept = kept[torch.argsort(-g[kept])]  # removing i changes the loss by -g_i
                gone = gone[torch.argsort(g[gone])]  # adding j changes it by +g_j
                n = min(len(kept), len(gone))
                gain = -g[kept[:n]] + g[gone[:n]]
                pairs += [(float(e), int(i), int(j)) for e, i, j in zip(gain, kept[:n], gone[:n]) if e < 0]
            pairs.sort()
            block = len(pairs) if block is None else min(block, len(pairs))
            if block == 0:
                break
            improved = False
            while block >= 1 and tried < rounds:
                tried += 1
                flips = [i for _, i, _ in pairs[:block]] + [j for _, _, j in pairs[:block]]
                _flip(weights, flips)
                loss = _probe_loss(gm, teacher, probe, cfg)
                if loss < best:
                    best, swaps, improved = loss, swaps + block, True
                    break
                _flip(weights, flips)
                block //= 2
            if not improved:
                break
    finally:
        for w in weights:
            w.requires_grad_(False)
        gm.train(was_training)
    return {"swaps": swaps, "loss_before": before, "loss_after": best, "rounds": tried}


def _flip(weights: list[torch.Tensor], flat_indices: list[int]) -> None:
    """Toggle binary gate elements given by their index in the concatenation of ``weights``."""
    with torch.no_grad():
        flat = torch.cat([w.flatten() for w in weights])
        idx = torch.tensor(flat_indices, dtype=torch.long, device=flat.device)
        flat[idx] = 1 - flat[idx]
        for w, part in zip(weights, flat.split([w.numel() for w in weights])):
            w.copy_(part.view_as(w))


def finetune(
    gm: GraphModule,
    teacher: nn.Module | None,
    data: Dataset | DataLoader,
    config: TrainConfig | None = None,
    *,
    val_data: Dataset | DataLoader | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    budget: int | None = None,
    history: Sequence[EpochRecord] = (),
) -> list[EpochRecord]:
    """Fine-tune the weights of a binarized model with KD from ``teacher``; keep the best epoch.

    SGD (``config.finetune_lr``, momentum, weight decay; cosine decay over
    ``config.finetune_epochs`` unless ``finetune_schedule="constant"``). After the last epoch
    ``gm`` holds the weights of the epoch with the best ``val_data`` accuracy (the last epoch
    without ``val_data``).

    Args:
        gm: a binarized model (:func:`snl_fx.binarize`); its gates stay frozen.
        teacher: the original model (None, or ``config.kd=False``: plain cross-entropy).
        data, val_data, config, checkpoint, resume: as for :func:`train_gates`.
        budget, history: recorded in the checkpoints (the run's budget and earlier records), so that
            a resumed run can refuse another budget and report the whole run.

    Returns:
        One :class:`EpochRecord` per fine-tune epoch (those of the checkpoint first, when resuming).

    Example:
        >>> snl_fx.binarize(gm, 2000)
        >>> snl_fx.finetune(gm, model, train_set, snl_fx.TrainConfig(finetune_epochs=8), val_data=val_set)
    """
    cfg = config or TrainConfig()
    store = Checkpoint(checkpoint)
    state = _resume_state(store, resume, "finetune")
    final = relu_count_gated(gm, 0.5)
    params = [p for p in gm.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.finetune_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: _lr_factor(e, cfg.finetune_epochs, cfg.finetune_schedule))
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
    with distributed.data_parallel(gm, cfg.resolved_device(), cfg.sync_bn) as net:
        for epoch in range(start + 1, cfg.finetune_epochs + 1):
            loader = make_loader(data, cfg, shuffle=True, epoch_seed=seed_epoch(cfg, "finetune", epoch), shard=True)
            stats = timed(lambda: train_epoch(net, teacher, loader, optimizer, cfg, desc=f"finetune {epoch}/{cfg.finetune_epochs}"))
            scheduler.step()
            distributed.broadcast_state(gm)
            acc = distributed.on_rank0(lambda: evaluate(gm, val_data, cfg))
            record: EpochRecord = {"phase": "finetune", "epoch": epoch, "relu_count": final, "lambda": None,
                                   **distributed.mean_over_ranks(stats), "val_acc": acc}
            records.append(record)
            announce(epoch_line(record), cfg)
            if acc is None or best_acc is None or acc >= best_acc:
                best_acc, best_state = acc, copy.deepcopy(gm.state_dict())
            store.save({"phase": "finetune", "epoch": epoch, "relu_count": final, "budget": budget,
                        "granularity": passes.get_meta(gm).granularity, "model": gm.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "best_acc": best_acc,
                        "best_model": best_state, "history": [*history, *records]})
    gm.load_state_dict(best_state)
    return records


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
