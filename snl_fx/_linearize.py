"""``snl_fx.linearize``: the whole SNL pass, from any nn.Module to a lowered static graph."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule
from torch.utils.data import DataLoader, Dataset

import passes

from . import distributed
from ._count import relu_count
from ._errors import SnlFxError
from ._export import check_exports
from ._validate import check_data
from ._snl import (
    LambdaSchedule,
    binarize,
    clamp_gates,
    convert,
    freeze_gates,
    gate_parameters,
    lasso_penalty,
    linearization_scores,
    max_abs_diff,
    prepare,
    relu_count_gated,
    resolve_budget,
    site_relu_counts,
    soft_relu_count,
    total_relus,
)
from ._train import Checkpoint, TrainConfig, announce, epoch_line, evaluate, make_loader, seed_epoch, timed, train_epoch

log = logging.getLogger("snl_fx")


@dataclass
class LinearizeResult:
    """What :func:`linearize` made. ``model`` is the lowered static graph; counts are per sample."""

    model: nn.Module
    gated: GraphModule | None  # the binarized gated model (its state_dict reloads with load_linearized)
    relu_count: int
    relu_count_before: int
    budget: int
    granularity: str
    method: str  # "snl" (trained gates), "one-shot" (training-free), or "unchanged"
    sites: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> {"before", "after"}
    history: list[dict[str, Any]] = field(default_factory=list)
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("model", "gated")}
        out["lambda_history"] = [h["lambda"] for h in self.history if h.get("phase") == "gates"]
        return out


def linearize(
    model: nn.Module,
    example_input: Any,
    budget: int | float,
    data: Dataset | DataLoader | None = None,
    *,
    val_data: Dataset | DataLoader | None = None,
    granularity: str = "pixel",
    skip: Sequence[str] = (),
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    config: TrainConfig | None = None,
    **overrides: Any,
) -> LinearizeResult:
    """Cut ``model``'s ReLUs to ``budget`` per sample and lower it to a static graph.

    ``budget``: an int is ReLUs per sample, a float in (0, 1) a fraction of the model's ReLUs.
    With ``data`` (a Dataset or DataLoader of (input, label)), runs SNL: gates and weights
    trained with a Lasso penalty until the count meets the budget, binarized to exactly the
    budget, then the weights fine-tuned with KD from ``model``; the best fine-tune epoch on
    ``val_data`` (default: 10% held out of ``data``, when it is a Dataset) is kept. Without
    ``data``, keeps the ReLUs whose removal changes the example batch most (training-free).
    ``config`` (a :class:`TrainConfig`; default ``TrainConfig()``) holds the training settings;
    ``overrides`` replace some of its fields (``epochs=8``, ``finetune_epochs=8``, ``lr=...``).
    ``out_dir`` gets a checkpoint every epoch; ``resume=True`` continues from it.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it starts the process group itself when the caller has
    not (NCCL on CUDA, gloo on CPU) and trains with DistributedDataParallel, one device per
    process: every rank starts from rank 0's model, each step splits the global ``batch_size``
    over the ranks, and every rank returns the same result; rank 0 alone logs and writes files.
    """
    cfg = _config(config, overrides)
    device = cfg.resolved_device()
    distributed.init_from_env(device)
    check_data(data, example_input)  # (input, label) pairs shaped like the example: fail now, not mid-training
    gm = prepare(model, example_input, granularity, skip=skip, concrete_args=concrete_args, leaf_modules=leaf_modules)
    check_exports(gm, example_input)  # an unexportable model fails in seconds, before training
    total = total_relus(gm)
    budget = resolve_budget(budget, total)
    before = site_relu_counts(gm)
    if budget >= total:
        warnings.warn(f"budget {budget:,} >= the model's {total:,} ReLUs: nothing to remove, model unchanged", stacklevel=2)
        unchanged = passes.trace(model, example_input, concrete_args=concrete_args, leaf_modules=leaf_modules)
        sites = {n: {"before": c, "after": c} for n, c in before.items()}
        return LinearizeResult(unchanged, None, total, total, budget, granularity, "unchanged", sites)

    if data is not None and val_data is None and isinstance(data, Dataset):
        from .data import split_train_val

        data, val_data = split_train_val(data, 0.1, seed=cfg.seed)
    teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    gm.to(device)
    for module in (teacher, gm):
        distributed.broadcast_state(module)
    checkpoint = Checkpoint(out_dir)
    history: list[dict[str, Any]] = []
    accuracy_before = distributed.on_rank0(lambda: evaluate(teacher, val_data, cfg))

    if data is None:
        log.info("no data: training-free one-shot selection on the example batch (%s)", granularity)
        scores = distributed.on_rank0(
            lambda: {k: v.cpu() for k, v in linearization_scores(gm, _to(example_input, device)).items()}
        )
        final = binarize(gm, budget, scores)
        method = "one-shot"
    else:
        state = checkpoint.load() if resume else None
        if resume and state is None and distributed.is_main():
            log.info("no checkpoint in %s: starting from scratch", out_dir)
        if state is not None:
            _check_resumable(state, budget, granularity)
            history = list(state["history"])
        if state is None or state["phase"] == "gates":
            _gate_phase(gm, teacher, data, val_data, budget, total, cfg, checkpoint, state, history)
            # gates at 0 tie: among them, keep the ReLUs whose removal changes the activations most
            ties = distributed.on_rank0(
                lambda: {k: v.cpu() for k, v in linearization_scores(gm, _to(example_input, device)).items()}
            )
            final = binarize(gm, budget, tie_break=ties)
            state = None
        else:
            final = state["relu_count"]
            freeze_gates(gm)  # binarized in the checkpoint
        _finetune_phase(gm, teacher, data, val_data, budget, final, granularity, cfg, checkpoint, state, history)
        method = "snl"

    gm.eval()
    lowered = convert(gm).eval()
    _verify(gm, lowered, example_input, final, device)
    after = site_relu_counts(gm, eps=0.5)
    sites = {n: {"before": before[n], "after": after[n]} for n in before}
    accuracy_after = distributed.on_rank0(lambda: evaluate(lowered, val_data, cfg))
    return LinearizeResult(
        lowered, gm, final, total, budget, granularity, method, sites, history, accuracy_before, accuracy_after
    )


def _config(config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    known = TrainConfig.__dataclass_fields__
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise SnlFxError(f"unknown option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(config or TrainConfig(), **overrides)


def _to(example_input: Any, device: torch.device) -> Any:
    return tuple(a.to(device) for a in passes.as_args(example_input))


def _check_resumable(state: dict[str, Any], budget: int, granularity: str) -> None:
    if state.get("budget") != budget or state.get("granularity") != granularity:
        raise SnlFxError(
            f"the checkpoint is for budget {state.get('budget')} ({state.get('granularity')}), not {budget} "
            f"({granularity}): use another output dir or drop --resume"
        )


def _gate_phase(gm, teacher, data, val_data, budget, total, cfg, checkpoint, state, history) -> None:
    """Algorithm 1: Adam on (W, C) + lambda*sum|c| until #(c > eps) <= budget (checked every step)."""
    steps_per_epoch = len(make_loader(data, cfg, shuffle=True, epoch_seed=0, shard=True))
    schedule = LambdaSchedule(cfg.lambda0, cfg.kappa, cfg.schedule, budget, cfg.epochs, lowest=total,
                              total_steps=cfg.epochs * steps_per_epoch)
    gates = set(map(id, gate_parameters(gm)))
    weights = [p for p in gm.parameters() if id(p) not in gates and p.requires_grad]
    optimizer = torch.optim.Adam(
        [{"params": weights}, {"params": gate_parameters(gm), "lr": gate_lr(cfg, schedule)}], lr=cfg.lr
    )
    start, count = 0, total
    if state is not None:
        gm.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, count = state["epoch"], state["relu_count"]
    path: list[tuple[int, int, float]] = []  # (step, count, lambda), a few per epoch, for plots
    every = max(1, steps_per_epoch // 20)

    def step_done() -> bool:
        # Checked every step, not only per epoch: once lambda dominates, many gates cross eps
        # together, and a per-epoch check lets the count crash far below the budget.
        clamp_gates(gm)
        now = distributed.from_rank0(relu_count_gated(gm, cfg.eps))
        schedule.after_step(now, soft_relu_count(gm))
        if schedule.steps % every == 0 or now <= budget:
            path.append((schedule.steps, now, schedule.lam))
        return now <= budget

    with distributed.data_parallel(gm, cfg.resolved_device(), cfg.sync_bn) as net:
        for epoch in range(start + 1, cfg.epochs + 1):
            if count <= budget:
                break
            lam, path[:] = schedule.lam, []
            loader = make_loader(data, cfg, shuffle=True, epoch_seed=seed_epoch(cfg, "gates", epoch), shard=True)
            stats = timed(lambda: train_epoch(
                net, teacher, loader, optimizer, cfg, penalty=lambda: schedule.lam * lasso_penalty(gm),
                after_step=step_done, desc=f"gates {epoch}/{cfg.epochs}",
            ))
            distributed.broadcast_state(gm)  # BatchNorm statistics of the last step: rank 0's
            count = distributed.from_rank0(relu_count_gated(gm, cfg.eps))
            schedule.step(count, epoch)
            record = {"phase": "gates", "epoch": epoch, "relu_count": count, "lambda": lam,
                      **distributed.mean_over_ranks(stats), "val_acc": distributed.on_rank0(lambda: evaluate(gm, val_data, cfg)),
                      "path": list(path)}
            history.append(record)
            announce(epoch_line(record), cfg)
            checkpoint.save({"phase": "gates", "epoch": epoch, "relu_count": count, "budget": budget,
                             "granularity": passes.get_meta(gm).granularity, "model": gm.state_dict(),
                             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "history": history})
    if count > budget and distributed.is_main():
        warnings.warn(
            f"the gates reached {count:,} ReLUs, not the budget {budget:,}, in {cfg.epochs} epochs; binarizing to "
            "the budget anyway (raise epochs for a better-trained selection)",
            stacklevel=3,
        )


def gate_lr(cfg: TrainConfig, schedule: LambdaSchedule) -> float:
    """Adam lr of the gates: ``cfg.gate_lr`` if set; else, for the target schedule, fast enough that a
    gate can fall from 1 to 0 in a third of the steps to the budget (Adam moves a gate by about its
    lr per step), at least ``cfg.lr`` and at most 0.1; for the other schedules ``cfg.lr``."""
    if cfg.gate_lr is not None:
        return cfg.gate_lr
    if schedule.mode != "target":
        return cfg.lr
    return min(0.1, max(cfg.lr, 3.0 / (schedule.reach * schedule.total_steps)))


def _finetune_phase(gm, teacher, data, val_data, budget, final, granularity, cfg, checkpoint, state, history) -> None:
    """Gates frozen; SGD on the weights with KD; keep the best epoch on the validation split."""
    params = [p for p in gm.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.finetune_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # cosine decay over the epochs given: the full lr first, near zero in the last epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: _cosine(e, cfg.finetune_epochs, cfg.finetune_schedule))
    start = 0
    best_acc = distributed.on_rank0(lambda: evaluate(gm, val_data, cfg))
    best_state = copy.deepcopy(gm.state_dict())
    if state is not None:
        gm.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, best_acc, best_state = state["epoch"], state["best_acc"], state["best_model"]
    with distributed.data_parallel(gm, cfg.resolved_device(), cfg.sync_bn) as net:
        for epoch in range(start + 1, cfg.finetune_epochs + 1):
            loader = make_loader(data, cfg, shuffle=True, epoch_seed=seed_epoch(cfg, "finetune", epoch), shard=True)
            stats = timed(lambda: train_epoch(net, teacher, loader, optimizer, cfg, desc=f"finetune {epoch}/{cfg.finetune_epochs}"))
            scheduler.step()
            distributed.broadcast_state(gm)
            acc = distributed.on_rank0(lambda: evaluate(gm, val_data, cfg))
            record = {"phase": "finetune", "epoch": epoch, "relu_count": final, "lambda": None,
                      **distributed.mean_over_ranks(stats), "val_acc": acc}
            history.append(record)
            announce(epoch_line(record), cfg)
            if acc is None or best_acc is None or acc >= best_acc:
                best_acc, best_state = acc, copy.deepcopy(gm.state_dict())
            checkpoint.save({"phase": "finetune", "epoch": epoch, "relu_count": final, "budget": budget,
                             "granularity": granularity, "model": gm.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "best_acc": best_acc, "best_model": best_state, "history": history})
    gm.load_state_dict(best_state)


def _cosine(epoch: int, epochs: int, schedule: str) -> float:
    """Fine-tune lr factor of 0-based ``epoch``: 1 throughout (``constant``) or a cosine from 1 to 0."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


def _verify(gm: GraphModule, lowered: nn.Module, example_input: Any, final: int, device: torch.device) -> None:
    """Guard: the lowered graph computes what the gated one does, with exactly ``final`` ReLUs."""
    args = _to(example_input, device)
    diff = max_abs_diff(gm, lowered, args)
    if diff > 1e-4:
        raise SnlFxError(f"internal error: lowered model differs from the gated model by {diff:.3g}")
    counted = relu_count(lowered, args).total
    if counted != final:
        raise SnlFxError(f"internal error: lowered model has {counted} ReLUs per sample, expected {final}")


def load_linearized(model: nn.Module, example_input: Any, state_dict_path: str | os.PathLike,
                    granularity: str = "pixel", skip: Sequence[str] = ()) -> GraphModule:
    """Rebuild a lowered model from the original model and a saved binarized gated state_dict."""
    gm = prepare(model, example_input, granularity, skip=skip)
    gm.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
    return convert(gm)
