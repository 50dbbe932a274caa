"""The lambda schedule of the gate phase: Algorithm 1 and the target schedule, the starting lambda, the gates' lr."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule
from torch.utils.data import DataLoader, Dataset

from snl_fx.errors import SnlFxError
from snl_fx.gated import gate_parameters
from snl_fx.train import distributed
from snl_fx.train.config import SCHEDULES, Schedule, TrainConfig
from snl_fx.train.loop import batch_loss, make_loader, to_device

__all__ = ["LambdaSchedule", "gate_lr", "gradient_scale", "starting_lambda"]


@dataclass
class LambdaSchedule:
    """Lambda of the Lasso penalty, driven by the ReLU count.

    ``target`` (default): every step, lambda steers the ReLU count along a target that falls
    geometrically from ``lowest`` (the model's count) to the budget at ``reach`` of
    ``total_steps`` and on below it. Lambda grows at full gain while the gates' mass ``sum c`` (in
    ReLUs, see :func:`soft_relu_count`) is above the target, at ``count_share`` of it while only
    the count ``#(c > eps)`` is, and shrinks while the count is below the target (``lam *=
    exp(gain * clip(error/band, -1, 1))``, error being the log ratio to the target). The mass
    answers a change of lambda at once, the count only once gates have crossed eps: rising
    mainly on the mass keeps lambda from running far ahead of gates still falling, while the
    slower rise on the count pushes down gates that hover above eps. No lambda0 or kappa to tune.
    ``paper``: Algorithm 1, once per epoch,
    ``lambda *= kappa`` when the count did not fall below its lowest so far. ``budget``: once per
    epoch, ``lambda *= kappa**k`` when the count is not falling fast enough to reach the budget by
    ``max_epochs`` (geometric fall assumed), ``k`` being the epochs in a row it has been behind.
    Call :meth:`after_step` after every optimizer step and :meth:`step` after every epoch; each
    mode ignores the call it does not use.

    Args:
        lam: the current lambda, the starting one when made (default 1e-5; > 0 for ``target``).
        kappa: growth factor of ``budget`` and ``paper``, >= 1 (default 1.1).
        mode: ``"target"`` (default), ``"budget"`` or ``"paper"``.
        budget: the ReLU count to reach.
        max_epochs: ``budget`` mode: the epochs in which to reach it (default 100).
        lowest: the lowest count so far; set it to the model's ReLU count before training
            (required by ``target``).
        total_steps: ``target``: optimizer steps the gate phase may take (epochs * batches), >= 1.
        reach: ``target``: the trajectory meets the budget after this share of the steps (default 0.85).
        gain: ``target``: largest change of log(lambda) per step; None (default):
            ``max(0.002, 20 / total_steps)``.
        band: ``target``: relative error of the mass at which the change is largest (default 0.05).
        count_share: ``target``: gain share while the mass is on target but the count is above
            (default 0.5).
        behind, steps, start, history: state (epochs behind, steps taken, the trajectory's start,
            per-epoch records), saved by :meth:`state_dict`; leave them at their defaults.

    Example:
        >>> schedule = snl_fx.train.LambdaSchedule(lam=1e-4, budget=2000, lowest=188416, total_steps=1000)
        >>> schedule.target(850)  # the target count after 850 steps: the budget
        2000.0
        >>> lam = schedule.after_step(snl_fx.train.relu_count_gated(gm), snl_fx.train.soft_relu_count(gm))
    """

    lam: float = 1e-5
    kappa: float = 1.1
    mode: Schedule = "target"
    budget: int = 0
    max_epochs: int = 100
    lowest: int | None = None  # set it to the model's ReLU count before training
    total_steps: int = 0  # target mode: optimizer steps the gate phase may take (epochs * batches)
    reach: float = 0.85  # target mode: the trajectory meets the budget after this share of the steps
    gain: float | None = None  # target mode: largest change of log(lambda) per step; None: max(0.002, 20/total_steps)
    band: float = 0.05  # target mode: relative error of the mass at which the change is largest
    count_share: float = 0.5  # target mode: gain share while the mass is on target but the count is above
    behind: int = 0
    steps: int = 0
    start: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULES:
            raise SnlFxError(f"schedule must be one of {SCHEDULES}, got {self.mode!r}")
        if not (self.lam >= 0 and self.kappa >= 1):
            raise SnlFxError(f"need lambda0 >= 0 and kappa >= 1, got {self.lam} and {self.kappa}")
        if self.mode == "target" and (self.total_steps < 1 or self.lowest is None or self.lam <= 0):
            raise SnlFxError("the target schedule needs total_steps >= 1, lowest (the model's ReLU count) and lambda0 > 0")
        if self.start is None:
            self.start = self.lowest
        if self.gain is None:
            self.gain = max(0.002, 20.0 / max(self.total_steps, 1))

    def target(self, step: int) -> float:
        """Target ReLU count after ``step`` optimizer steps (target mode)."""
        assert self.start is not None
        end = max(1, int(self.total_steps * self.reach))
        return self.start * (self.budget / self.start) ** (step / end)

    def after_step(self, count: int, mass: float | None = None) -> float:
        """Record the count and the gates' mass (:func:`soft_relu_count`; default: the count) after one
        optimizer step and return the lambda for the next (target mode; the others return lambda as is)."""
        if self.mode != "target":
            return self.lam
        self.steps += 1
        target = self.target(self.steps)
        by_mass = math.log(max(count if mass is None else mass, 1.0) / target)
        by_count = math.log(max(count, 1.0) / target)
        error, share = (by_mass, 1.0) if by_mass > 0 else (by_count, self.count_share if by_count > 0 else 1.0)
        self.lam *= math.exp(self.gain * share * max(-1.0, min(1.0, error / self.band)))
        return self.lam

    def step(self, count: int, epoch: int) -> float:
        """Record the count after ``epoch`` (1-based) and return the lambda for the next epoch."""
        self.history.append({"epoch": epoch, "relu_count": count, "lambda": self.lam})
        previous = self.lowest
        self.lowest = count if previous is None else min(previous, count)
        if self.mode == "paper":
            if previous is not None and count >= previous:
                self.lam *= self.kappa
        elif self.mode == "budget":
            if self._behind(count, previous, epoch):
                self.behind += 1
                self.lam *= self.kappa**self.behind
            else:
                self.behind = 0
        return self.lam

    def _behind(self, count: int, previous: int | None, epoch: int) -> bool:
        if count <= self.budget or previous is None:
            return False
        left = self.max_epochs - epoch
        if left <= 0:
            return True
        needed = (self.budget / count) ** (1.0 / left)  # per-epoch factor that lands on the budget
        return count / previous > needed

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "lowest": self.lowest, "behind": self.behind, "steps": self.steps,
                "start": self.start, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam, self.lowest, self.behind = state["lam"], state["lowest"], state["behind"]
        self.steps, self.start = state.get("steps", 0), state.get("start", self.start)
        self.history = list(state["history"])


def gradient_scale(gm: GraphModule, loss: torch.Tensor) -> float:
    """Median of ``|d loss / d c|`` over the gate elements that have a gradient: a starting lambda at
    which the least useful gates begin to fall (1e-5 when no gate has one)."""
    trainable = [w for w in gate_parameters(gm) if w.requires_grad]  # a plan may have closed some (Cost "sites")
    grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    flat = torch.cat([g.detach().abs().flatten() for g in grads if g is not None] or [torch.zeros(0)])
    flat = flat[flat > 0]
    return float(flat.median()) if flat.numel() else 1e-5


def starting_lambda(gm: GraphModule, teacher: nn.Module | None, data: Dataset | DataLoader, cfg: TrainConfig) -> float:
    """``lambda0=None``: the paper's 1e-5, or for the target schedule the gates' gradient scale on the
    first batch (eval mode: no BatchNorm statistics or RNG touched, so resuming stays exact)."""
    if cfg.schedule != "target":
        return 1e-5
    x, y = next(iter(make_loader(data, cfg, shuffle=False)))
    x, y = to_device(x, cfg.resolved_device()), y.to(cfg.resolved_device())
    was_training = gm.training
    gm.eval()
    try:
        scale = gradient_scale(gm, batch_loss(gm, teacher, x, y, cfg)[0])
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
