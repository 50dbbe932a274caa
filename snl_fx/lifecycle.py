"""``snl_fx.linearize``: the whole SNL pass, from any nn.Module to a lowered static graph."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule
from torch.utils.data import DataLoader, Dataset

from snl_fx import passes
from snl_fx._files import check_writable_dir
from snl_fx._validate import check_data
from snl_fx.budget import Cost, Families, Plan, Relus, bind, budget_families
from snl_fx.errors import InternalError, SnlFxError
from snl_fx.export import check_exports
from snl_fx.gated import (
    convert,
    expected_counts,
    freeze_gates,
    gates_binary,
    max_abs_diff,
    prepare,
    relu_count_gated,
    site_relu_counts,
    total_relus,
)
from snl_fx.inspect import relu_count
from snl_fx.select import linearization_scores
from snl_fx.train import distributed
from snl_fx.train.config import TrainConfig
from snl_fx.train.loop import Checkpoint, evaluate, split_train_val
from snl_fx.train.phases import EpochRecord, finetune, moved_epochs, train_gates

log = logging.getLogger("snl_fx")


@dataclass
class LinearizeResult:
    """What :func:`linearize` made. ``model`` is the lowered static graph; counts are per sample.

    Args:
        model: the lowered static graph (a GraphModule), ready for :func:`snl_fx.export_onnx`.
        gated: the binarized gated model (its state_dict reloads with :func:`load_linearized`);
            None when the model was returned unchanged.
        relu_count: ReLUs per sample of ``model``, exact.
        relu_count_before: ReLUs per sample of the original model.
        budget: the most ReLUs per sample allowed (for a Cost budget: the count it allowed).
        granularity: ``"pixel"`` or ``"channel"``.
        method: ``"snl"`` (trained gates), ``"one-shot"`` (training-free) or ``"unchanged"``.
        sites: site name -> ``{"before": ReLUs, "after": ReLUs}``.
        history: one :class:`EpochRecord` per epoch of both phases (empty for one-shot).
        accuracy_before, accuracy_after: top-1 % on the validation data; None without it.
        cost: Cost budgets: the budget, predicted bytes/rounds/seconds before and after; else None.
        counts: per gated family (``"relu"``, ``"gelu"``, ``"softmax"``, ...): elements per sample
            ``{"before", "after", "budget"}``, read back from the lowered model (``budget``: None
            under a Cost over several families, which trades them against each other).

    Example:
        >>> result = snl_fx.linearize(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64), 2000)
        >>> result.method, result.relu_count, result.relu_count_before
        ('one-shot', 2000, 188416)
        >>> json.dumps(result.to_dict())  # no tensors
    """

    model: nn.Module
    gated: GraphModule | None  # the binarized gated model (its state_dict reloads with load_linearized)
    relu_count: int
    relu_count_before: int
    budget: int
    granularity: passes.Granularity
    method: str  # "snl" (trained gates), "one-shot" (training-free), or "unchanged"
    sites: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> {"before", "after"}
    history: list[EpochRecord] = field(default_factory=list)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    cost: dict[str, Any] | None = None  # Cost budgets: the budget, predicted bytes/rounds/seconds before and after
    counts: dict[str, dict[str, int | None]] = field(default_factory=dict)  # family -> {"before", "after", "budget"}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("model", "gated")}
        out["lambda_history"] = [h["lambda"] for h in self.history if h.get("phase") == "gates"]
        return out


def linearize(
    model: nn.Module,
    example_input: Any,
    budget: int | float | str | dict[str, int | float] | Relus | Cost | Families,
    data: Dataset | DataLoader | None = None,
    *,
    val_data: Dataset | DataLoader | None = None,
    granularity: passes.Granularity = "pixel",
    skip: Sequence[str] = (),
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    units: dict[str, str] | None = None,
    replacements: dict[str, str] | None = None,
    config: TrainConfig | None = None,
    **overrides: Any,
) -> LinearizeResult:
    """Cut ``model``'s ReLUs to ``budget`` per sample and lower it to a static graph.

    prepare -> :func:`train_gates` -> binarize -> :func:`finetune` -> convert. With ``data``,
    runs SNL: gates and weights trained with a Lasso penalty until the count meets the budget,
    binarized to exactly the budget, then the weights fine-tuned with KD from ``model``, the
    best fine-tune epoch on the validation data kept. Without ``data``, keeps the ReLUs whose
    removal changes the example batch most (training-free, ``result.method == "one-shot"``).

    Args:
        model: any nn.Module; it is copied, never changed.
        example_input: an example batch (batch first), or a tuple of the forward's inputs.
        budget: an int is ReLUs per sample, a float in (0, 1) a fraction of the model's ReLUs, a
            :class:`snl_fx.Cost` a predicted latency, traffic or round count under a protocol and
            network: the gate penalty then prices each gate by its cost (whole sites included),
            the selection meets the cost, linear ops are merged where cheaper, and
            ``result.cost`` states the cost before and after (``result.budget`` is then the ReLU
            count the cost allowed). Text works as on the command line (``"15000"``, ``"5%"``,
            ``"1.5s"``, ``"200MB"``): see :func:`snl_fx.budget.as_budget`. A dict budgets
            nonlinearity families apart, each exactly (``{"gelu": 0.1, "softmax": 0.25}``, text
            ``"gelu=0.1,softmax=25%"``): their sites get gates (a GELU one per token, a softmax one
            per head and query row) and a cut unit computes the family's replacement.
        data: a Dataset or DataLoader of (input, label) pairs; None: the one-shot selection.
        val_data: for model selection (default: 10% held out of ``data``, when it is a Dataset).
        granularity: ``"pixel"`` (one gate per element) or ``"channel"`` (paper eq. 6).
        skip: fnmatch patterns of site names left as plain ReLUs.
        out_dir, resume: a checkpoint every epoch goes to ``out_dir``; ``resume=True`` continues
            from it to the result of an uninterrupted run.
        concrete_args, leaf_modules: for tracing (see :func:`snl_fx.prepare`).
        units, replacements: per family, the gate unit and what a cut unit computes (see
            :func:`snl_fx.prepare`; e.g. ``replacements={"softmax": "relu"}``).
        config: the training settings (a :class:`TrainConfig`; default ``TrainConfig()``).
        **overrides: fields of ``config`` to replace (``epochs=8``, ``finetune_epochs=8``, ...).

    Returns:
        A :class:`LinearizeResult`: ``model`` (the lowered GraphModule), ``relu_count`` (exact,
        per sample), ``sites`` (per site before/after), ``history`` (per epoch), accuracies, and
        ``cost`` for a Cost budget. Raises SnlFxError on bad input.

    Example:
        >>> result = snl_fx.linearize(model, x, budget=0.05, data=train_set, epochs=20, finetune_epochs=5)
        >>> result.relu_count, result.sites["layer1.0.relu"]

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it starts the process group itself when the caller has
    not (NCCL on CUDA, gloo on CPU) and trains with DistributedDataParallel, one device per
    process: every rank starts from rank 0's model, each step splits the global ``batch_size``
    over the ranks, and every rank returns the same result; rank 0 alone logs and writes files.
    """
    cfg = _config(config, overrides)
    device = cfg.resolved_device()
    distributed.init_from_env(device)
    for name, given in (("data", data), ("val_data", val_data)):  # (input, label) pairs shaped like the example
        check_data(given, example_input, name)
    if out_dir is not None:
        check_writable_dir(out_dir, "out_dir")  # found now, not after the first epoch
    gm = prepare(model, example_input, granularity, skip=skip, concrete_args=concrete_args, leaf_modules=leaf_modules,
                 families=budget_families(budget), units=units, replacements=replacements)
    check_exports(gm, example_input)  # an unexportable model fails in seconds, before training
    plan = bind(budget, gm)
    before = _site_counts(gm, None)
    if plan.nothing_to_remove:
        what = "ReLUs" if plan.families == ("relu",) else "elements of " + ", ".join(plan.families)
        warnings.warn(f"budget {plan.ceiling:,} >= the model's {plan.total:,} {what}: nothing to remove, model "
                      "unchanged", stacklevel=2)
        unchanged = passes.trace(model, example_input, concrete_args=concrete_args, leaf_modules=leaf_modules)
        sites = {n: {"before": c, "after": c} for n, c in before.items()}
        return LinearizeResult(unchanged, None, total_relus(gm), total_relus(gm), plan.ceiling, granularity,
                               "unchanged", sites, cost=plan.unchanged_cost(), counts=_counts(gm, plan))
    if data is not None and val_data is None and isinstance(data, Dataset):
        data, val_data = split_train_val(data, 0.1, seed=cfg.seed)
    teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    gm.to(device)
    for module in (teacher, gm):
        distributed.broadcast_state(module)
    accuracy_before = distributed.on_rank0(lambda: evaluate(teacher, val_data, cfg))
    if data is None:
        log.info("no data: training-free one-shot selection on the example batch (%s)", granularity)
        final, history, method = plan.select(gm, scores=_scores(gm, example_input, device)), [], "one-shot"
    else:
        (final, history), method = _train(gm, plan, teacher, data, val_data, example_input, cfg, out_dir, resume), "snl"
    gm.eval()
    lowered = convert(gm).eval()
    _verify(gm, lowered, example_input, final, device)
    after = _site_counts(gm)
    sites = {n: {"before": before[n], "after": after[n]} for n in before}
    lowered, cost = plan.finish(lowered, _to(example_input, device))
    accuracy_after = distributed.on_rank0(lambda: evaluate(lowered, val_data, cfg))
    return LinearizeResult(lowered, gm, expected_counts(gm).get("relu", 0), total_relus(gm), plan.ceiling, granularity,
                           method, sites, history, accuracy_before, accuracy_after, cost, _counts(gm, plan))


def _train(gm: GraphModule, plan: Plan, teacher: nn.Module, data: Any, val_data: Any, example_input: Any,
           cfg: TrainConfig, out_dir: Any, resume: bool) -> tuple[int, list[EpochRecord]]:
    """The gate phase, the plan's selection, the fine-tune (each resumed from ``out_dir`` when asked);
    returns the final ReLUs per sample and the history. The fine-tune gets ``finetune_epochs`` plus
    the gate epochs the gate phase did not need (``moved_epochs`` of its records)."""
    state = Checkpoint(out_dir).load() if resume else None
    if resume and state is None and distributed.is_main():
        log.info("no checkpoint in %s: starting from scratch", out_dir)
    if state is not None and not plan.matches(state.get("budget")):
        raise SnlFxError(f"the checkpoint in {out_dir} is for budget {state.get('budget')}, not {plan.key}: "
                         "use another output dir or drop --resume")
    if state is None or state["phase"] == "gates":
        # decisions before the gates (a Cost of penalty "sites" chooses its sites), here with the example batch's
        # scores (train_gates would take the first batch of the data); redone on a resume, deterministic
        plan.before_gates(gm, data, val_data, cfg, _to(example_input, cfg.resolved_device()))
        history = train_gates(gm, data, plan, cfg, teacher=teacher, val_data=val_data, checkpoint=out_dir, resume=resume)
        # gates at 0 tie: among them, keep the ReLUs whose removal changes the activations most
        final = plan.select(gm, tie_break=_scores(gm, example_input, cfg.resolved_device()))
        if cfg.refine:
            plan.refine(gm, data, cfg, teacher)
    else:
        history, final = [r for r in state["history"] if r["phase"] == "gates"], state["relu_count"]
        freeze_gates(gm)  # binarized in the checkpoint
    # the gate epochs a gate phase left (it met the budget early) go to the fine-tune, stated in its records
    history += finetune(gm, teacher, data, cfg, val_data=val_data, checkpoint=out_dir, resume=resume,
                        budget=plan.key, history=history, moved_epochs=moved_epochs(cfg, history))
    return final, history


def _config(config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    known = TrainConfig.__dataclass_fields__
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise SnlFxError(f"unknown option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(config or TrainConfig(), **overrides)


def _to(example_input: Any, device: torch.device) -> Any:
    return tuple(a.to(device) for a in passes.as_args(example_input))


def _scores(gm: GraphModule, example_input: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """Linearization scores on the example batch, computed on rank 0, on the CPU."""
    return distributed.on_rank0(
        lambda: {k: v.cpu() for k, v in linearization_scores(gm, _to(example_input, device)).items()}
    )


def _site_counts(gm: GraphModule, eps: float | None = passes.COUNT_EPS) -> dict[str, int]:
    """Per site of every family, in graph order: the elements it keeps (``eps=None``: all)."""
    counts = {f: site_relu_counts(gm, eps, f) for f in dict.fromkeys(s.family for s in passes.get_meta(gm).sites)}
    return {s.name: counts[s.family][s.name] for s in passes.get_meta(gm).sites}


def _counts(gm: GraphModule, plan: Plan) -> dict[str, dict[str, int | None]]:
    """Per gated family: elements per sample before, after (as the inspector will find them in the
    lowered model; before binarizing: all) and the plan's budget for it."""
    after = expected_counts(gm) if gates_binary(gm) else {}
    budgets = plan.family_budgets()
    return {f: {"before": total_relus(gm, f), "after": after.get(f, total_relus(gm, f)), "budget": budgets[f]}
            for f in plan.families}


def _verify(gm: GraphModule, lowered: nn.Module, example_input: Any, final: int, device: torch.device) -> None:
    """Guard: the lowered graph computes what the gated one does, with exactly ``final`` ReLUs (and,
    per gated family, the elements its gates keep).

    A failure is a bug of snl_fx, not of the input: an :class:`InternalError`, which the CLIs
    report as an internal error (exit code 1), never an :class:`SnlFxError` (exit code 2).
    """
    args = _to(example_input, device)
    diff = max_abs_diff(gm, lowered, args)
    if diff > 1e-4:
        raise InternalError(f"lowered model differs from the gated model by {diff:.3g}")
    report = relu_count(lowered, args)
    for family, count in expected_counts(gm).items():
        if report.family_count(family) != count:
            unit = "ReLUs" if family == "relu" else f"{family} elements"
            raise InternalError(f"lowered model has {report.family_count(family)} {unit} per sample, expected {count}")
    gated = _gated_families(gm)
    kept = sum(relu_count_gated(gm, family=f) for f in gated)
    if kept != final:
        unit = "ReLUs" if gated == {"relu"} else f"elements of {', '.join(sorted(gated))}"
        raise InternalError(f"lowered model has {kept} {unit} per sample, expected {final}")


def _gated_families(gm: GraphModule) -> set[str]:
    return {passes.get_meta(gm).site(n).family for n in passes.get_meta(gm).gates}


def load_linearized(model: nn.Module, example_input: Any, state_dict_path: str | os.PathLike,
                    granularity: passes.Granularity = "pixel", skip: Sequence[str] = ()) -> GraphModule:
    """Rebuild a lowered model from the original model and a saved binarized gated state_dict.

    Args:
        model: the original model's architecture (its weights come from the file).
        example_input: an example batch, as given to :func:`linearize`.
        state_dict_path: a file saved with ``torch.save(result.gated.state_dict(), path)``.
        granularity, skip: as given to :func:`linearize`.

    Returns:
        The lowered GraphModule, the same as ``result.model`` before any cost merge.

    Example:
        >>> torch.save(result.gated.state_dict(), "gated.pt")
        >>> lowered = snl_fx.load_linearized(torchvision.models.resnet18(), x, "gated.pt")
        >>> snl_fx.relu_count(lowered, x).total == result.relu_count
        True
    """
    gm = prepare(model, example_input, granularity, skip=skip)
    gm.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
    return convert(gm)
