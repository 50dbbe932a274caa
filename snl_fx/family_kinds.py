"""The inspector kinds of each gateable nonlinearity family: one table for the passes (which gate
them) and both inspectors (which count them; the ONNX one never imports torch), so it imports nothing.

Example:
    >>> FAMILY_KINDS["gelu"]
    ('gelu', 'gelu_tanh')
"""

from __future__ import annotations

FAMILY_KINDS: dict[str, tuple[str, ...]] = {
    "relu": ("relu",),
    "gelu": ("gelu", "gelu_tanh"),
    "silu": ("silu",),
    "softmax": ("softmax",),
}
"""Family -> the kinds of :mod:`snl_fx.passes.spellings` (and of the ONNX inspector) it covers."""
