"""Budgets in cost units: linearize to a predicted private-inference latency, traffic or rounds.

A :class:`Cost` budget is priced with the calibrated model of :mod:`snl_fx._cost`. A ReLU site
that keeps ``k`` ReLUs costs ``per_site + k * per_relu`` (in the budget's unit: under CrypTen
9 rounds while anything is kept, 464 B per ReLU), a site that keeps none costs nothing; the rest
of the model (linear layers, max-pools, output, ungated sites) is a fixed ``base``. From that:

* :class:`CostPlan.objective`: the gate phase's penalty and stopping value, in cost units;
* :meth:`CostPlan.select`: the binarization that meets the budget (drop whole sites, then fill
  elements by gate value);
* :func:`merge_for_cost`: ``passes.merge_linear`` where the merged op is predicted cheaper.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule

import passes

from ._cost import Network, PiCost, cost_from_report, cost_table, linear_features, parse_network, pi_cost, price
from ._errors import SnlFxError
from ._report import LinearCount, ReluReport
from ._snl import (
    binarize,
    lasso_penalty,
    max_abs_diff,
    relu_count_gated,
    site_relu_counts,
    soft_relu_count,
    total_relus,
)

UNITS = ("seconds", "bytes", "rounds")
PENALTIES = ("group", "drop")
_FORMS = "a latency (1.5s, 800ms), bytes (200MB, 1.5GB, 500kB, 1000000B) or rounds (150rounds)"
_SCALE = {"s": ("seconds", 1.0), "ms": ("seconds", 1e-3), "b": ("bytes", 1.0), "kb": ("bytes", 1e3),
          "mb": ("bytes", 1e6), "gb": ("bytes", 1e9), "r": ("rounds", 1.0), "round": ("rounds", 1.0),
          "rounds": ("rounds", 1.0)}


@dataclass(frozen=True)
class Cost:
    """A budget in cost units: one of ``seconds``, ``bytes`` or ``rounds`` per private inference
    of one sample, predicted by the calibrated model under ``protocol`` and ``network``.

    ``penalty`` is the gate phase's formulation: ``"group"`` (each gate priced by its marginal
    cost plus a group term per site for the rounds it costs while anything in it is kept) or
    ``"drop"`` (each gate priced by its site's average cost per ReLU, no group term; whole sites
    go only in the selection before binarization). See BENCHMARKS.md, "Cost budgets".
    """

    seconds: float | None = None
    bytes: float | None = None
    rounds: float | None = None
    protocol: str = "crypten"
    network: str | Network = "wan"
    penalty: str = "group"

    def __post_init__(self) -> None:
        given = [u for u in UNITS if getattr(self, u) is not None]
        if len(given) != 1:
            raise SnlFxError(f"a Cost needs exactly one of seconds, bytes or rounds, got {given or 'none'}")
        value = getattr(self, given[0])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
            raise SnlFxError(f"a Cost's {given[0]} must be a positive number, got {value!r}")
        table = cost_table(self.protocol)  # one-line error for an unknown protocol
        if given[0] == "rounds" and table.rounds is None:
            raise SnlFxError(f"protocol {self.protocol!r} has no known rounds: budget seconds or bytes instead")
        parse_network(self.network)
        if self.penalty not in PENALTIES:
            raise SnlFxError(f"Cost penalty must be one of {PENALTIES}, got {self.penalty!r}")

    @property
    def unit(self) -> str:
        """``"seconds"``, ``"bytes"`` or ``"rounds"``."""
        return next(u for u in UNITS if getattr(self, u) is not None)

    @property
    def limit(self) -> float:
        """The budget in its unit."""
        return float(getattr(self, self.unit))

    def of(self, cost: PiCost) -> float:
        """``cost`` (from :func:`snl_fx.pi_cost`) in this budget's unit."""
        return float(getattr(cost, self.unit) or 0)

    def predict(self, model: nn.Module | ReluReport, example_input: Any = None) -> PiCost:
        """:func:`snl_fx.pi_cost` of ``model`` under this budget's protocol and network."""
        return pi_cost(model, example_input, self.protocol, self.network)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: unit, limit, protocol, network."""
        return {"unit": self.unit, "limit": self.limit, "protocol": self.protocol,
                "network": dataclasses.asdict(parse_network(self.network)), "penalty": self.penalty}


def parse_cost(text: str, protocol: str = "crypten", network: str = "wan") -> Cost | None:
    """``"1.0s"``, ``"800ms"``, ``"200MB"``, ``"1.5GB"``, ``"500kB"``, ``"150rounds"`` -> a :class:`Cost`.

    Args:
        text: the budget as typed; a bare number (a ReLU count or fraction) gives None.
        protocol, network: of the Cost.

    Returns:
        The Cost, or None when ``text`` has no unit.
    """
    t = text.strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+)([a-z]+)", t)
    if m is None:
        if re.fullmatch(r"[\d.e+-]+%?", t):
            return None
        raise SnlFxError(f"--budget {text!r} is neither a ReLU budget (a count such as 15000, a fraction such as "
                         f"0.05, or 5%) nor {_FORMS}")
    if m.group(2) not in _SCALE:
        raise SnlFxError(f"--budget {text!r}: unknown unit {m.group(2)!r}; use {_FORMS}")
    unit, scale = _SCALE[m.group(2)]
    return Cost(**{unit: float(m.group(1)) * scale}, protocol=protocol, network=network)


@dataclass
class GateObjective:
    """What the gate phase drives down and where it stops (see :func:`snl_fx.train_gates`).

    ``penalty()`` is added to the loss times lambda; ``hard(eps)`` is the value of the gates
    thresholded at ``eps`` and ``soft()`` the gates' mass in the same unit (both steer lambda);
    the phase stops once ``hard(eps) <= limit``; ``start`` is the value before training.
    """

    penalty: Callable[[], torch.Tensor]
    hard: Callable[[float], float]
    soft: Callable[[], float]
    start: float
    limit: float
    unit: str = "ReLUs"


def count_objective(gm: GraphModule, budget: int) -> GateObjective:
    """The count mode's objective: ``sum|c|``, the ReLU count ``#(c > eps)`` down to ``budget``."""
    return GateObjective(lambda: lasso_penalty(gm), lambda eps: relu_count_gated(gm, eps), lambda: soft_relu_count(gm),
                         total_relus(gm), budget)


@dataclass
class CostPlan:
    """A Cost budget priced on one prepared model: ``cost = base + sum over kept sites of
    (per_site + kept * per_relu)``, all in the budget's unit (checked against ``pi_cost``)."""

    budget: Cost
    report: ReluReport  # the original model's, for pricing any kept counts
    gated: dict[str, int]  # gated site -> ReLUs per sample
    base: float
    per_site: float
    per_relu: float

    def value(self, kept: dict[str, int]) -> float:
        """Predicted cost, in the budget's unit, with ``kept`` ReLUs at the gated sites."""
        return self.base + sum(self.per_site + k * self.per_relu for k in kept.values() if k > 0)

    def pi_cost(self, kept: dict[str, int]) -> PiCost:
        """The calibrated model's full prediction with ``kept`` ReLUs at the gated sites."""
        sites = [dataclasses.replace(s, relus=kept.get(s.name, s.relus)) for s in self.report.sites]
        return _price(dataclasses.replace(self.report, sites=sites), self.budget)

    @property
    def room(self) -> float:
        """What the gated sites may cost."""
        return self.budget.limit - self.base

    def relu_ceiling(self) -> int:
        """The most ReLUs any selection within the budget can keep at the gated sites (one site open)."""
        total = sum(self.gated.values())
        if self.value(self.gated) <= self.budget.limit:
            return total
        if self.per_relu <= 0:
            return min(total - 1, max(self.gated.values())) if self.room >= self.per_site else 0
        return max(0, min(total - 1, math.floor((self.room - self.per_site) / self.per_relu)))

    def objective(self, gm: GraphModule) -> GateObjective:
        """The gate phase's objective for ``gm`` (prepared from the planned model), per ``budget.penalty``.

        Values exclude ``base`` (the schedule steers what training can change) and are in ReLU
        equivalents (the cost divided by the full model's cost per ReLU), so that the penalty and
        lambda have the scale of the count mode.
        """
        meta = passes.get_meta(gm)
        gates = passes.gates(gm)
        weight = {n: meta.site(n).numel // g.weight.numel() for n, g in gates.items()}
        start = self.value(self.gated) - self.base
        norm = start / max(1, sum(self.gated.values()))
        a, b = self.per_site, self.per_relu

        def penalty() -> torch.Tensor:
            terms = []
            for n, g in gates.items():
                c, mass = g.weight, g.weight.abs().sum() * weight[n]
                if self.budget.penalty == "group":
                    terms.append(b * mass + a * c.norm() / math.sqrt(c.numel()))
                else:  # each element at its site's average cost per ReLU
                    terms.append((b + a / self.gated[n]) * mass)
            return sum(terms) / norm

        def hard(eps: float) -> float:
            counts = site_relu_counts(gm, eps)
            return (self.value({n: counts[n] for n in gates}) - self.base) / norm

        def soft() -> float:
            with torch.no_grad():
                mass = sum(b * float(g.weight.sum()) * weight[n] + a * float(g.weight.max()) for n, g in gates.items())
            return mass / norm

        return GateObjective(penalty, hard, soft, start / norm, self.room / norm, f"ReLU equivalents of {self.budget.unit}")

    def merge(self, lowered: GraphModule, example_input: Any) -> tuple[GraphModule, int]:
        """:func:`merge_for_cost` under this plan's budget: merge ``lowered``'s linear ops (in place)
        where the merged op is predicted cheaper; returns the model and the number of merges."""
        return merge_for_cost(lowered, self.budget, example_input)

    def select(self, gm: GraphModule, scores: dict[str, torch.Tensor] | None = None,
               tie_break: dict[str, torch.Tensor] | None = None) -> int:
        """Binarize ``gm`` to the kept set that meets the budget; returns the final ReLUs per sample.

        Greedy: while dropping one whole site (all its ReLUs) keeps more gate mass within the
        budget (the freed per-site cost buys elements elsewhere), drop the one that keeps the most;
        then :func:`snl_fx.binarize` fills the open sites by gate value (``scores`` if given).
        """
        gates = passes.gates(gm)
        names = list(gates)
        values = {n: (scores[n] if scores is not None else gates[n].weight).detach().float().flatten().cpu() for n in names}
        sizes = {n: self.gated[n] // values[n].numel() for n in names}
        ranked = {n: torch.sort(values[n], descending=True).values for n in names}

        def fill(open_: list[str]) -> tuple[float, int, int] | None:
            """(kept mass, kept ReLUs, ReLU room) with the sites ``open_``; None when over budget."""
            left = self.room - self.per_site * len(open_)
            if left < 0:
                return None
            room = math.inf if self.per_relu <= 0 else math.floor(left / self.per_relu + 1e-9)
            flat = torch.cat([ranked[n].repeat_interleave(sizes[n]) for n in open_]) if open_ else torch.zeros(0)
            top = torch.sort(flat, descending=True).values[: int(min(room, flat.numel()))]
            return float(top.sum()), int(top.numel()), int(min(room, flat.numel()))

        def rank(f: tuple[float, int, int] | None) -> tuple[float, float]:
            return (-math.inf, -math.inf) if f is None else (f[0], f[1])

        site_mass = {n: float(values[n].sum()) * sizes[n] for n in names}
        open_ = list(names)
        best = fill(open_)
        while open_:  # over budget: drop the site of least mass; else only while a drop keeps more
            f, n = max(((fill([m for m in open_ if m != n]), n) for n in open_),
                       key=lambda t: (rank(t[0]), -site_mass[t[1]]))
            if best is not None and rank(f) <= rank(best):
                break
            open_.remove(n)
            best = f
        if best is None:
            raise SnlFxError(f"the budget {self.budget.limit:g} {self.budget.unit} cannot be met: the model costs "
                             f"{self.base:g} without any gated ReLU")
        ranks = {n: values[n].view_as(gates[n].weight) if n in open_ else torch.full_like(values[n], -math.inf).view_as(gates[n].weight)
                 for n in names}
        ungated = sum(s.relus for s in self.report.sites) - sum(self.gated.values())
        final = binarize(gm, best[2] + ungated, scores=ranks, tie_break=tie_break)
        kept = site_relu_counts(gm, 0.5)
        if any(kept[n] for n in names if n not in open_) or self.value({n: kept[n] for n in names}) > self.budget.limit + 1e-9:
            raise SnlFxError("internal error: the cost selection kept ReLUs over the budget")
        return final


def plan_cost(budget: Cost, model: nn.Module, example_input: Any, gm: GraphModule) -> CostPlan:
    """Price ``budget`` on ``model`` (original) and ``gm`` (its prepared copy).

    Args:
        budget: the Cost budget.
        model, example_input: the original model and an example batch.
        gm: the model from :func:`snl_fx.prepare`.

    Returns:
        The :class:`CostPlan`; a one-line SnlFxError when the protocol cannot price ReLUs.
    """
    from ._count import relu_count

    report = relu_count(model, example_input)
    gated = {n: passes.get_meta(gm).site(n).numel for n in passes.gates(gm)}
    empty = {n: 0 for n in gated}

    def value(kept: dict[str, int]) -> float:
        sites = [dataclasses.replace(s, relus=kept.get(s.name, s.relus)) for s in report.sites]
        return budget.of(_price(dataclasses.replace(report, sites=sites), budget))

    first = next(iter(gated))
    base = value(empty)
    one, two = value({**empty, first: 1}) - base, value({**empty, first: 2}) - base
    per_relu = two - one
    plan = CostPlan(budget, report, gated, base, one - per_relu, per_relu)
    if per_relu < 0 or plan.per_site < 0 or abs(plan.value(gated) - value(gated)) > 1e-6 * max(1.0, value(gated)):
        raise SnlFxError(f"protocol {budget.protocol!r} does not price a ReLU site as per-site + per-ReLU cost")
    return plan


def _price(report: ReluReport, budget: Cost) -> PiCost:
    return cost_from_report(report, cost_table(budget.protocol), parse_network(budget.network))


def cost_summary(budget: Cost, before: PiCost, after: PiCost, merged: int = 0) -> dict[str, Any]:
    """The result's ``cost``: the budget, and predicted bytes, rounds and seconds before and after."""

    def row(c: PiCost) -> dict[str, Any]:
        return {"bytes": c.bytes, "rounds": c.rounds, "seconds": c.seconds}

    return {"budget": budget.to_dict(), "before": row(before), "after": row(after),
            "met": budget.of(after) <= budget.limit * (1 + 1e-9), "merged_ops": merged}


def merge_for_cost(lowered: GraphModule, budget: Cost, example_input: Any) -> tuple[GraphModule, int]:
    """``passes.merge_linear`` on ``lowered`` (in place) where the merged op is predicted cheaper.

    A merge is done when its linear layers cost less in the budget's unit, or the same with no
    more multiply-accumulates (BatchNorm folds). Checks the output within 1e-4 of the unmerged model.

    Returns:
        The merged model and the number of merges done.
    """
    import copy

    reference = copy.deepcopy(lowered)
    modules = dict(lowered.named_modules())
    done = []

    def linear(node: Any, input_numel: int) -> LinearCount | None:
        mod = modules.get(str(node.target)) if getattr(node, "op", None) == "call_module" else None
        if not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return None  # BatchNorm (folded at export), add, identity: free under secret sharing
        out = math.prod(node.meta["tensor_meta"].shape[1:])
        return LinearCount(str(node.target), type(mod).__name__, input_numel, mod.weight.numel(), out, 0)

    def unit_cost(layers: list[LinearCount]) -> float:
        total = 0.0
        for layer in layers:
            nbytes, rounds, compute = price(linear_features(layer), budget.protocol)
            values = {"bytes": nbytes or 0.0, "rounds": rounds or 0,
                      "seconds": (compute or 0.0) + parse_network(budget.network).seconds(nbytes or 0.0, rounds or 0)}
            total += values[budget.unit]
        return total

    def should_merge(c: passes.MergeCandidate) -> bool:
        inputs = [math.prod(c.in_shape), math.prod(c.inner_shapes[0]) if c.inner_shapes else 0]
        if c.kind == "shortcut":
            inputs = [math.prod(c.in_shape)] * 2
        before = [la for la in (linear(n, i) for n, i in zip(c.nodes, inputs)) if la is not None]
        after = [LinearCount("merged", type(c.merged).__name__, math.prod(c.in_shape), c.merged.weight.numel(),
                             math.prod(c.out_shape), 0)]
        cost_before, cost_after = unit_cost(before), unit_cost(after)
        ok = cost_after < cost_before or (cost_after == cost_before and c.macs_after <= c.macs_before)
        if ok:
            done.append(c.kind)
        return ok

    merged = passes.merge_linear(lowered, should_merge=should_merge)
    diff = max_abs_diff(reference, merged, example_input)
    if diff > 1e-4:
        raise SnlFxError(f"internal error: the merged model differs from the unmerged one by {diff:.3g}")
    return merged, len(done)


__all__ = ["Cost", "CostPlan", "GateObjective", "cost_summary", "count_objective", "merge_for_cost", "parse_cost", "plan_cost"]
