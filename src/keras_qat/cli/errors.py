"""The one exception the command line shows as a one-line reason (exit status 2)."""

from __future__ import annotations


class UsageError(Exception):
    """A user's mistake on the command line: a missing file, a wrong array name, an unknown
    scheme. ``keras-qat`` prints its message on one line; ``--debug`` shows the traceback."""


__all__ = ["UsageError"]
