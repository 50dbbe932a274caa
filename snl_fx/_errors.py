"""The user-facing error of snl_fx: the CLIs print its message on one line and exit non-zero.

It is the passes' own error type, so a caller catches one class whichever layer raised it.
"""

from passes import PassError as SnlFxError

__all__ = ["SnlFxError"]
