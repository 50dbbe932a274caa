"""Gateable nonlinearity families beyond ReLU: their gate units, replacements, gates and lowered form.

A site's *family* decides which gate *units* it allows and what a cut unit computes instead (its
*replacement*), after PriViT (SNL's gates on a ViT) and MPCViT / MPCFormer:

============  =================  ==========================================================
family        units              replacements (the default first)
============  =================  ==========================================================
relu          pixel, channel     identity (the :class:`snl_fx.passes.Gate` of SNL)
gelu          token, element     identity, quad (MPCFormer: 0.125x^2 + 0.25x + 0.5)
silu          token, element     identity
softmax       row, head          square (PriViT: x^2/N), relu (MPCViT: relu(x)/sum relu(x)),
                                 quad (MPCFormer 2Quad: (x+c)^2/sum (x+c)^2, c=5), scaled (x/N)
============  =================  ==========================================================

A *token* is one position over the last (hidden) dim; a softmax *row* one head and query row over
the last dim, the one softmax normalises over: both gate shapes are the activation's per-sample
shape with the last dim set to 1. A softmax *head* (MPCViT's unit) is a whole head: its last two
dims set to 1. A gate is ``a = c*f(x) + (1-c)*r(x)`` (``f`` the original op,
``r`` the replacement); lowered, a unit kept computes ``f`` on exactly the kept units (gathered)
and a cut unit ``r``, never a mask multiply over the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..family_kinds import FAMILY_KINDS
from .errors import PassError
from .meta import Site

QUAD_SHIFT = 5.0  # MPCFormer's 2Quad: (x + c)^2 with c = 5


@dataclass(frozen=True)
class Family:
    """One gateable family: the inspector's kinds it covers, its units and replacements (defaults first)."""

    name: str
    kinds: tuple[str, ...]
    units: tuple[str, ...]
    replacements: tuple[str, ...]
    # kinds of the inspector that one cut element's replacement costs (what the lowered graph shows)
    replacement_kinds: dict[str, tuple[str, ...]]


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("relu", FAMILY_KINDS["relu"], ("pixel", "channel"), ("identity",), {"identity": ()}),
    Family("gelu", FAMILY_KINDS["gelu"], ("token", "element"), ("identity", "quad"),
           {"identity": (), "quad": ("mul", "scale", "scale")}),
    Family("silu", FAMILY_KINDS["silu"], ("token", "element"), ("identity",), {"identity": ()}),
    Family("softmax", FAMILY_KINDS["softmax"], ("row", "head"), ("square", "relu", "quad", "scaled"),
           {"square": ("mul", "scale"), "relu": ("relu", "div"), "quad": ("mul", "div"), "scaled": ("scale",)}),
)}
"""Family name -> :class:`Family`; ``relu`` is the ReLU sites of SNL, gated by :class:`snl_fx.passes.Gate`."""

_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "softmax": lambda x: torch.softmax(x, dim=-1),
}


def _relu_softmax(x: torch.Tensor, n: int) -> torch.Tensor:
    r = torch.relu(x)
    return r / (r.sum(-1, keepdim=True) + 1e-6)


def _quad_softmax(x: torch.Tensor, n: int) -> torch.Tensor:
    q = (x + QUAD_SHIFT) * (x + QUAD_SHIFT)
    return q / q.sum(-1, keepdim=True)


# what a cut unit computes, given the unit's values and N, the row length (a Python number, so that
# a division by it is a public scale in both inspectors and in ONNX)
_REPLACEMENTS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "identity": lambda x, n: x,
    "quad": lambda x, n: 0.125 * (x * x) + 0.25 * x + 0.5,  # GELU's; softmax's is _quad_softmax
    "square": lambda x, n: (x * x) / n,
    "relu": _relu_softmax,
    "scaled": lambda x, n: x / n,
}


def family_of(kind: str) -> str | None:
    """The gateable family of an inspector kind (``"gelu_tanh"`` -> ``"gelu"``), else None."""
    return next((f.name for f in FAMILIES.values() if kind in f.kinds), None)


def check_choice(family: str, unit: str | None = None, replacement: str | None = None) -> tuple[str, str]:
    """``(unit, replacement)`` of ``family``, defaults filled in; PassError naming the choices otherwise."""
    spec = FAMILIES.get(family)
    if spec is None:
        raise PassError(f"unknown nonlinearity family {family!r}; gateable: {', '.join(FAMILIES)}")
    unit = unit or spec.units[0]
    replacement = replacement or spec.replacements[0]
    if unit not in spec.units:
        raise PassError(f"{family} gates have units {', '.join(spec.units)}, not {unit!r}")
    if replacement not in spec.replacements:
        raise PassError(f"{family} replacements are {', '.join(spec.replacements)}, not {replacement!r}")
    return unit, replacement


def unit_shape(shape: tuple[int, ...], unit: str) -> tuple[int, ...]:
    """The gate's shape for a per-sample activation ``shape``: element -> the shape; token, row ->
    the shape with its last dim 1 (one gate per vector along the last dim); head -> the last two dims 1."""
    if unit == "element":
        return tuple(shape)
    inner = 2 if unit == "head" else 1
    if len(shape) < inner:
        raise PassError(f"a {unit} gate needs {inner} trailing dim(s) to gate over (activation shape {shape})")
    return tuple(shape[:len(shape) - inner]) + (1,) * inner


def replacement_fn(family: str, replacement: str) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """What a cut unit of ``family`` computes: ``fn(x, n)``, ``n`` the length of the last dim."""
    if family == "softmax" and replacement == "quad":
        return _quad_softmax
    return _REPLACEMENTS[replacement]


class NonlinearGate(nn.Module):
    """``a = c*f(x) + (1-c)*r(x)`` with a learnable ``c`` per unit: 1 keeps ``f``, 0 computes ``r``.

    Args:
        kind: the original op (``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"softmax"`` over the last dim).
        family, replacement: the site's family and what a cut unit computes (see :data:`FAMILIES`).
        shape: the gate's shape (:func:`unit_shape`).
        row: the activation's last dim (the N of ``x^2/N``).

    Example:
        >>> gate = NonlinearGate("softmax", "softmax", "square", (4, 17, 1), 17)
        >>> gate(torch.randn(2, 4, 17, 17)).shape
        torch.Size([2, 4, 17, 17])
    """

    def __init__(self, kind: str, family: str, replacement: str, shape: tuple[int, ...], row: int) -> None:
        super().__init__()
        self.kind, self.family, self.replacement, self.row = kind, family, replacement, row
        self.weight = nn.Parameter(torch.ones(tuple(shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = replacement_fn(self.family, self.replacement)(x, self.row)
        return r + self.weight * (_OPS[self.kind](x) - r)

    def replacement_error(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of ``(f(x) - r(x))^2`` summed over each unit: the gate's shape."""
        err = (_OPS[self.kind](x) - replacement_fn(self.family, self.replacement)(x, self.row)).pow(2).mean(0)
        return err.sum_to_size(self.weight.shape)

    def extra_repr(self) -> str:
        return f"{self.kind}, replacement={self.replacement}, shape={tuple(self.weight.shape)}"


class PartialNonlinear(nn.Module):
    """The lowered gate: ``f`` on exactly the kept units (gathered), the replacement on the others.

    The kept and the cut units are gathered apart, each computed, concatenated and put back in
    place with one fixed permutation (ONNX Gather, the op, Concat, Gather): under secret sharing
    the selection and the placement are local, so a backend evaluates ``f`` on exactly the kept
    units. All kept: ``f(x)``; none kept: ``r(x)``.

    Args:
        kind, family, replacement: as for :class:`NonlinearGate`.
        kept: indices of the kept units in the flattened gate.
        units: units per sample; ``inner`` the shape of one unit (``()`` for element gates, the
            last dim for token and row gates, the last two for head gates).
        row: the activation's last dim (the N of ``x^2/N``).
    """

    def __init__(self, kind: str, family: str, replacement: str, kept: torch.Tensor, units: int,
                 inner: tuple[int, ...], row: int) -> None:
        super().__init__()
        self.kind, self.family, self.replacement, self.row = kind, family, replacement, row
        self.units, self.inner = units, tuple(inner)
        keep = torch.zeros(units, dtype=torch.bool)
        keep[kept.long()] = True
        order = torch.cat([keep.nonzero().flatten(), (~keep).nonzero().flatten()])
        self.register_buffer("kept", keep.nonzero().flatten())
        self.register_buffer("cut", (~keep).nonzero().flatten())
        self.register_buffer("perm", torch.argsort(order))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, r = _OPS[self.kind], replacement_fn(self.family, self.replacement)
        if len(self.cut) == 0:
            return f(x)
        if len(self.kept) == 0:
            return r(x, self.row)
        flat = x.reshape((-1, self.units) + self.inner)  # not x.shape[0]: a dynamic batch in ONNX
        parts = torch.cat([f(torch.index_select(flat, 1, self.kept)), r(torch.index_select(flat, 1, self.cut), self.row)], 1)
        return torch.index_select(parts, 1, self.perm).reshape_as(x)

    def extra_repr(self) -> str:
        return f"{self.kind}: kept {len(self.kept)} of {self.units} units of {self.inner}, cut -> {self.replacement}"


def lowered_module(site: Site, gate: NonlinearGate, mask: torch.Tensor) -> PartialNonlinear:
    """The :class:`PartialNonlinear` of a binarized :class:`NonlinearGate` (``mask``: its kept units)."""
    shape, gate_shape = tuple(site.shape), tuple(gate.weight.shape)
    inner = len(shape)
    while inner > 0 and gate_shape[inner - 1] == 1 and shape[inner - 1] != 1:
        inner -= 1
    return PartialNonlinear(gate.kind, gate.family, gate.replacement, mask.flatten().nonzero().flatten().cpu(),
                            mask.numel(), shape[inner:], gate.row).to(mask.device)
