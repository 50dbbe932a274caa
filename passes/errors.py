"""The one error type of the passes: user-facing, with a message that says what to do."""


class PassError(ValueError):
    """A model or graph the passes cannot handle, explained in one line."""
