"""Per-graph state shared by the passes, kept in one dataclass in ``gm.meta["snl_fx"]``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch.fx import GraphModule

from .errors import PassError

META_KEY = "snl_fx"


@dataclass(frozen=True)
class Site:
    """One ReLU call site (not a module: one nn.ReLU called twice is two sites)."""

    name: str  # stable hierarchical name, e.g. "layer1.0.relu_1"
    node: str  # FX node name at discovery (its gate is keyed by the site name: gate.site_key)
    op: str  # spelling: "nn.ReLU", "F.relu", "torch.relu_", "Tensor.relu", ...
    shape: tuple[int, ...]  # activation shape without the batch dim
    inplace: bool = False
    family: str = "relu"  # the gateable family (passes.families.FAMILIES): relu, gelu, silu, softmax
    kind: str = "relu"  # the inspector's kind of the op (gelu_tanh is of the gelu family)

    @property
    def numel(self) -> int:
        """Elements per sample at this site (for a ReLU site, its ReLUs)."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Nonlinearity:
    """A non-ReLU nonlinearity (max-pool, GELU, softmax, LayerNorm, ReLU6, a secret product, ...), counted apart.

    ``kind`` is one of the kinds of :mod:`snl_fx.passes.spellings`: gelu (erf form), gelu_tanh,
    silu, sigmoid, tanh, softmax (log-softmax too), layernorm, rmsnorm, exp, div (by a secret
    divisor), mul (of two secret factors), maxpool, avgpool, relu6, hardtanh, leaky_relu, prelu,
    elu, selu, celu, mish, hardswish, hardsigmoid, clamp, max. Sizes are per sample, except in
    ``SNLMeta.constant``, where they are of the whole value.
    """

    name: str
    kind: str
    shape: tuple[int, ...]  # output shape without the batch dim
    comparisons: int  # per sample; max-pool: outputs * (window - 1), else output elements
    row: int | None = None  # softmax, layernorm, rmsnorm: the length of the rows they normalise over
    node: str | None = None  # the FX node's name (torch inspector), for gating it as a site of its family


@dataclass(frozen=True)
class Ungateable:
    """A leaf module that computes ReLUs the passes cannot see or gate."""

    name: str
    module_type: str
    relus: int | None  # per sample, measured at dispatch level; None if unknown


@dataclass
class SNLMeta:
    """What the front end found, and what later passes did to it."""

    batch_size: int
    sites: list[Site] = field(default_factory=list)
    others: list[Nonlinearity] = field(default_factory=list)
    ungateable: list[Ungateable] = field(default_factory=list)
    # nonlinearities on values no batched input flows into (weights, constants): not per sample,
    # never gated; ``shape`` is the whole value and ``comparisons`` its elements
    constant: list[Nonlinearity] = field(default_factory=list)
    gates: dict[str, str] = field(default_factory=dict)  # site name -> gate submodule path
    granularity: str | None = None  # the unit of the ReLU gates: pixel or channel
    units: dict[str, str] = field(default_factory=dict)  # other gated family -> its unit (token, row, element)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


def get_meta(gm: GraphModule) -> SNLMeta:
    """The SNLMeta of a graph produced by :func:`passes.trace`."""
    meta = getattr(gm, "meta", {}).get(META_KEY) if isinstance(getattr(gm, "meta", None), dict) else None
    if meta is None:
        raise PassError(f"this {type(gm).__name__} was not prepared by snl_fx (no snl_fx metadata): "
                        "call snl_fx.prepare(model, example_input) first")
    return meta
