"""The user-facing error of snl_fx: the CLIs print its message on one line and exit non-zero."""

from passes import PassError


class SnlFxError(PassError):
    """Bad input or a run that cannot go on, explained in one line."""
