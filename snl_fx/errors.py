"""The two errors of snl_fx: one the user can fix, one that is a bug of snl_fx.

:class:`SnlFxError` is bad input (a model, budget, file or option snl_fx cannot take), explained
in one line that says what to change: the CLIs print it and exit with code 2. The compiler
passes raise it too (``snl_fx.passes.PassError`` is the same class). :class:`InternalError` is
a broken invariant of snl_fx itself (a lowered model that differs from the gated one, a
selection over its budget): the CLIs report it as an internal error and exit with code 1.
This module imports nothing, so every layer (the ONNX inspector included) can use it.
"""


class SnlFxError(ValueError):
    """Input snl_fx cannot take, explained in one line that says what to change.

    Args:
        *args: the message, one line (as for any ``ValueError``).

    Example:
        >>> snl_fx.TrainConfig(epochs=-1)  # SnlFxError: epochs must be an integer >= 0, got -1
    """


class InternalError(RuntimeError):
    """A broken invariant of snl_fx: a bug to report, never the user's input.

    Args:
        *args: the message, one line (as for any ``RuntimeError``).

    Example:
        >>> raise InternalError(f"lowered model differs from the gated model by {diff:.3g}")
    """


__all__ = ["InternalError", "SnlFxError"]
