"""Budgets, and the plans they make on a prepared model.

A *budget* is what the user asks for: a ReLU count (``Relus(15000)``), a fraction of the model's
ReLUs (``Relus(0.05)``), or a predicted private-inference cost (:class:`Cost`). :func:`as_budget`
puts every accepted spelling into one of them (``15000``, ``0.05``, ``"5%"``, ``"1.5s"``,
``"200MB"``, ``"800Mb"``, ``"150rounds"``): the API and the CLIs share it.

Bound to a prepared model (``budget.plan(gm)``), a budget gives a :class:`Plan`, which answers
everything the pipeline asks, so that nothing outside this module asks which kind it holds:

* ``ceiling``: the most ReLUs per sample the selection may keep (``result.budget``);
* ``objective(gm)``: the gate phase's penalty and stopping value;
* ``select(gm)``: the exact final selection (a count: :func:`snl_fx.binarize`; a Cost: drop whole
  sites while that buys more gate mass, then fill by gate value); ``refine(...)`` when asked;
* ``finish(lowered)``: a count: nothing; a Cost: merge linear ops where cheaper, state the cost;
* ``key``: the identity recorded in checkpoints, so that a resume under another budget is refused.

A Cost is priced with the calibrated model of :mod:`snl_fx.cost`: a ReLU site that keeps ``k``
ReLUs costs ``per_site + k * per_relu`` in the budget's unit (under CrypTen 9 rounds while
anything is kept, 464 B per ReLU), a site that keeps none costs nothing, and the rest of the model
(linear layers, max-pools, output, ungated sites) is a fixed ``base``.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import re
import warnings
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.fx import GraphModule

from snl_fx import passes
from snl_fx.cost.model import Network, PiCost, cost_from_report, cost_table, parse_network, pi_cost
from snl_fx.errors import InternalError, SnlFxError
from snl_fx.gated import site_relu_counts, total_relus
from snl_fx.inspect.report import ReluReport
from snl_fx.select import binarize
from snl_fx.train.objective import GateObjective, count_objective, joint_objective

__all__ = ["Budget", "Cost", "CostPlan", "CountPlan", "Families", "FamilyCostPlan", "FamilyPlan", "GateObjective", "Plan", "Relus",
           "as_budget", "bind", "budget_families",
           "cost_summary", "count_objective", "parse_cost", "plan_cost", "resolve_budget"]

log = logging.getLogger("snl_fx")

UNITS = ("seconds", "bytes", "rounds")
PENALTIES = ("group", "drop", "sites")
_RELU_FORMS = "a ReLU count (an integer such as 15000), a fraction in (0, 1) such as 0.05, or a percentage such as 5%"
_COST_FORMS = ("a latency (1.5s, 800ms), bytes (200MB, 1.5GB, 500kB, 1000000B), bits (800Mb, 1Gb, 64kb) "
               "or rounds (150rounds)")
# unit as typed -> (Cost field, scale). Case matters for traffic: B is a byte, b a bit (Mb: megabits).
_SCALE = {"s": ("seconds", 1.0), "ms": ("seconds", 1e-3),
          "B": ("bytes", 1.0), "kB": ("bytes", 1e3), "KB": ("bytes", 1e3), "MB": ("bytes", 1e6), "GB": ("bytes", 1e9),
          "b": ("bytes", 1 / 8), "kb": ("bytes", 1e3 / 8), "Kb": ("bytes", 1e3 / 8), "Mb": ("bytes", 1e6 / 8),
          "Gb": ("bytes", 1e9 / 8), "r": ("rounds", 1.0), "round": ("rounds", 1.0), "rounds": ("rounds", 1.0)}


class Plan(abc.ABC):
    """A budget bound to one prepared model: every decision the pipeline needs from it."""

    budget: Budget
    total: int  # ReLUs per sample of the model, every site
    ceiling: int  # the most ReLUs per sample the selection may keep, ungated sites included
    granularity: str

    @property
    def nothing_to_remove(self) -> bool:
        """The model as it is meets the budget."""
        return self.ceiling >= self.total

    @property
    def families(self) -> tuple[str, ...]:
        """The nonlinearity families this plan gates (``prepare``'s ``families``)."""
        return self.budget.families

    def family_budgets(self) -> dict[str, int | None]:
        """Each family's most elements per sample (None where a Cost trades several families)."""
        return {f: self.ceiling if len(self.families) == 1 else None for f in self.families}

    gated_sites: list[str]  # the sites with a gate (all but the skipped ones), in graph order

    @property
    def key(self) -> dict[str, Any]:
        """The identity of this plan in checkpoints: the budget, the ReLU ceiling, the granularity
        and the gated sites (a resume with another ``skip`` is refused too)."""
        return {**self.budget.to_dict(), "relus": self.ceiling, "granularity": self.granularity,
                "gated": self.gated_sites}

    def matches(self, saved: Any) -> bool:
        """Whether a checkpoint's recorded key (``saved``) is this plan's: a resume may go on. A key
        written before keys named the gated sites matches when all the rest is equal."""
        key = self.key
        if isinstance(saved, dict) and "gated" not in saved:
            key = {k: v for k, v in key.items() if k != "gated"}
        return saved == key

    @abc.abstractmethod
    def objective(self, gm: GraphModule) -> GateObjective:
        """The gate phase's penalty and stopping value on ``gm`` (prepared from the planned model)."""

    @abc.abstractmethod
    def select(self, gm: GraphModule, scores: dict[str, torch.Tensor] | None = None,
               tie_break: dict[str, torch.Tensor] | None = None) -> int:
        """Binarize ``gm`` to the plan's exact selection; returns the final ReLUs per sample.

        ``scores`` (site -> tensor of the gate's shape) rank the elements instead of the gate
        values; ``tie_break`` orders elements of equal rank (see :func:`snl_fx.binarize`).
        """

    def refine(self, gm: GraphModule, data: Any, config: Any, teacher: nn.Module | None) -> None:
        """Swap kept and removed ReLUs while the loss falls (``TrainConfig.refine``), where the plan allows it."""
        warnings.warn(f"refine=True is not applied under a {type(self.budget).__name__} budget", stacklevel=4)

    def before_gates(self, gm: GraphModule, data: Any, val_data: Any, config: Any, example_input: Any) -> None:
        """Decisions the plan takes on the training and validation data before the gate phase (none by default)."""

    def finish(self, lowered: GraphModule, example_input: Any) -> tuple[GraphModule, dict[str, Any] | None]:
        """Last step on the lowered model: returns it (changed or not) and the result's ``cost``."""
        return lowered, None

    def unchanged_cost(self) -> dict[str, Any] | None:
        """The result's ``cost`` when the model is returned unchanged."""
        return None


@dataclass(frozen=True)
class Relus:
    """A budget in ReLUs per sample: an int is a count, a float in (0, 1) a fraction of the model's.

    Example:
        >>> snl_fx.linearize(model, x, Relus(0.05), data)  # the same as budget=0.05
    """

    value: int | float

    def __post_init__(self) -> None:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SnlFxError(f"budget must be an int (ReLUs per sample) or a float in (0, 1), got {v!r}")
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise SnlFxError(f"a float budget is a fraction of the ReLUs and must lie in (0, 1), got {v}")
        if isinstance(v, int) and v <= 0:
            raise SnlFxError(f"budget must be positive, got {v}")

    def relus(self, total: int) -> int:
        """The count this budget allows on a model of ``total`` ReLUs per sample."""
        return max(1, round(self.value * total)) if isinstance(self.value, float) else int(self.value)

    families: ClassVar[tuple[str, ...]] = ("relu",)  # what it gates

    def plan(self, gm: GraphModule) -> CountPlan:
        """Bind to ``gm`` (from :func:`snl_fx.prepare`)."""
        return CountPlan(self, gm)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"unit": "relus"}`` (the count itself is the plan's ``relus``)."""
        return {"unit": "relus"}


class CountPlan(Plan):
    """A ReLU budget on a prepared model: gates trained on ``sum|c|``, binarized to exactly the count.

    With ``family`` (``"gelu"``, ``"softmax"``, ...), the same for that family's elements."""

    def __init__(self, budget: Relus, gm: GraphModule, family: str = "relu") -> None:
        self.budget, self.family, self.total = budget, family, total_relus(gm, family)
        self.ceiling = budget.relus(self.total)
        meta = passes.get_meta(gm)
        self.granularity = (meta.granularity or "pixel") if family == "relu" else meta.units.get(family, "")
        self.gated_sites = list(passes.gates(gm, family))

    @property
    def families(self) -> tuple[str, ...]:
        return (self.family,)

    def objective(self, gm: GraphModule) -> GateObjective:
        return count_objective(gm, self.ceiling, self.family)

    def select(self, gm: GraphModule, scores: dict[str, torch.Tensor] | None = None,
               tie_break: dict[str, torch.Tensor] | None = None) -> int:
        return binarize(gm, self.ceiling, scores, tie_break, family=self.family)

    def refine(self, gm: GraphModule, data: Any, config: Any, teacher: nn.Module | None) -> None:
        from snl_fx.select import refine_selection

        refined = refine_selection(gm, data, config, teacher=teacher)
        log.info("refined the selection: %d swaps, probe loss %.4g -> %.4g",
                 refined["swaps"], refined["loss_before"], refined["loss_after"])


@dataclass(frozen=True)
class Cost:
    """A budget in cost units: one of ``seconds``, ``bytes`` or ``rounds`` per private inference
    of one sample, predicted by the calibrated model under ``protocol`` and ``network``.

    Args:
        seconds, bytes, rounds: exactly one of them, a positive number.
        protocol: one of :func:`snl_fx.cost.protocols` (default ``"crypten"``).
        network: ``"lan"``, ``"wan"`` (default), ``"MBPS,RTT_MS"`` or a :class:`snl_fx.cost.Network`.
        penalty: the formulation, ``"sites"`` (default), ``"group"`` or ``"drop"`` (below).
        families: the nonlinearity families the selection trades (default ReLUs alone); e.g.
            ``("gelu", "softmax")`` trades a GELU token against a softmax row by what each costs
            under ``protocol`` (:class:`FamilyCostPlan`).

    Example:
        >>> result = snl_fx.linearize(model, x, snl_fx.Cost(seconds=1.0, protocol="crypten", network="wan"), data)
        >>> result.cost["after"]["seconds"] <= 1.0
        True

    ``penalty`` is the gate phase's formulation: ``"group"`` (each gate priced by its marginal
    cost plus a group term per site for the rounds it costs while anything in it is kept),
    ``"drop"`` (each gate priced by its site's average cost per ReLU, no group term; whole sites
    go only in the selection before binarization) or ``"sites"`` (a selection chosen first, on
    validation data, among whole-site selections that include layer culling's; every epoch then
    fine-tunes: :meth:`CostPlan.choose_sites`). See BENCHMARKS.md,
    "Cost budgets".
    """

    seconds: float | None = None
    bytes: float | None = None
    rounds: float | None = None
    protocol: str = "crypten"
    network: str | Network = "wan"
    penalty: str = "sites"
    families: tuple[str, ...] = ("relu",)

    def __post_init__(self) -> None:
        families = (self.families,) if isinstance(self.families, str) else tuple(self.families)
        object.__setattr__(self, "families", families)
        unknown = [f for f in families if f not in passes.FAMILIES]
        if unknown or not families:
            raise SnlFxError(f"a Cost gates nonlinearity families of {', '.join(passes.FAMILIES)}, got {families!r}")
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

    def met_by(self, cost: PiCost) -> bool:
        """Whether ``cost`` (from :func:`snl_fx.pi_cost`) is within this budget, up to float rounding."""
        return self.of(cost) <= self.limit * (1 + 1e-9)

    def predict(self, model: nn.Module | ReluReport, example_input: Any = None) -> PiCost:
        """:func:`snl_fx.pi_cost` of ``model`` under this budget's protocol and network."""
        return pi_cost(model, example_input, self.protocol, self.network)

    def plan(self, gm: GraphModule) -> CostPlan | FamilyCostPlan:
        """Price this budget on ``gm`` (from :func:`snl_fx.prepare`): see :class:`CostPlan` (ReLUs)
        and :class:`FamilyCostPlan` (other families)."""
        return plan_cost(self, gm) if self.families == ("relu",) else FamilyCostPlan(self, gm)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: unit, limit, protocol, network, penalty (and the families, unless ReLUs alone)."""
        out = {"unit": self.unit, "limit": self.limit, "protocol": self.protocol,
               "network": dataclasses.asdict(parse_network(self.network)), "penalty": self.penalty}
        return out if self.families == ("relu",) else {**out, "families": list(self.families)}


@dataclass(frozen=True)
class Families:
    """A budget per nonlinearity family, each met exactly: elements per sample kept, a count (int)
    or a fraction (float in (0, 1)) of the family's elements, as :class:`Relus` is for ReLUs.

    Example:
        >>> snl_fx.linearize(vit, x, {"gelu": 0.1, "softmax": 0.25}, data)  # the same as Families({...})
    """

    budgets: dict[str, int | float]

    def __post_init__(self) -> None:
        if not isinstance(self.budgets, dict) or not self.budgets:
            raise SnlFxError(f"a per-family budget maps families to counts or fractions, got {self.budgets!r}")
        for family, value in self.budgets.items():
            if family not in passes.FAMILIES:
                raise SnlFxError(f"unknown nonlinearity family {family!r} in the budget; gateable: "
                                 f"{', '.join(passes.FAMILIES)}")
            try:
                Relus(value)
            except SnlFxError as exc:
                raise SnlFxError(f"budget for {family}: {exc}") from None
        object.__setattr__(self, "budgets", dict(self.budgets))

    @property
    def families(self) -> tuple[str, ...]:
        """The families this budget gates."""
        return tuple(self.budgets)

    def plan(self, gm: GraphModule) -> FamilyPlan:
        """Bind to ``gm`` (from :func:`snl_fx.prepare` with these families)."""
        return FamilyPlan(self, gm)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"unit": "families", "budgets": {...}}``."""
        return {"unit": "families", "budgets": dict(self.budgets)}


class FamilyPlan(Plan):
    """Per-family budgets on a prepared model: one :class:`CountPlan` per family, the gate phase on
    their :func:`joint_objective`, each family binarized under its own budget."""

    def __init__(self, budget: Families, gm: GraphModule) -> None:
        missing = [f for f in budget.families if not passes.gates(gm, f)]
        if missing:
            raise SnlFxError(f"the model has no gated site of the famil{'y' if len(missing) == 1 else 'ies'} "
                             f"{', '.join(missing)} (prepare it with families={list(budget.families)})")
        self.budget = budget
        self.plans = {f: CountPlan(Relus(v), gm, f) for f, v in budget.budgets.items()}
        self.total = sum(p.total for p in self.plans.values())
        self.ceiling = sum(p.ceiling for p in self.plans.values())
        self.granularity = ",".join(f"{f}:{p.granularity}" for f, p in self.plans.items())
        self.gated_sites = list(passes.gates(gm, None))

    @property
    def nothing_to_remove(self) -> bool:
        return all(p.nothing_to_remove for p in self.plans.values())

    @property
    def key(self) -> dict[str, Any]:
        meta_units = {f: p.granularity for f, p in self.plans.items()}
        return {**self.budget.to_dict(), "elements": {f: p.ceiling for f, p in self.plans.items()},
                "units": meta_units, "gated": self.gated_sites}

    def objective(self, gm: GraphModule) -> GateObjective:
        objectives = {f: p.objective(gm) for f, p in self.plans.items()}
        return next(iter(objectives.values())) if len(objectives) == 1 else joint_objective(objectives)

    def family_budgets(self) -> dict[str, int | None]:
        return {f: p.ceiling for f, p in self.plans.items()}

    def select(self, gm: GraphModule, scores: dict[str, torch.Tensor] | None = None,
               tie_break: dict[str, torch.Tensor] | None = None) -> int:
        return sum(p.select(gm, scores, tie_break) for p in self.plans.values())


Budget = Relus | Cost | Families  # what as_budget returns; each has .plan(gm) and .to_dict()


def as_budget(budget: Any, protocol: str = "crypten", network: Any = "wan",
              families: Sequence[str] | None = None) -> Budget:
    """Any accepted spelling of a budget -> a :class:`Relus` or a :class:`Cost` (the one parser).

    Args:
        budget: a :class:`Relus` or :class:`Cost` (returned as is); an int (ReLUs per sample); a
            float in (0, 1) (a fraction); or text: ``"15000"``, ``"0.05"``, ``"5%"``, or a cost
            with its unit, ``"1.5s"``, ``"800ms"``, ``"200MB"``, ``"800Mb"`` (megabits),
            ``"150rounds"``.
        protocol, network: of a Cost given as text.
        families: of a Cost given as text: the nonlinearity families it trades (default ReLUs).

    Returns:
        The budget. Raises a one-line SnlFxError for anything else.

    Example:
        >>> as_budget("5%"), as_budget("1.5s", "spu-cheetah", "lan").unit
        (Relus(value=0.05), 'seconds')
    """
    if isinstance(budget, (Relus, Cost, Families)):
        return budget
    if isinstance(budget, dict):
        return Families(budget)
    if isinstance(budget, str) and "=" in budget:
        return Families(_parse_families(budget))
    if isinstance(budget, str) and families:
        cost = parse_cost(budget, protocol, network)
        if cost is None:
            raise SnlFxError(f"families are for a cost budget (200MB, 1.5s, ...), not {budget!r}; budget "
                             "families apart as gelu=0.1,softmax=25%")
        return dataclasses.replace(cost, families=tuple(families))
    if isinstance(budget, str):
        return parse_cost(budget, protocol, network) or Relus(_parse_relus(budget))
    if isinstance(budget, Plan):
        raise SnlFxError("expected a budget, got a plan: pass the plan's budget (plan.budget)")
    return Relus(budget)


def budget_families(budget: Any) -> tuple[str, ...]:
    """The nonlinearity families a budget (any spelling :func:`as_budget` takes, or a plan) gates.

    Example:
        >>> budget_families(0.05), budget_families({"gelu": 0.1, "softmax": 0.25})
        (('relu',), ('gelu', 'softmax'))
    """
    return budget.families if isinstance(budget, Plan) else as_budget(budget).families


def bind(budget: Any, gm: GraphModule) -> Plan:
    """``as_budget(budget).plan(gm)``; a :class:`Plan` is returned as it is.

    Example:
        >>> plan = bind(0.05, snl_fx.prepare(model, x))
        >>> plan.ceiling
    """
    return budget if isinstance(budget, Plan) else as_budget(budget).plan(gm)


def _parse_families(text: str) -> dict[str, int | float]:
    """``"gelu=0.1,softmax=25%"`` -> ``{"gelu": 0.1, "softmax": 0.25}``."""
    budgets: dict[str, int | float] = {}
    for part in text.split(","):
        family, sep, value = part.partition("=")
        if not sep or not family.strip():
            raise SnlFxError(f"--budget {text!r}: write per-family budgets as family=budget, e.g. gelu=0.1,softmax=25%")
        budgets[family.strip()] = _parse_relus(value)
    return budgets


def _parse_relus(text: str) -> int | float:
    t = text.strip()
    if re.fullmatch(r"\d+", t):
        return int(t)
    if re.fullmatch(r"\d+(\.\d*)?%|\.\d+%", t):
        value = float(t[:-1]) / 100
    else:
        try:
            value = float(t)
        except ValueError:
            value = math.nan
    if not 0 < value < 1:  # also refuses nan, inf, 1,000 and counts written as floats
        raise SnlFxError(f"--budget {text!r} is not {_RELU_FORMS}")
    return value


def parse_cost(text: str, protocol: str = "crypten", network: Any = "wan") -> Cost | None:
    """``"1.0s"``, ``"800ms"``, ``"200MB"``, ``"800Mb"``, ``"500kB"``, ``"150rounds"`` -> a :class:`Cost`.

    Args:
        text: the budget as typed; a bare number (a ReLU count or fraction) gives None. Traffic
            units keep their case: ``B`` is a byte, ``b`` a bit.
        protocol, network: of the Cost.

    Returns:
        The Cost, or None when ``text`` has no unit.

    Example:
        >>> parse_cost("800ms").seconds, parse_cost("800Mb").bytes, parse_cost("0.05")
        (0.8, 100000000.0, None)
    """
    t = text.strip().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)([a-zA-Z]+)", t)
    if m is None:
        if re.fullmatch(r"[\d.eE+-]+%?", t):
            return None
        raise SnlFxError(f"--budget {text!r} is neither {_RELU_FORMS} nor {_COST_FORMS}")
    unit = m.group(2)
    if unit not in _SCALE and unit.lower() in ("s", "ms", "r", "round", "rounds"):
        unit = unit.lower()
    if unit not in _SCALE:
        hint = " (B is a byte, b a bit: MB or Mb)" if unit.lower() in ("mb", "gb", "kb", "b") else ""
        raise SnlFxError(f"--budget {text!r}: unknown unit {m.group(2)!r}{hint}; use {_COST_FORMS}")
    field, scale = _SCALE[unit]
    return Cost(**{field: float(m.group(1)) * scale}, protocol=protocol, network=network)


class CostPlan(Plan):
    """A Cost budget priced on one prepared model: ``cost = base + sum over kept sites of
    (per_site + kept * per_relu)``, all in the budget's unit (checked against ``pi_cost``).

    ``kept`` arguments map gated sites to the ReLUs they keep; a site left out keeps all of them.
    Made by :func:`plan_cost` (``Cost.plan(gm)``), not by hand.

    Args:
        budget: the :class:`Cost`.
        report: the original model's :class:`ReluReport`.
        gated: gated site name -> its ReLUs per sample.
        base: cost of everything but the gated sites, in the budget's unit.
        per_site: cost of a gated site that keeps any ReLU.
        per_relu: cost of each kept ReLU.
        granularity: the gates' granularity (default ``"pixel"``).

    Example:
        >>> plan = snl_fx.Cost(seconds=45.0).plan(gm)  # gm: prepared resnet18 at 64x64, WAN
        >>> plan.ceiling  # the most ReLUs per sample within 45 s (of 188,416)
        >>> plan.value({n: 0 for n in plan.gated}) == plan.base
        True
    """

    def __init__(self, budget: Cost, report: ReluReport, gated: dict[str, int], base: float, per_site: float,
                 per_relu: float, granularity: str = "pixel") -> None:
        self.budget, self.report, self.gated = budget, report, gated  # report: the original model's
        self.base, self.per_site, self.per_relu = base, per_site, per_relu
        self.total = report.total
        self.granularity = granularity
        self.gated_sites = list(gated)
        self.ceiling = self.relu_ceiling()
        self.open_sites: list[str] | None = None  # penalty "sites": the sites chosen before the gate phase
        self.site_choice: dict[str, Any] | None = None  # and how they were chosen (stated in the result's cost)

    def value(self, kept: dict[str, int]) -> float:
        """Predicted cost, in the budget's unit, with ``kept`` ReLUs at the gated sites."""
        counts = {n: kept.get(n, full) for n, full in self.gated.items()}
        return self.base + sum(self.per_site + k * self.per_relu for k in counts.values() if k > 0)

    def pi_cost(self, kept: dict[str, int] | None = None) -> PiCost:
        """The calibrated model's full prediction with ``kept`` ReLUs at the gated sites (None: all)."""
        kept = kept or {}
        sites = [dataclasses.replace(s, relus=kept.get(s.name, s.relus)) for s in self.report.sites]
        return _price(dataclasses.replace(self.report, sites=sites), self.budget)

    @property
    def room(self) -> float:
        """What the gated sites may cost."""
        return self.budget.limit - self.base

    def relu_ceiling(self) -> int:
        """The most ReLUs any selection within the budget can keep, ungated sites included."""
        total = sum(self.gated.values())
        ungated = self.total - total
        if self.budget.met_by(self.pi_cost()):  # the model as it is: priced in full, as the final check prices it
            return self.total
        if self.per_relu <= 0:
            return ungated + (min(total - 1, max(self.gated.values())) if self.room >= self.per_site else 0)
        return ungated + max(0, min(total - 1, math.floor((self.room - self.per_site) / self.per_relu)))

    def objective(self, gm: GraphModule) -> GateObjective:
        """The gate phase's objective for ``gm`` (prepared from the planned model), per ``budget.penalty``.

        Values exclude ``base`` (the schedule steers what training can change) and are in ReLU
        equivalents (the cost divided by the full model's cost per ReLU), so that the penalty and
        lambda have the scale of the count mode.
        """
        if self.budget.penalty == "sites":
            if self.open_sites is None:
                raise SnlFxError("Cost(penalty='sites') chooses its sites on data before the gate phase: "
                                 "call plan.before_gates(gm, data, val_data, config, x) first (train_gates does)")
            ungated = self.total - sum(self.gated.values())
            return count_objective(gm, ungated + self.open_relus(self.open_sites))
        gates = passes.gates(gm)
        weight = passes.element_weights(gm)
        start = self.value(self.gated) - self.base
        norm = start / max(1, sum(self.gated.values()))
        a, b = max(self.per_site, 0.0), self.per_relu  # a fitted fixed cost below 0 is noise: no group term

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

    def select(self, gm: GraphModule, scores: dict[str, torch.Tensor] | None = None,
               tie_break: dict[str, torch.Tensor] | None = None) -> int:
        """Binarize ``gm`` to the kept set that meets the budget; returns the final ReLUs per sample.

        Greedy: while dropping one whole site (all its ReLUs) keeps more gate mass within the
        budget (the freed per-site cost buys elements elsewhere), drop the one that keeps the most;
        then :func:`snl_fx.binarize` fills the open sites by gate value (``scores`` if given).
        Sites chosen before the gate phase (:meth:`choose_sites`) stay the open sites as they are.
        """
        gates = passes.gates(gm)
        names = list(gates)
        values = {n: (scores[n] if scores is not None else gates[n].weight).detach().float().flatten().cpu() for n in names}
        sizes = passes.element_weights(gm)
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
        open_ = list(names) if self.open_sites is None else list(self.open_sites)
        best = fill(open_)
        while open_ and self.open_sites is None:  # over budget: drop the site of least mass; else only while a drop keeps more
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
        kept = site_relu_counts(gm)
        if any(kept[n] for n in names if n not in open_) or self.value({n: kept[n] for n in names}) > self.budget.limit + 1e-9:
            raise InternalError("the cost selection kept ReLUs over the budget")
        return final

    def open_relus(self, open_sites: list[str]) -> int | None:
        """The most ReLUs the gated sites ``open_sites`` may keep together within the budget (None:
        their per-site costs alone are over it)."""
        left = self.room - self.per_site * len(open_sites)
        if left < 0:
            return None
        whole = sum(self.gated[n] for n in open_sites)
        return whole if self.per_relu <= 0 else min(whole, math.floor(left / self.per_relu + 1e-9))

    def before_gates(self, gm: GraphModule, data: Any, val_data: Any, config: Any, example_input: Any) -> None:
        """``penalty="sites"``: :meth:`choose_sites` on ``val_data`` (``data`` without it), BatchNorm
        calibrated on ``data``, the example batch's scores (``example_input``, a tuple of the
        forward's inputs; None: the first batch of ``data``) ordering the elements; once per plan.
        The other formulations choose nothing before the gate phase."""
        if self.budget.penalty == "sites" and data is not None and self.open_sites is None:
            from snl_fx.select import linearization_scores
            from snl_fx.train.loop import make_loader, to_device

            if example_input is None:  # the first batch of the data, as it comes
                x = next(iter(make_loader(data, config, shuffle=False)))[0]
                example_input = (to_device(x, config.resolved_device()),)
            self.choose_sites(gm, val_data if val_data is not None else data, config,
                              linearization_scores(gm, example_input), calibrate=data)

    def site_candidates(self, gm: GraphModule, criticality: dict[str, dict[str, float]],
                        scores: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Whole-site selections within the budget: for each ranking of the sites by measured
        criticality (loss increase, accuracy drop) and each k, the k most critical sites, filled
        (a) whole, most critical first, the rest of the ReLUs to the k-th (layer culling's answer)
        and (b) by ``scores`` across the k sites. Each is site -> 0/1 tensor; duplicates dropped."""
        from snl_fx.select import selection_masks

        gates = passes.gates(gm)
        names = list(gates)
        ungated = self.total - sum(self.gated.values())
        out: list[dict[str, torch.Tensor]] = []
        for key in ("loss", "accuracy"):
            order = sorted(names, key=lambda n: -criticality[n][key])  # stable: ties keep graph order
            for k in range(1, len(order) + 1):
                open_, relus = order[:k], self.open_relus(order[:k])
                if relus is None:
                    break
                closed = {n: torch.full_like(gates[n].weight, -math.inf) for n in names if n not in open_}
                tiers = {n: torch.full_like(gates[n].weight, float(k - i)) for i, n in enumerate(open_)}
                fills = [selection_masks(gm, relus + ungated, {**tiers, **closed}, tie_break=scores)]
                fills.append(selection_masks(gm, relus + ungated, {**{n: scores[n] for n in open_}, **closed}))
                for masks in fills:
                    kept = {n: int(masks[n].sum()) * self.gated[n] // masks[n].numel() for n in names}
                    if self.value(kept) > self.budget.limit + 1e-9 or any(kept[n] for n in closed):
                        continue
                    if not any(all(torch.equal(masks[n], o[n]) for n in names) for o in out):
                        out.append(masks)
        return out

    def choose_sites(self, gm: GraphModule, data: Any, config: Any, scores: dict[str, torch.Tensor],
                     calibrate: Any = None) -> list[str]:
        """Choose the sites the gates may keep, before the gate phase, and close the others.

        Measures every site's criticality on ``data`` (:func:`snl_fx.select.site_criticality`),
        builds :meth:`site_candidates` (layer culling's answer among them) and keeps the one of
        least validation loss (:func:`snl_fx.select.best_selection`, BatchNorm statistics estimated
        again under each candidate on ``calibrate`` when given). The gates are set
        to that selection, the other sites' gates frozen at 0: it already meets the gate phase's
        objective (the count's, inside the kept sites, down to :meth:`open_relus`), so the gate
        phase has nothing to remove and its epochs go to the fine-tune; :meth:`select` keeps it.
        (Training the gates inside the kept sites from 1 was measured: within one epoch they fell
        far below the ReLUs the sites may keep and the weights with them; BENCHMARKS.md.)

        Args:
            gm: the prepared model, before the gate phase.
            data: validation (input, label) pairs.
            config: a :class:`snl_fx.TrainConfig` (device, batch size).
            scores: site -> tensor of the gate's shape (:func:`snl_fx.linearization_scores`).
            calibrate: training (input, label) pairs for the BatchNorm statistics; None: as they are.

        Returns:
            The kept sites, in graph order (also ``open_sites``; ``site_choice`` says how).

        Example:
            >>> plan = snl_fx.Cost(seconds=1.6, penalty="sites").plan(gm)
            >>> plan.choose_sites(gm, val_set, snl_fx.TrainConfig(), snl_fx.linearization_scores(gm, x))
            ['layer1.0.relu1']
        """
        from snl_fx.select import best_selection, site_criticality

        criticality = site_criticality(gm, data, config)
        candidates = self.site_candidates(gm, criticality, scores)
        if not candidates:
            raise SnlFxError(f"the budget {self.budget.limit:g} {self.budget.unit} cannot be met: the model costs "
                             f"{self.base:g} without any gated ReLU")
        best, losses = best_selection(gm, data, candidates, config, calibrate=calibrate)
        chosen = candidates[best]
        gates = passes.gates(gm)
        self.open_sites = [n for n in gates if bool(chosen[n].any())]
        with torch.no_grad():  # the gates start at the chosen selection; the other sites' gates closed for good
            for n, g in gates.items():
                g.weight.copy_(chosen[n].to(g.weight))
                if n not in self.open_sites:
                    g.weight.requires_grad_(False)
        self.site_choice = {"open_sites": self.open_sites, "criticality": criticality, "losses": losses, "best": best,
                            "relus": self.open_relus(self.open_sites)}
        log.info("sites chosen before the gate phase: %s (validation loss %.4g, best of %d candidates)",
                 self.open_sites, losses[best], len(candidates))
        return self.open_sites

    def finish(self, lowered: GraphModule, example_input: Any) -> tuple[GraphModule, dict[str, Any]]:
        """Merge linear ops where cheaper (:meth:`merge`), then check and state the cost."""
        lowered, merged = self.merge(lowered, example_input)
        return lowered, _stated_cost(self.budget, self.pi_cost(), self.budget.predict(lowered, example_input),
                                     self.site_choice, merged)

    def unchanged_cost(self) -> dict[str, Any]:
        return cost_summary(self.budget, self.pi_cost(), self.pi_cost())

    def merge(self, lowered: GraphModule, example_input: Any) -> tuple[GraphModule, int]:
        """:func:`snl_fx.cost.merge.merge_for_cost` under this plan's budget: merge ``lowered``'s linear
        ops (in place) where the merged op is predicted cheaper; returns the model and the merges done."""
        from snl_fx.cost.merge import merge_for_cost

        return merge_for_cost(lowered, self.budget, example_input)


def plan_cost(budget: Cost, *args: Any) -> CostPlan:
    """Price ``budget`` on a prepared model: ``plan_cost(budget, gm)`` (``budget.plan(gm)``).

    The older form ``plan_cost(budget, model, example_input, gm)`` still works; the model and
    input are not needed, the prepared model holds what pricing needs.

    Args:
        budget: the :class:`Cost` to price.
        *args: ``gm``, a model from :func:`snl_fx.prepare` (or the older ``model, example_input, gm``).

    Returns:
        The :class:`CostPlan`; a one-line SnlFxError when the protocol cannot price ReLUs this way.

    Example:
        >>> plan = plan_cost(snl_fx.Cost(seconds=45.0), snl_fx.prepare(model, x))
        >>> plan.ceiling, plan.total
    """
    from snl_fx.inspect.torch_model import report_from_graph

    gm = args[-1]
    if not isinstance(gm, GraphModule) or len(args) not in (1, 3):
        raise SnlFxError("plan_cost takes (budget, gm): gm from snl_fx.prepare")
    report = report_from_graph(gm, source=type(gm).__name__)
    _refuse_unpriced(_price(report, budget), budget)
    meta = passes.get_meta(gm)
    gated = {n: meta.site(n).numel for n in passes.gates(gm)}
    empty = {n: 0 for n in gated}

    def value(kept: dict[str, int]) -> float:
        sites = [dataclasses.replace(s, relus=kept.get(s.name, s.relus)) for s in report.sites]
        return budget.of(_price(dataclasses.replace(report, sites=sites), budget))

    first = next(iter(gated))
    base = value(empty)
    one, two = value({**empty, first: 1}) - base, value({**empty, first: 2}) - base
    per_relu = two - one
    plan = CostPlan(budget, report, gated, base, one - per_relu, per_relu, meta.granularity or "pixel")
    # A site's fitted fixed cost may be slightly negative (SPU SEMI2K bytes: -0.3 B) or differ from 0 by
    # rounding: both are fine for the selection; a negative cost per ReLU or a site cost that is not
    # per-site + per-ReLU (SPU CHEETAH's rounds step with the OT instances a site uses) is not.
    scale = max(1.0, abs(value(gated)))
    if per_relu < -1e-9 * scale or abs(plan.value(gated) - value(gated)) > 1e-6 * scale:
        raise SnlFxError(f"protocol {budget.protocol!r} does not price a ReLU site as per-site + per-ReLU "
                         f"{budget.unit} on this model: budget {'bytes' if budget.unit != 'bytes' else 'seconds'} instead")
    if plan.room < 0:  # before any training: nothing the gates do can meet it
        raise SnlFxError(f"the budget {budget.limit:g} {budget.unit} cannot be met: the model costs {base:g} "
                         "without any gated ReLU")
    return plan


def _refuse_unpriced(full: PiCost, budget: Cost) -> None:
    """A Cost that cannot price a layer of the model refuses it (an unpriced layer would count as free)."""
    needs_rounds = budget.unit in ("rounds", "seconds") and cost_table(budget.protocol).rounds is not None
    unpriced = [la for la in full.layers if la.bytes is None or (needs_rounds and la.rounds is None)]
    if unpriced:
        names = ", ".join(f"{la.name} ({la.op})" for la in unpriced[:4]) + (", ..." if len(unpriced) > 4 else "")
        raise SnlFxError(f"{budget.protocol} cannot price {len(unpriced)} layer(s) of this model: {names}; a Cost "
                         "budget would count them as free. Use a protocol that prices them, or a ReLU budget")


def _price(report: ReluReport, budget: Cost) -> PiCost:
    return cost_from_report(report, cost_table(budget.protocol), parse_network(budget.network))


def _stated_cost(budget: Cost, before: PiCost, after: PiCost, site_choice: dict[str, Any] | None,
                 merged: int = 0) -> dict[str, Any]:
    """The result's ``cost`` (:func:`cost_summary`, with how the sites were chosen); InternalError
    when ``after`` is over the budget: the plan's selection met it, so the prices disagree."""
    cost = cost_summary(budget, before, after, merged)
    if site_choice is not None:
        cost["site_choice"] = site_choice
    if not cost["met"]:
        raise InternalError(f"the model costs {cost['after'][budget.unit]:g} {budget.unit}, over the budget {budget.limit:g}")
    return cost


def cost_summary(budget: Cost, before: PiCost, after: PiCost, merged: int = 0) -> dict[str, Any]:
    """The result's ``cost``: the budget, and predicted bytes, rounds and seconds before and after.

    Args:
        budget: the :class:`Cost`.
        before, after: predictions (:class:`PiCost`) of the original and the final model.
        merged: linear ops merged for cost (default 0).

    Returns:
        ``{"budget", "before", "after", "met", "merged_ops"}``; ``met``: ``after`` is within the budget.

    Example:
        >>> cost_summary(plan.budget, plan.pi_cost(), plan.budget.predict(lowered, x))["met"]
        True
    """

    def row(c: PiCost) -> dict[str, Any]:
        return {"bytes": c.bytes, "rounds": c.rounds, "seconds": c.seconds}

    return {"budget": budget.to_dict(), "before": row(before), "after": row(after),
            "met": budget.met_by(after), "merged_ops": merged}


def resolve_budget(budget: int | float, total: int) -> int:
    """An int budget is ReLUs per sample; a float in (0, 1) is a fraction of ``total`` (see :class:`Relus`)."""
    return Relus(budget).relus(total)


class FamilyCostPlan(Plan):
    """A :class:`Cost` over nonlinearity families other than ReLU alone (``Cost(..., families=(...))``).

    Each gated site's cost is priced by the calibrated model as the lowered model will show it:
    ``k`` kept units compute the op, the ``U - k`` cut ones the replacement (its kinds, e.g. the
    secret square of ``x^2/N``), so ``cost_s(k) = cut_s(U - k) + kept_s(k)``, each part affine in
    its units with a fixed cost while it has any. The gate phase prices each unit by what cutting
    it saves (and each site by its fixed cost, a group term); the selection keeps units by gate
    value while the predicted cost stays within the budget, after dropping whole sites while
    that keeps more gate mass. ``lowered``'s :func:`snl_fx.pi_cost` is checked at the end.

    Args:
        budget: the :class:`Cost`.
        gm: a model from :func:`snl_fx.prepare` with ``families=budget.families``.

    Example:
        >>> plan = snl_fx.Cost(bytes=5e6, protocol="spu-semi2k", families=("gelu", "softmax")).plan(gm)
        >>> plan.value(plan.none_kept()) <= 5e6 <= plan.value(plan.all_kept())
        True
    """

    def __init__(self, budget: Cost, gm: GraphModule) -> None:
        from snl_fx.inspect.torch_model import report_from_graph

        meta = passes.get_meta(gm)
        self.budget = budget
        self.gates = {n: g for f in budget.families for n, g in passes.gates(gm, f).items()}
        if not self.gates:
            raise SnlFxError(f"the model has no gated site of the families {list(budget.families)}")
        self.sites = {n: meta.site(n) for n in self.gates}
        self.units = {n: g.weight.numel() for n, g in self.gates.items()}
        self.size = {n: self.sites[n].numel // self.units[n] for n in self.gates}  # elements per unit
        report = report_from_graph(gm, source=type(gm).__name__)
        self.report = report
        full = _price(report, budget)
        _refuse_unpriced(full, budget)
        rest = dataclasses.replace(report, sites=[s for s in report.sites if s.name not in self.gates],
                                   others=[o for o in report.others if o.name not in self.gates])
        self.base = budget.of(_price(rest, budget))
        empty = dataclasses.replace(report, sites=[], others=[], linear=[], outputs=0, scales=[])
        zero = budget.of(_price(empty, budget))
        self._table = {n: [budget.of(_price(dataclasses.replace(empty, **self._layers(n, k)), budget)) - zero
                           for k in sorted({0, 1, 2, self.units[n] - 1, self.units[n]}) if 0 <= k <= self.units[n]]
                       for n in self.gates}
        self._fit = {n: self._affine(n) for n in self.gates}
        self.total = sum(s.numel for s in self.sites.values())
        self.granularity = ",".join(f"{f}:{meta.units.get(f, meta.granularity)}" for f in budget.families)
        self.gated_sites = list(self.gates)
        self.ceiling = self.total if budget.met_by(full) else self._ceiling()

    def _layers(self, name: str, kept: int) -> dict[str, list]:
        """The report entries (ReLU sites, other layers) of site ``name`` keeping ``kept`` units, as the
        lowered model shows them: the op on the kept units, the replacement's kinds on the others."""
        from snl_fx.inspect.report import OtherCount, ScaleCount, SiteCount

        site, gate = self.sites[name], self.gates[name]
        kept_n, cut_n = kept * self.size[name], (self.units[name] - kept) * self.size[name]
        row = site.shape[-1] if site.kind == "softmax" else None
        sites, others, scales = [], [], []
        if kept_n and site.family == "relu":
            sites.append(SiteCount(name, site.op, (kept_n,), kept_n))
        elif kept_n:
            others.append(OtherCount(name, site.kind, (kept_n,), kept_n, row))
        replacement = getattr(gate, "replacement", "identity")
        kinds = passes.FAMILIES[site.family].replacement_kinds.get(replacement, ()) if cut_n else ()
        for i, kind in enumerate(kinds):
            if kind == "relu":
                sites.append(SiteCount(f"{name}.cut", "relu", (cut_n,), cut_n))
            elif kind == "scale":  # a product by a public constant: a truncation per element
                scales.append(ScaleCount(f"{name}.cut.{i}", "mul", (cut_n,), cut_n))
            else:
                others.append(OtherCount(f"{name}.cut.{kind}", kind, (cut_n,), cut_n, None))
        return {"sites": sites, "others": others, "scales": scales}

    def _affine(self, name: str) -> tuple[float, float, float, float]:
        """``(none, all, fixed, per_unit)``: the site's cost with no unit kept, with all, and
        ``fixed + per_unit * k`` in between (checked at k = U - 1)."""
        units, table = self.units[name], self._table[name]
        if units <= 2:
            return table[0], table[-1], table[1] if units == 2 else table[-1], 0.0
        per_unit = table[2] - table[1]
        fixed = table[1] - per_unit
        if abs(fixed + per_unit * (units - 1) - table[-2]) > 1e-6 * max(1.0, abs(table[-2])):
            raise SnlFxError(f"protocol {self.budget.protocol!r} does not price site {name} as fixed + per-unit "
                             f"{self.budget.unit}: budget {'bytes' if self.budget.unit != 'bytes' else 'seconds'} instead")
        return table[0], table[-1], fixed, per_unit

    def site_cost(self, name: str, kept: int) -> float:
        """Predicted cost of gated site ``name`` keeping ``kept`` units, in the budget's unit."""
        none, every, fixed, per_unit = self._fit[name]
        return none if kept == 0 else every if kept == self.units[name] else fixed + per_unit * kept

    def value(self, kept: dict[str, int]) -> float:
        """Predicted cost with ``kept`` units at each gated site (a site left out keeps all)."""
        return self.base + sum(self.site_cost(n, kept.get(n, self.units[n])) for n in self.gates)

    def all_kept(self) -> dict[str, int]:
        return dict(self.units)

    def none_kept(self) -> dict[str, int]:
        return {n: 0 for n in self.gates}

    @property
    def nothing_to_remove(self) -> bool:
        return self.value(self.all_kept()) <= self.budget.limit * (1 + 1e-9)

    def _greedy(self, order: list[tuple[str, int]]) -> dict[str, int]:
        """Units taken in ``order`` (site, unit index) while the predicted cost stays within the budget;
        the chosen unit indices per site in ``self._chosen``."""
        kept = self.none_kept()
        now = self.value(kept)
        if now > self.budget.limit * (1 + 1e-9):
            raise SnlFxError(f"the budget {self.budget.limit:g} {self.budget.unit} cannot be met: the model costs "
                             f"{now:g} with every unit of {', '.join(self.budget.families)} cut")
        chosen: dict[str, list[int]] = {n: [] for n in self.gates}
        for name, index in order:
            k = kept[name]
            step = self.site_cost(name, k + 1) - self.site_cost(name, k)
            if now + step <= self.budget.limit * (1 + 1e-9):
                kept[name], now = k + 1, now + step
                chosen[name].append(index)
        self._chosen = chosen
        return kept

    def _ceiling(self) -> int:
        """Most elements any selection within the budget keeps (cheapest units first)."""
        def saving(name: str) -> float:
            none, every, fixed, per_unit = self._fit[name]
            return per_unit / self.size[name]

        order = [(n, i) for n in sorted(self.gates, key=saving) for i in range(self.units[n])]
        kept = self._greedy(order)
        return sum(k * self.size[n] for n, k in kept.items())

    chosen: dict[str, torch.Tensor] | None = None  # penalty "sites": the selection chosen before the gate phase
    site_choice: dict[str, Any] | None = None  # and how it was chosen (stated in the result's cost)

    def before_gates(self, gm: GraphModule, data: Any, val_data: Any, config: Any, example_input: Any) -> None:
        """``penalty="sites"`` (the default): choose the selection on validation data before the gate
        phase, as :meth:`CostPlan.choose_sites` does for ReLUs. Each site's criticality is measured
        (the validation loss with it cut, :func:`snl_fx.select.site_criticality`); the candidates
        keep the ``k`` most critical sites whole (for every ``k``, layer culling's answers among
        them; with several families also in an order that takes one family's sites last, so a
        whole family can go) and fill what the budget leaves by the example batch's scores; the candidate of
        least validation loss is set in the gates. It meets the budget, so the gate phase has
        nothing to do and its epochs go to the fine-tune; :meth:`select` keeps it."""
        if self.budget.penalty != "sites" or data is None or self.chosen is not None:
            return
        from snl_fx.select import best_selection, linearization_scores, site_criticality
        from snl_fx.train.loop import make_loader, to_device

        if example_input is None:
            x = next(iter(make_loader(data, config, shuffle=False)))[0]
            example_input = (to_device(x, config.resolved_device()),)
        val = val_data if val_data is not None else data
        scores = {n: s.detach().float().flatten().cpu() for n, s in linearization_scores(gm, example_input).items()}
        criticality = {n: c for n, c in site_criticality(gm, val, config, family=None).items() if n in self.gates}
        by_score = [(n, int(i)) for n in self.gates for i in torch.argsort(-scores[n], stable=True)]
        by_score.sort(key=lambda u: -float(scores[u[0]][u[1]]))
        candidates, seen = [], set()
        rankings = [sorted(self.gates, key=lambda n: -criticality[n][key]) for key in ("loss", "accuracy")]
        families = dict.fromkeys(self.sites[n].family for n in self.gates)
        for family in families if len(families) > 1 else ():  # a whole family cut first (every softmax, say)
            rankings.append([n for n in rankings[0] if self.sites[n].family != family]
                            + [n for n in rankings[0] if self.sites[n].family == family])
        for ranked in rankings:
            for k in range(len(ranked) + 1):
                whole = [(n, int(i)) for n in ranked[:k] for i in torch.argsort(-scores[n], stable=True)]
                self._greedy(whole + [u for u in by_score if u[0] not in ranked[:k]])
                masks = {n: self._mask(n) for n in self.gates}
                signature = tuple(tuple(m.flatten().tolist()) for m in masks.values())
                if signature not in seen:
                    seen.add(signature)
                    candidates.append(masks)
        best, losses = best_selection(gm, val, candidates, config)
        self.chosen = candidates[best]
        self.site_choice = {"candidates": len(candidates), "loss": losses[best], "criticality": criticality}
        with torch.no_grad():
            for n, g in passes.gates(gm, None).items():
                if n in self.chosen:
                    g.weight.copy_(self.chosen[n].to(g.weight))

    def _mask(self, name: str) -> torch.Tensor:
        """The 0/1 gate of site ``name`` from the last :meth:`_greedy`."""
        mask = torch.zeros(self.units[name])
        mask[self._chosen[name]] = 1.0
        return mask.view_as(self.gates[name].weight.detach().cpu())

    def objective(self, gm: GraphModule) -> GateObjective:
        """Each unit priced by what cutting it saves (``per_unit``, at least 0), plus a group term per
        site for what cutting all of it saves besides (its fixed cost: SPU CHEETAH's layers cost
        megabytes before their first element), in element equivalents."""
        gates = {n: passes.gates(gm, None)[n] for n in self.gates}
        low = self.value(self.none_kept())
        start = self.value(self.all_kept()) - low
        norm = max(start, 1e-12) / max(1, self.total)
        weight = {n: max(self._fit[n][3], 0.0) / norm for n in gates}
        group = {n: max(self.site_cost(n, 1) - self.site_cost(n, 0) - self._fit[n][3], 0.0) / norm for n in gates}

        def counts(eps: float) -> dict[str, int]:
            return {n: int((g.weight.detach() > eps).sum()) for n, g in gates.items()}

        def penalty() -> torch.Tensor:
            return sum(weight[n] * g.weight.abs().sum() + group[n] * g.weight.norm() / math.sqrt(g.weight.numel())
                       for n, g in gates.items())

        def hard(eps: float) -> float:
            return (self.value(counts(eps)) - low) / norm

        def soft() -> float:
            with torch.no_grad():
                return sum(weight[n] * float(g.weight.sum()) + group[n] * float(g.weight.max()) for n, g in gates.items())

        return GateObjective(penalty, hard, soft, start / norm, (self.budget.limit - low) / norm,
                             f"element equivalents of {self.budget.unit}")

    def select(self, gm: GraphModule, scores: dict[str, torch.Tensor] | None = None,
               tie_break: dict[str, torch.Tensor] | None = None) -> int:
        """Binarize: units by gate value (``scores`` if given; ties by ``tie_break``, then site order),
        each kept while the predicted cost stays within the budget; returns the kept elements."""
        gates = {n: passes.gates(gm, None)[n] for n in self.gates}
        entries, values = [], {}
        for position, (n, g) in enumerate(gates.items()):
            v = (scores[n] if scores is not None else g.weight).detach().float().flatten().cpu()
            values[n] = v
            t = tie_break[n].detach().float().flatten().cpu() if tie_break is not None else torch.zeros_like(v)
            entries += [(-float(v[i]), -float(t[i]), position, i, n) for i in range(v.numel())]
        order = [(n, i) for *_, i, n in sorted(entries)]
        if self.chosen is not None:  # chosen before the gate phase (penalty "sites"): kept as it is
            order = [(n, int(i)) for n in gates for i in self.chosen[n].flatten().nonzero().flatten()]
            values = {n: self.chosen[n].flatten().float() for n in gates}

        def fill(open_: set[str]) -> tuple[float, dict[str, int]]:
            kept = self._greedy([(n, i) for n, i in order if n in open_])
            return sum(float(values[n][self._chosen[n]].sum()) for n in open_), kept

        # a site's fixed cost may buy more kept mass elsewhere: drop whole sites while that keeps more
        open_ = set(gates)
        best, kept = fill(open_)
        while open_ and self.chosen is None:
            mass, site = max((fill(open_ - {n})[0], n) for n in open_)
            if mass <= best:
                break
            open_.discard(site)
            best = mass
        kept = fill(open_)[1]
        for n, g in gates.items():
            mask = torch.zeros(g.weight.numel())
            mask[self._chosen[n]] = 1.0
            with torch.no_grad():
                g.weight.copy_(mask.view_as(g.weight).to(g.weight))
            g.weight.requires_grad_(False)
        if self.value(kept) > self.budget.limit * (1 + 1e-9):
            raise InternalError("the cost selection kept units over the budget")
        return sum(k * self.size[n] for n, k in kept.items())

    def finish(self, lowered: GraphModule, example_input: Any) -> tuple[GraphModule, dict[str, Any]]:
        """State the cost of ``lowered`` as :func:`snl_fx.pi_cost` predicts it; raise if over the budget."""
        return lowered, _stated_cost(self.budget, _price(self.report, self.budget),
                                     self.budget.predict(lowered, example_input), self.site_choice)

    def unchanged_cost(self) -> dict[str, Any]:
        full = _price(self.report, self.budget)
        return cost_summary(self.budget, full, full)
