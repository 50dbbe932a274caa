"""The SNL pieces for any training loop: prepare, penalty, count, lambda schedule, binarize, convert."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn as nn
from torch.fx import GraphModule

import passes

from ._errors import SnlFxError

Schedule = Literal["target", "budget", "paper"]  # see LambdaSchedule
SCHEDULES: tuple[Schedule, ...] = get_args(Schedule)


def prepare(
    model: nn.Module,
    example_input: Any,
    granularity: passes.Granularity = "pixel",
    *,
    skip: Sequence[str] = (),
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
) -> GraphModule:
    """Trace a copy of ``model`` and put a trainable gate (initialised to 1) at every ReLU site.

    The result computes exactly what ``model`` computes until its gates move.

    Args:
        model: any nn.Module; it is deep-copied, never changed.
        example_input: an example batch (batch first), or a tuple of the forward's inputs; it
            sizes the gates.
        granularity: ``"pixel"`` (one gate per activation element) or ``"channel"`` (one per channel).
        skip: fnmatch patterns of site names to leave as plain ReLUs (e.g. a stem ReLU).
        concrete_args: passed to ``symbolic_trace`` (e.g. a bool argument of ``forward``).
        leaf_modules: module types traced as one call; their ReLUs are reported, not gated.

    Returns:
        A GraphModule with a :class:`passes.Gate` per site (see :func:`gates`); the sites are in
        ``passes.get_meta(gm).sites``. Raises SnlFxError when there is nothing to gate.

    Example:
        >>> gm = snl_fx.prepare(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
        >>> len(snl_fx.gates(gm)), snl_fx.relu_count_gated(gm)
        (17, 188416)
    """
    if granularity not in passes.gate.GRANULARITIES:
        raise SnlFxError(f"granularity must be one of {passes.gate.GRANULARITIES}, got {granularity!r}")
    gm = passes.find_relus(passes.trace(model, example_input, concrete_args=concrete_args, leaf_modules=leaf_modules))
    if not passes.get_meta(gm).sites:
        hidden = passes.get_meta(gm).ungateable
        extra = f" (ReLUs hidden in leaf modules: {', '.join(u.name for u in hidden)})" if hidden else ""
        raise SnlFxError(f"{type(model).__name__} has no ReLU call site to linearize{extra}")
    gm = passes.insert_gates(passes.make_out_of_place(gm), granularity, skip)
    if not passes.get_meta(gm).gates:
        raise SnlFxError(f"every ReLU site matches a skip pattern {list(skip)}: nothing to linearize")
    return gm


def gates(gm: GraphModule) -> dict[str, passes.Gate]:
    """Site name -> its gate module of a prepared model, in graph order (``gate.weight`` is ``c``)."""
    return passes.gates(gm)


def gate_parameters(gm: GraphModule) -> list[nn.Parameter]:
    """The gate tensors ``c`` of a prepared model (give them their own optimizer group if you like)."""
    return [g.weight for g in gates(gm).values()]


def lasso_penalty(gm: GraphModule) -> torch.Tensor:
    """``sum |c|`` over all gates (multiply by lambda and add to the loss)."""
    return sum(w.abs().sum() for w in gate_parameters(gm))


def clamp_gates(gm: GraphModule) -> None:
    """Project gates back into [0, 1] after an optimizer step (c outside it has no meaning)."""
    with torch.no_grad():
        for w in gate_parameters(gm):
            w.clamp_(0.0, 1.0)


def ungated_relus(gm: GraphModule) -> int:
    """ReLUs per sample at sites left as plain ReLUs (skipped by pattern)."""
    gated = passes.get_meta(gm).gates
    return sum(n for name, n in passes.site_counts(gm, None).items() if name not in gated)


def site_relu_counts(gm: GraphModule, eps: float = 0.01) -> dict[str, int]:
    """ReLUs per sample at each site: gates with ``c > eps`` (channel gates count H*W each)."""
    return passes.site_counts(gm, eps)


def relu_count_gated(gm: GraphModule, eps: float = 0.01) -> int:
    """The ReLU count of Algorithm 1: ``#(c > eps)`` per sample, plus ungated sites."""
    return sum(site_relu_counts(gm, eps).values())


def soft_relu_count(gm: GraphModule) -> float:
    """The gates' mass in ReLUs per sample: ``sum c`` (channel gates weigh H*W), plus ungated sites."""
    meta = passes.get_meta(gm)
    with torch.no_grad():
        mass = sum(float(g.weight.sum()) * (meta.site(n).numel // g.weight.numel()) for n, g in passes.gates(gm).items())
    return mass + ungated_relus(gm)


def total_relus(gm: GraphModule) -> int:
    """ReLUs per sample of the original model (every site)."""
    return sum(passes.site_counts(gm, None).values())


def resolve_budget(budget: int | float, total: int) -> int:
    """An int budget is ReLUs per sample; a float in (0, 1) is a fraction of ``total``."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise SnlFxError(f"budget must be an int (ReLUs per sample) or a float in (0, 1), got {budget!r}")
    if isinstance(budget, float):
        if not 0.0 < budget < 1.0:
            raise SnlFxError(f"a float budget is a fraction of the ReLUs and must lie in (0, 1), got {budget}")
        return max(1, round(budget * total))
    if budget <= 0:
        raise SnlFxError(f"budget must be positive, got {budget}")
    return int(budget)


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
    grads = torch.autograd.grad(loss, gate_parameters(gm), allow_unused=True)
    flat = torch.cat([g.detach().abs().flatten() for g in grads if g is not None] or [torch.zeros(0)])
    flat = flat[flat > 0]
    return float(flat.median()) if flat.numel() else 1e-5


def binarize(
    gm: GraphModule, budget: int, scores: dict[str, torch.Tensor] | None = None,
    tie_break: dict[str, torch.Tensor] | None = None,
) -> int:
    """Set every gate to exactly 0 or 1 and freeze it.

    Args:
        gm: a prepared model (gates soft or binary).
        budget: ReLUs per sample to keep, ungated sites included. Pixel gates: exactly ``budget``
            are kept (the top gate values, also when fewer than ``budget`` gates were above
            eps). Channel gates: whole channels, best first, each taken if it still fits; the
            count may end below ``budget``.
        scores: site -> tensor of the gate's shape, ranking the elements instead of the gate values.
        tie_break: same form (e.g. :func:`linearization_scores`), ordering elements of equal
            rank; else site order then element index does.

    Returns:
        The final ReLUs per sample. Raises SnlFxError when the ungated sites alone exceed ``budget``.

    Example:
        >>> snl_fx.binarize(gm, 2000)
        2000
        >>> lowered = snl_fx.convert(gm)
    """
    meta = passes.get_meta(gm)
    gate_modules = passes.gates(gm)
    room = budget - ungated_relus(gm)
    if room < 0:
        raise SnlFxError(f"the ungated sites alone have {ungated_relus(gm)} ReLUs, more than the budget {budget}")
    values, ties, weights, owners = [], [], [], []
    for name, gate in gate_modules.items():
        v = (scores[name] if scores is not None else gate.weight).detach().float().flatten().cpu()
        values.append(v)
        ties.append(tie_break[name].detach().float().flatten().cpu() if tie_break is not None else torch.zeros_like(v))
        weights.append(torch.full_like(v, meta.site(name).numel // v.numel(), dtype=torch.long))
        owners.append((name, v.numel()))
    flat_values, flat_weights = torch.cat(values), torch.cat(weights)
    order = torch.sort(-torch.cat(ties), stable=True).indices  # secondary key first, then a stable sort on the first
    order = order[torch.sort(-flat_values[order], stable=True).indices]
    keep = torch.zeros_like(flat_values, dtype=torch.bool)
    if meta.granularity == "pixel":
        keep[order[:room]] = True
    else:
        left = room
        for i, w in zip(order.tolist(), flat_weights[order].tolist()):
            if w <= left:
                keep[i], left = True, left - w
    start = 0
    for name, size in owners:
        gate = gate_modules[name]
        with torch.no_grad():
            gate.weight.copy_(keep[start : start + size].view_as(gate.weight).to(gate.weight))
        gate.weight.requires_grad_(False)
        start += size
    return int((keep.long() * flat_weights).sum()) + ungated_relus(gm)


def freeze_gates(gm: GraphModule) -> None:
    """Stop gradients to the gates (after :func:`binarize`, or after loading binary gates)."""
    for w in gate_parameters(gm):
        w.requires_grad_(False)


def linearization_scores(gm: GraphModule, example_input: Any) -> dict[str, torch.Tensor]:
    """Training-free importance of each gate element: mean of ``min(z, 0)**2`` over the batch.

    That is the squared error of replacing the ReLU by identity there; keeping the largest
    ones keeps the ReLUs whose removal would change the activations most.
    """
    granularity = passes.get_meta(gm).granularity
    scores: dict[str, torch.Tensor] = {}
    hooks = []
    for name, gate in passes.gates(gm).items():

        def record(module, inputs, output, name=name, shape=tuple(gate.weight.shape)):
            err = inputs[0].detach().clamp(max=0).pow(2).mean(0)
            if granularity == "channel":
                err = err.mean(dim=tuple(range(1, err.dim()))) if err.dim() > 1 else err
            scores[name] = err.reshape(shape)

        hooks.append(gate.register_forward_hook(record))
    was_training = gm.training
    try:
        gm.eval()
        with torch.no_grad():
            gm(*passes.as_args(example_input))
    finally:
        gm.train(was_training)
        for h in hooks:
            h.remove()
    return scores


def convert(gm: GraphModule) -> GraphModule:
    """Lower a binarized gated model to a static graph with only the kept ReLUs (a copy).

    Args:
        gm: a prepared model whose gates are all exactly 0 or 1 (after :func:`binarize`).

    Returns:
        A new GraphModule: per site, all kept -> ReLU, none kept -> removed, some kept ->
        :class:`passes.PartialReLU` (a ReLU on exactly the kept elements). ``gm`` is unchanged.
        Raises SnlFxError when a gate is not binary.

    Example:
        >>> final = snl_fx.binarize(gm, 2000)
        >>> lowered = snl_fx.convert(gm).eval()
        >>> snl_fx.relu_count(lowered, x).total
        2000
    """
    import copy

    return passes.lower_gates(copy.deepcopy(gm))


def max_abs_diff(a: nn.Module, b: nn.Module, example_input: Any) -> float:
    """Largest elementwise difference of two models' outputs in eval mode (modes restored)."""
    modes = a.training, b.training
    a.eval(), b.eval()
    try:
        with torch.no_grad():
            args = passes.as_args(example_input)
            out_a, out_b = a(*args), b(*args)
    finally:
        a.train(modes[0]), b.train(modes[1])
    return float((out_a - out_b).abs().max()) if out_a.numel() else 0.0


__all__ = [
    "LambdaSchedule",
    "binarize",
    "clamp_gates",
    "convert",
    "freeze_gates",
    "gate_parameters",
    "gates",
    "lasso_penalty",
    "linearization_scores",
    "prepare",
    "relu_count_gated",
    "resolve_budget",
    "site_relu_counts",
    "soft_relu_count",
]
