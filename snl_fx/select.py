"""Selection: which ReLUs a binarized model keeps (binarize, training-free scores, swap refinement,
measured site criticality and the choice among candidate selections on validation)."""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule
from torch.utils.data import DataLoader, Dataset

from snl_fx import passes
from snl_fx.errors import SnlFxError
from snl_fx.gated import gate_parameters, gates_binary, ungated_relus
from snl_fx.train.config import TrainConfig
from snl_fx.train.loop import batch_loss, logits, make_loader, run, to_device

__all__ = ["best_selection", "binarize", "linearization_scores", "refine_selection", "selection_masks",
           "site_criticality", "validation_loss"]


def binarize(
    gm: GraphModule, budget: int, scores: dict[str, torch.Tensor] | None = None,
    tie_break: dict[str, torch.Tensor] | None = None, family: str = "relu",
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
        family: whose gates (default ``"relu"``; ``"gelu"``, ``"softmax"``: ``budget`` counts their
            elements, whole tokens or rows, best first, each taken if it still fits).

    Returns:
        The final ReLUs per sample. Raises SnlFxError when the ungated sites alone exceed ``budget``.

    Example:
        >>> snl_fx.binarize(gm, 2000)
        2000
        >>> lowered = snl_fx.convert(gm)
    """
    if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
        budget = int(budget)  # also NumPy integers
    else:  # a fraction, text or a Cost: its plan selects
        from snl_fx.budget import bind

        return bind(budget, gm).select(gm, scores, tie_break)
    meta = passes.get_meta(gm)
    gate_modules = passes.gates(gm, family)
    if not gate_modules:
        what = "gates" if family == "relu" else f"{family} gates"
        raise SnlFxError(f"this model has no {what} (lowered already?): binarize a model from snl_fx.prepare")
    element_weight = passes.element_weights(gm, family)
    room = budget - ungated_relus(gm, family)
    if room < 0:
        raise SnlFxError(f"the ungated sites alone have {ungated_relus(gm, family)} "
                         f"{'ReLUs' if family == 'relu' else family + ' elements'}, more than the budget {budget}")
    values, ties, weights, owners = [], [], [], []
    for name, gate in gate_modules.items():
        v = (scores[name] if scores is not None else gate.weight).detach().float().flatten().cpu()
        values.append(v)
        ties.append(tie_break[name].detach().float().flatten().cpu() if tie_break is not None else torch.zeros_like(v))
        weights.append(torch.full_like(v, element_weight[name], dtype=torch.long))
        owners.append((name, v.numel()))
    flat_values, flat_weights = torch.cat(values), torch.cat(weights)
    order = torch.sort(-torch.cat(ties), stable=True).indices  # secondary key first, then a stable sort on the first
    order = order[torch.sort(-flat_values[order], stable=True).indices]
    keep = torch.zeros_like(flat_values, dtype=torch.bool)
    if (meta.granularity == "pixel" and family == "relu") or bool((flat_weights == 1).all()):
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
    return int((keep.long() * flat_weights).sum()) + ungated_relus(gm, family)


def linearization_scores(gm: GraphModule, example_input: Any) -> dict[str, torch.Tensor]:
    """Training-free importance of each gate element: mean of ``min(z, 0)**2`` over the batch.

    That is the squared error of replacing the ReLU by identity there; keeping the largest
    ones keeps the ReLUs whose removal would change the activations most. A gate of another
    family scores ``(f(x) - r(x))^2`` summed over its unit (``r`` its replacement).

    Args:
        gm: a prepared model; run once in eval mode without gradients (mode restored).
        example_input: a batch (batch first), or a tuple of the forward's inputs, on ``gm``'s device.

    Returns:
        Site name -> a tensor of its gate's shape (channel gates: the mean over H*W), for
        ``scores`` or ``tie_break`` of :func:`binarize`.

    Example:
        >>> scores = snl_fx.linearization_scores(gm, x)
        >>> snl_fx.binarize(gm, 2000, scores)  # training-free selection
        2000
    """
    granularity = passes.get_meta(gm).granularity
    scores: dict[str, torch.Tensor] = {}
    hooks = []
    for name, gate in passes.gates(gm, None).items():

        def record(module, inputs, output, name=name, shape=tuple(gate.weight.shape)):
            if isinstance(module, passes.NonlinearGate):
                scores[name] = module.replacement_error(inputs[0].detach())
                return
            err = inputs[0].detach().clamp(max=0).pow(2).mean(0)
            if granularity == "channel":
                err = err.mean(dim=tuple(range(1, err.dim()))) if err.dim() > 1 else err
            scores[name] = err.reshape(shape)

        hooks.append(gate.register_forward_hook(record))
    was_training = gm.training
    try:
        gm.eval()
        with torch.no_grad():
            gm(*(t.clone() for t in passes.as_args(example_input)))  # an in-place op must not reach the caller
    finally:
        gm.train(was_training)
        for h in hooks:
            h.remove()
    return scores


@torch.no_grad()
def _probe_loss(gm: GraphModule, teacher: nn.Module | None, batches: list, cfg: TrainConfig) -> float:
    return sum(float(batch_loss(gm, teacher, x, y, cfg)[0]) for x, y in batches)


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

    Args:
        gm: a binarized model (after :func:`binarize`); its gates are changed in place, the
            weights are not. Raises SnlFxError when a gate is not binary.
        data: a Dataset or DataLoader of (input, label) pairs (the training data).
        config: ``device``, ``batch_size``, ``seed``, ``kd``, ``temperature`` and ``kd_weight``
            are read (default ``TrainConfig()``).
        teacher: the original model, for the KD loss; None: cross-entropy.
        rounds: most blocks of swaps tried (default 16).
        batches: batches for the gradient, and as many other ones for the probe (default 8).

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
    gate_modules = passes.gates(gm)
    weights = gate_parameters(gm)
    if not gates_binary(gm):
        raise SnlFxError("refine_selection needs binary gates: call snl_fx.binarize first")
    loader = make_loader(data, cfg, shuffle=True, epoch_seed=cfg.seed * 1_000_003 + 30_013)
    drawn = []
    for x, y in loader:
        drawn.append((to_device(x, device), y.to(device)))
        if len(drawn) == 2 * batches:
            break
    grad_batches, probe = drawn[: len(drawn) // 2] or drawn, drawn[len(drawn) // 2 :] or drawn
    weight = passes.element_weights(gm)
    size = torch.cat([torch.full((g.weight.numel(),), weight[n]) for n, g in gate_modules.items()])
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
                loss = batch_loss(gm, teacher, x, y, cfg)[0]
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


@torch.no_grad()
def validation_loss(model: nn.Module, data: Dataset | DataLoader, config: TrainConfig | None = None) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (%) of ``model`` on ``data``, in eval mode (mode restored).

    Args:
        model: a classifier on ``config``'s device.
        data: a Dataset or DataLoader of (input, label) pairs.
        config: ``device``, ``batch_size`` and ``num_workers`` are read (default ``TrainConfig()``).

    Returns:
        ``(loss, accuracy)``.

    Example:
        >>> loss, acc = snl_fx.select.validation_loss(gm, val_set)
    """
    cfg = config or TrainConfig()
    device = cfg.resolved_device()
    was_training = model.training
    model.eval()
    total = correct = seen = 0.0
    try:
        for x, y in make_loader(data, cfg, shuffle=False):
            out, y = logits(run(model, to_device(x, device))), y.to(device)
            total += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
            seen += len(y)
    finally:
        model.train(was_training)
    return total / max(seen, 1), 100.0 * correct / max(seen, 1)


@contextlib.contextmanager
def _gates_as(gm: GraphModule, values: dict[str, torch.Tensor | float]) -> Iterator[None]:
    """Gate values set for the duration (site -> a tensor of the gate's shape, or a number); restored after."""
    gate_modules = passes.gates(gm, None)
    saved = {n: gate_modules[n].weight.detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, v in values.items():
                w = gate_modules[n].weight
                w.copy_(v.to(w) if isinstance(v, torch.Tensor) else torch.full_like(w, float(v)))
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                gate_modules[n].weight.copy_(w)


def site_criticality(gm: GraphModule, data: Dataset | DataLoader,
                     config: TrainConfig | None = None, family: str | None = "relu") -> dict[str, dict[str, float]]:
    """Measured criticality of every gated site: what linearizing it alone (its gates at 0) costs
    on ``data``, as DeepReDuce-style layer culling measures it.

    Args:
        gm: a prepared model; its gates are as they are for the other sites, and restored after.
        data: validation (input, label) pairs.
        config: as for :func:`validation_loss`.
        family: whose sites (default the ReLU sites; None: every gated site, a cut site computing
            its family's replacement).

    Returns:
        Site -> ``{"loss": increase of the mean cross-entropy, "accuracy": drop of top-1 accuracy
        in points}``, in graph order.

    Example:
        >>> crit = snl_fx.select.site_criticality(gm, val_set)
        >>> max(crit, key=lambda n: crit[n]["loss"])  # the site the model needs most
    """
    base_loss, base_acc = validation_loss(gm, data, config)
    out = {}
    for name in passes.gates(gm, family):
        with _gates_as(gm, {name: 0.0}):
            loss, acc = validation_loss(gm, data, config)
        out[name] = {"loss": loss - base_loss, "accuracy": base_acc - acc}
    return out


def selection_masks(gm: GraphModule, budget: int, scores: dict[str, torch.Tensor],
                    tie_break: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The 0/1 gates :func:`binarize` would set for ``budget`` and ``scores``, without changing ``gm``.

    Args:
        gm, budget, scores, tie_break: as for :func:`binarize` (a site scored ``-inf`` keeps
            nothing unless the budget needs it).

    Returns:
        Site -> a 0/1 tensor of its gate's shape.

    Example:
        >>> masks = selection_masks(gm, 2000, snl_fx.linearization_scores(gm, x))
        >>> sum(int(m.sum()) for m in masks.values())  # pixel gates, no ungated site
        2000
    """
    gate_modules = passes.gates(gm)
    saved = {n: (g.weight.detach().clone(), g.weight.requires_grad) for n, g in gate_modules.items()}
    try:
        binarize(gm, budget, scores, tie_break)
        return {n: g.weight.detach().clone() for n, g in gate_modules.items()}
    finally:
        with torch.no_grad():
            for n, (w, grad) in saved.items():
                gate_modules[n].weight.copy_(w)
                gate_modules[n].weight.requires_grad_(grad)


def best_selection(gm: GraphModule, data: Dataset | DataLoader, candidates: Sequence[dict[str, torch.Tensor]],
                   config: TrainConfig | None = None, *, calibrate: Dataset | DataLoader | None = None,
                   batches: int = 8) -> tuple[int, list[float]]:
    """Of candidate selections, the one of least validation loss with ``gm``'s weights.

    Removing whole sites shifts the activations that BatchNorm normalizes; with ``calibrate``
    each candidate is measured on a copy of ``gm`` whose BatchNorm statistics were estimated
    again under it (``batches`` batches of ``calibrate`` in train mode, no gradient, the same
    batches for every candidate), so that the loss compares the selections, not stale statistics.

    Args:
        gm: a prepared model (never changed).
        data: validation (input, label) pairs.
        candidates: each site -> a 0/1 tensor of its gate's shape (e.g. from :func:`selection_masks`).
        config: as for :func:`validation_loss` (``seed`` also draws the calibration batches).
        calibrate: training (input, label) pairs for the BatchNorm statistics; None: as they are.
        batches: calibration batches (default 8).

    Returns:
        ``(index of the best, the validation loss of every candidate)``; ties go to the first.

    Example:
        >>> i, losses = best_selection(gm, val_set, [masks_a, masks_b], calibrate=train_set)
    """
    cfg = config or TrainConfig()
    drawn = []
    if calibrate is not None:
        for x, _ in make_loader(calibrate, cfg, shuffle=True, epoch_seed=cfg.seed * 1_000_003 + 40_009):
            drawn.append(to_device(x, cfg.resolved_device()))
            if len(drawn) == batches:
                break
    losses = []
    for masks in candidates:
        if not drawn:
            with _gates_as(gm, masks):
                losses.append(validation_loss(gm, data, cfg)[0])
            continue
        trial = copy.deepcopy(gm)
        with torch.no_grad():
            for n, g in passes.gates(trial, None).items():
                if n in masks:
                    g.weight.copy_(masks[n].to(g.weight))
            norms = [m for m in trial.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the calibration batches
            trial.train()
            for x in drawn:
                run(trial, x)
        losses.append(validation_loss(trial, data, cfg)[0])
    best = min(range(len(losses)), key=lambda i: (losses[i] if not math.isnan(losses[i]) else math.inf, i))
    return best, losses
