"""The gated model: ``prepare`` puts a trainable gate at every ReLU site, ``convert`` lowers it.

Also the pieces of any gate-training loop that read or change the gates: the gate tensors, the
Lasso penalty, clamping, freezing, and the ReLU count (one count, one threshold: ``eps``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves

from snl_fx import passes
from snl_fx.errors import SnlFxError


def prepare(
    model: nn.Module,
    example_input: Any,
    granularity: passes.Granularity = "pixel",
    *,
    skip: Sequence[str] = (),
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    families: Sequence[str] = ("relu",),
    units: dict[str, str] | None = None,
    replacements: dict[str, str] | None = None,
) -> GraphModule:
    """Trace a copy of ``model`` and put a trainable gate (initialised to 1) at every ReLU site
    (or every site of the nonlinearity ``families`` asked for).

    The result computes exactly what ``model`` computes until its gates move.

    Args:
        model: any nn.Module; it is deep-copied, never changed.
        example_input: an example batch (batch first), or a tuple of the forward's inputs; it
            sizes the gates.
        granularity: ``"pixel"`` (one gate per activation element) or ``"channel"`` (one per channel).
        skip: fnmatch patterns of site names to leave as plain ReLUs (e.g. a stem ReLU).
        concrete_args: passed to ``symbolic_trace`` (e.g. a bool argument of ``forward``).
        leaf_modules: module types traced as one call; their ReLUs are reported, not gated.
        families: the nonlinearity families to gate (``snl_fx.passes.FAMILIES``): ``"relu"``
            (default), ``"gelu"``, ``"silu"``, ``"softmax"``; sites of the others stay as they are.
        units: family -> gate unit (``{"gelu": "token"}``; the ReLU unit is ``granularity``);
            default: each family's first unit (gelu, silu: token; softmax: row, one gate per head
            and query row).
        replacements: family -> what a cut unit computes (``{"softmax": "square"}``); default:
            identity for element-wise activations, PriViT's ``x^2/N`` for softmax.

    Returns:
        A GraphModule with a :class:`passes.Gate` per site (see :func:`gates`); the sites are in
        ``passes.get_meta(gm).sites``. Raises SnlFxError when there is nothing to gate.

    Example:
        >>> gm = snl_fx.prepare(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
        >>> len(snl_fx.gates(gm)), snl_fx.relu_count_gated(gm)
        (17, 188416)
    """
    if granularity not in passes.GRANULARITIES:
        raise SnlFxError(f"granularity must be one of {passes.GRANULARITIES}, got {granularity!r}")
    chosen = _family_choices(families, granularity, units, replacements)
    gm = passes.front_end(model, example_input, concrete_args=concrete_args, leaf_modules=leaf_modules)
    if set(chosen) == {"relu"} and not passes.get_meta(gm).sites:
        hidden = passes.get_meta(gm).ungateable
        extra = f" (ReLUs hidden in leaf modules: {', '.join(u.name for u in hidden)})" if hidden else ""
        kinds = sorted({o.kind for o in passes.get_meta(gm).others if passes.families.family_of(o.kind)})
        hint = f"; its gateable nonlinearities: {', '.join(kinds)} (budget them by family, e.g. {{'{kinds[0]}': 0.1}})" \
            if kinds else ""
        raise SnlFxError(f"{type(model).__name__} has no ReLU call site to linearize{extra}{hint}")
    try:
        gm = passes.insert_gates(passes.make_out_of_place(gm), granularity, skip, chosen)
    except passes.PassError as exc:
        raise SnlFxError(str(exc)) from exc
    if not passes.get_meta(gm).gates:
        if set(chosen) != {"relu"}:
            raise SnlFxError(f"{type(model).__name__} has no site of the families {sorted(chosen)} to linearize")
        raise SnlFxError(f"every ReLU site matches a skip pattern {list(skip)}: nothing to linearize")
    _check_prepared(model, gm, example_input)
    return gm


def _family_choices(families: Sequence[str], granularity: str, units: dict[str, str] | None,
                    replacements: dict[str, str] | None) -> dict[str, tuple[str | None, str | None]]:
    """family -> (unit, replacement) for :func:`passes.insert_gates`, checked (one SnlFxError line)."""
    if isinstance(families, str):
        families = (families,)
    units, replacements = dict(units or {}), dict(replacements or {})
    chosen: dict[str, tuple[str | None, str | None]] = {}
    for family in families:
        unit = granularity if family == "relu" else units.get(family)
        try:
            chosen[family] = passes.families.check_choice(family, unit, replacements.get(family))
        except passes.PassError as exc:
            raise SnlFxError(str(exc)) from exc
    stray = sorted((set(units) | set(replacements)) - set(chosen))
    if stray:
        raise SnlFxError(f"units/replacements given for {stray}, which are not among the gated families {sorted(chosen)}")
    return chosen


PREPARE_RTOL = 1e-5
"""How far the prepared model (all gates open) may be from the original, relative to the largest
output magnitude (at least 1): only rounding, never a changed computation."""


def _check_prepared(model: nn.Module, gm: GraphModule, example_input: Any) -> None:
    """Raise unless ``gm`` (gates open, eval mode) computes what ``model`` computes on the example input.

    Runs a deep copy of ``model`` and clones of the input (eval mode, no_grad): the caller's
    model, its buffers and the input stay as they were. A model whose output varies from run to
    run (noise in its forward) cannot be compared and is let through.
    """
    import copy

    args = passes.as_args(example_input)
    original = copy.deepcopy(model).eval()
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            try:
                expected = original(*_clones(args))
            except Exception as exc:  # noqa: BLE001 - the user's forward: say where it failed, in one line
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise SnlFxError(f"{type(model).__name__} fails on the example input in eval mode: "
                                 f"{type(exc).__name__}: {first}") from exc
            got = gm(*_clones(args))
            scale = max((float(t.abs().max()) for t in tree_leaves(expected)
                         if isinstance(t, torch.Tensor) and t.numel() and t.is_floating_point()), default=1.0)
            tolerance = PREPARE_RTOL * max(scale, 1.0)
            diff = _output_diff(expected, got)
            if not diff > tolerance or _output_diff(expected, original(*_clones(args))) > tolerance:
                return  # equal, or the original does not repeat itself: nothing to compare with
    finally:
        gm.train(was_training)
    inplace = [s.name for s in passes.get_meta(gm).sites if s.inplace]
    where = (f"likely at the in-place ReLU site(s) {', '.join(inplace)}: write them out of place (torch.relu(x), "
             "nn.ReLU() without inplace=True) and use their results" if inplace else
             "the traced graph computes something else than the model's forward (Python state or "
             "randomness in forward?)")
    raise SnlFxError(
        f"the prepared {type(model).__name__} (every gate open) differs from the original by {diff:.3g} on the "
        f"example input; {where}"
    )


def _clones(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def gates(gm: GraphModule) -> dict[str, passes.Gate]:
    """Site name -> its gate module of a prepared model, in graph order (``gate.weight`` is ``c``).

    Args:
        gm: a model from :func:`prepare`.

    Returns:
        A dict of :class:`passes.Gate` modules; sites skipped by pattern are not in it.

    Example:
        >>> gm = snl_fx.prepare(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
        >>> list(snl_fx.train.gates(gm))[:2]
        ['relu', 'layer1.0.relu']
    """
    return passes.gates(gm, None)


def gate_parameters(gm: GraphModule) -> list[nn.Parameter]:
    """The gate tensors ``c`` of a prepared model (give them their own optimizer group if you like).

    Args:
        gm: a model from :func:`prepare`.

    Returns:
        One ``nn.Parameter`` per gated site, in graph order (the shape of the activation per
        sample for pixel gates, one element per channel for channel gates).

    Example:
        >>> gate_params = snl_fx.train.gate_parameters(gm)
        >>> weights = [p for p in gm.parameters() if all(p is not g for g in gate_params)]
        >>> opt = torch.optim.Adam([{"params": weights}, {"params": gate_params, "lr": 1e-2}], lr=1e-3)
    """
    return [g.weight for g in gates(gm).values()]


def lasso_penalty(gm: GraphModule, family: str = "relu") -> torch.Tensor:
    """``sum |c|`` over all gates (multiply by lambda and add to the loss).

    Args:
        gm: a model from :func:`prepare`.
        family: whose gates (default the ReLU gates; ``"gelu"``, ``"softmax"``, ...).

    Returns:
        A scalar tensor that carries gradients to the gates. Each gate element counts once,
        also a channel gate's (:func:`soft_relu_count` weighs those by H*W).

    Example:
        >>> snl_fx.train.lasso_penalty(gm)  # fresh pixel gates of resnet18 at 64x64: all 1
        tensor(188416., grad_fn=<AddBackward0>)
        >>> loss = task_loss + lam * snl_fx.train.lasso_penalty(gm)
    """
    return sum(g.weight.abs().sum() for g in passes.gates(gm, family).values())


def clamp_gates(gm: GraphModule) -> None:
    """Project gates back into [0, 1] after an optimizer step (c outside it has no meaning).

    Args:
        gm: a model from :func:`prepare`; its gates are changed in place.

    Returns:
        None.

    Example:
        >>> opt.step()
        >>> snl_fx.train.clamp_gates(gm)
    """
    with torch.no_grad():
        for w in gate_parameters(gm):
            w.clamp_(0.0, 1.0)


def ungated_relus(gm: GraphModule, family: str = "relu") -> int:
    """ReLUs per sample at sites left as plain ReLUs (skipped by pattern).

    Args:
        gm: a model from :func:`prepare`.

    Returns:
        Their ReLUs per sample (0 without ``skip``); every count and budget includes them.

    Example:
        >>> gm = snl_fx.prepare(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64), skip=["relu"])
        >>> snl_fx.gated.ungated_relus(gm)  # the stem ReLU: 64 x 32 x 32
        65536
    """
    gated = passes.get_meta(gm).gates
    return sum(n for name, n in site_relu_counts(gm, None, family).items() if name not in gated)


COUNT_EPS = passes.COUNT_EPS  # the one threshold of the ReLU count (see snl_fx.passes.gate.COUNT_EPS)


def site_relu_counts(gm: GraphModule, eps: float | None = COUNT_EPS, family: str = "relu") -> dict[str, int]:
    """ReLUs per sample at each site, in graph order.

    Args:
        gm: a prepared model.
        eps: a gate element counts while ``c > eps`` (a channel element counts H*W); ``None``
            counts every element, the model's ReLUs before linearization. Sites left as plain
            ReLUs (``skip``) count all their elements.
        family: whose sites (default ``"relu"``; ``"gelu"``, ``"softmax"``, ...: their elements;
            every count function of this module takes it).

    Returns:
        Site name -> ReLUs (elements of ``family``) per sample.

    Example:
        >>> snl_fx.train.site_relu_counts(gm)
        {'relu': 144, 'relu_1': 21}
    """
    return passes.site_counts(gm, eps, family)


def relu_count_gated(gm: GraphModule, eps: float | None = COUNT_EPS, family: str = "relu") -> int:
    """The ReLU count of Algorithm 1: ``#(c > eps)`` per sample over all sites (see :func:`site_relu_counts`).

    Args:
        gm: a model from :func:`prepare`.
        eps: a gate element counts while ``c > eps`` (default :data:`COUNT_EPS`); ``None``
            counts every element (:func:`total_relus`).

    Returns:
        ReLUs per sample, ungated sites included.

    Example:
        >>> snl_fx.train.relu_count_gated(gm)
        165
    """
    return sum(site_relu_counts(gm, eps, family).values())


def soft_relu_count(gm: GraphModule, family: str = "relu") -> float:
    """The gates' mass in ReLUs per sample: ``sum c`` (channel gates weigh H*W), plus ungated sites.

    The soft counterpart of :func:`relu_count_gated`: it moves as soon as the gates do.

    Args:
        gm: a model from :func:`prepare`.

    Returns:
        The mass as a float (no gradient); equal to :func:`total_relus` while every gate is 1.

    Example:
        >>> gm = snl_fx.prepare(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
        >>> snl_fx.train.soft_relu_count(gm)
        188416.0
    """
    weight = passes.element_weights(gm, family)
    with torch.no_grad():
        mass = sum(float(g.weight.sum()) * weight[n] for n, g in passes.gates(gm, family).items())
    return mass + ungated_relus(gm, family)


def total_relus(gm: GraphModule, family: str = "relu") -> int:
    """ReLUs per sample of the original model (every site): ``relu_count_gated(gm, eps=None)``.

    Args:
        gm: a model from :func:`prepare`.

    Returns:
        The count, whatever the gates' values.

    Example:
        >>> gm = snl_fx.prepare(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
        >>> snl_fx.gated.total_relus(gm)
        188416
    """
    return relu_count_gated(gm, None, family)


def gates_binary(gm: GraphModule) -> bool:
    """Whether every gate of ``gm`` (every family) is exactly 0 or 1, as after :func:`snl_fx.binarize`.

    Example:
        >>> snl_fx.gated.gates_binary(snl_fx.prepare(model, x))  # fresh gates: all 1
        True
    """
    return all(bool(((w == 0) | (w == 1)).all()) for w in gate_parameters(gm))


def freeze_gates(gm: GraphModule) -> None:
    """Stop gradients to the gates (after :func:`binarize`, or after loading binary gates).

    Args:
        gm: a model from :func:`prepare`; its gate parameters get ``requires_grad=False``.

    Returns:
        None.

    Example:
        >>> gm.load_state_dict(torch.load("gated.pt"))  # binary gates saved after binarize
        >>> snl_fx.train.freeze_gates(gm)  # fine-tune the weights only
    """
    for w in gate_parameters(gm):
        w.requires_grad_(False)


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
    """Largest elementwise difference of two models' outputs in eval mode (modes restored).

    Args:
        a, b: two modules taking the same input and returning a tensor (or a tuple or dict of
            tensors) of the same structure and shapes.
        example_input: an example batch (batch first), or a tuple of the forward's inputs.

    Returns:
        ``max |a(x) - b(x)|`` over every output tensor as a float (0.0 for an empty output;
        infinity when the outputs' structures or shapes differ).

    Example:
        >>> snl_fx.binarize(gm, 2000)
        2000
        >>> snl_fx.gated.max_abs_diff(gm, snl_fx.convert(gm), x)  # lowering changes nothing
        0.0
    """
    modes = a.training, b.training
    a.eval(), b.eval()
    try:
        with torch.no_grad():
            args = passes.as_args(example_input)
            out_a, out_b = a(*(t.clone() for t in args)), b(*(t.clone() for t in args))  # never the caller's tensors
    finally:
        a.train(modes[0]), b.train(modes[1])
    return _output_diff(out_a, out_b)


def _output_diff(out_a: Any, out_b: Any) -> float:
    """``max |a - b|`` over the tensor leaves of two outputs; infinity when structures or shapes differ
    (or non-float tensors differ at all)."""
    leaves_a, leaves_b = tree_leaves(out_a), tree_leaves(out_b)  # a tensor, or a tuple/dict of them
    if len(leaves_a) != len(leaves_b):
        return math.inf
    pairs = [(u, v) for u, v in zip(leaves_a, leaves_b) if isinstance(u, torch.Tensor)]
    if any(u.shape != getattr(v, "shape", None) for u, v in pairs):
        return math.inf
    if any(not (u.is_floating_point() or u.is_complex()) and not torch.equal(u, v) for u, v in pairs):
        return math.inf
    numeric = [(u, v) for u, v in pairs if u.numel() and (u.is_floating_point() or u.is_complex())]
    return max((float((u - v).abs().max()) for u, v in numeric), default=0.0)


__all__ = [
    "clamp_gates",
    "convert",
    "expected_counts",
    "freeze_gates",
    "gates_binary",
    "gate_parameters",
    "gates",
    "lasso_penalty",
    "max_abs_diff",
    "prepare",
    "relu_count_gated",
    "site_relu_counts",
    "soft_relu_count",
    "total_relus",
    "ungated_relus",
]


def expected_counts(gm: GraphModule) -> dict[str, int]:
    """What the inspector must find in the lowered model of a binarized ``gm``, per family: each
    gated family's kept elements (plus its ungated sites), and the ReLUs that a cut softmax row's
    ReLU-softmax replacement adds to the ReLU count.

    Args:
        gm: a binarized model from :func:`prepare`.

    Returns:
        Family -> elements per sample, for the families with a site in ``gm``.

    Example:
        >>> snl_fx.gated.expected_counts(gm)  # a ViT, gelu and softmax gated
        {'gelu': 870, 'softmax': 1156}
    """
    meta = passes.get_meta(gm)
    counts = {f: relu_count_gated(gm, COUNT_EPS, f) for f in dict.fromkeys(s.family for s in meta.sites)}
    for name, gate in passes.gates(gm, None).items():
        site = meta.site(name)
        adds = passes.FAMILIES[site.family].replacement_kinds.get(getattr(gate, "replacement", "identity"), ())
        if "relu" in adds:
            cut = site.numel - site_relu_counts(gm, COUNT_EPS, site.family)[name]
            counts["relu"] = counts.get("relu", 0) + cut
    return counts
