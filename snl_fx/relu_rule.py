"""The one rule of when a clamp computes a ReLU, read by the compiler and by the ONNX inspector.

``torch.clamp(x, min=0)`` with no max (in any spelling: ``Tensor.clamp``, ``clamp_min(0)``,
``clip``, their in-place forms) computes exactly ``relu(x)``, and so do ONNX ``Clip(min=0)`` and
``Max(x, 0)``: both inspectors count them as ReLU sites, and the compiler gates and lowers them
like any ReLU. A clamp with another lower bound or with an upper bound is another nonlinearity.
This module imports nothing (like :mod:`snl_fx.errors`), so that the compiler (``snl_fx.passes``)
and the ONNX inspector, which never imports torch, share it.
"""

from __future__ import annotations

RELU = "relu"  # the kind of a clamp that computes a ReLU
CLAMP_KINDS: dict[tuple[float, float], str] = {(0.0, 6.0): "relu6"}  # (min, max) -> kind; else "clamp"


def clamp_kind(lo: object, hi: object, floating: bool = True) -> str | None:
    """What ``clamp(x, min=lo, max=hi)`` (ONNX ``Clip``) computes: ``"relu"``, ``"relu6"``, ``"clamp"`` or None.

    Args:
        lo, hi: the bounds: a number, None (absent; infinite bounds count as absent), or anything
            else for a bound only known at run time (a tensor, a graph value).
        floating: whether ``x`` holds floating-point numbers; a clamp of integers (indices,
            positions) is no activation, so never a ReLU site.

    Returns:
        ``"relu"`` when ``lo == 0``, there is no upper bound and ``x`` is floating point; None
        when there is no bound at all (an identity); else the kind of another nonlinearity
        (``"relu6"`` for (0, 6), ``"clamp"``).

    Example:
        >>> clamp_kind(0, None), clamp_kind(0.0, float("inf")), clamp_kind(0.1, None), clamp_kind(0, 6)
        ('relu', 'relu', 'clamp', 'relu6')
        >>> clamp_kind(0, None, floating=False)
        'clamp'
    """
    lo, hi = _bound(lo, -1), _bound(hi, 1)
    if lo is None and hi is None:
        return None
    if lo == 0 and hi is None:
        return RELU if floating else "clamp"
    if isinstance(lo, float) and isinstance(hi, float):
        return CLAMP_KINDS.get((lo, hi), "clamp")
    return "clamp"


def _bound(value: object, sign: int) -> object:
    """A bound as a float, None when absent or infinite on its own side; other values unchanged."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if value == sign * float("inf"):
        return None
    return float(value)


__all__ = ["CLAMP_KINDS", "RELU", "clamp_kind"]
