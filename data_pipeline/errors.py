"""The one error type of the prepare job."""

from __future__ import annotations


class PrepareError(RuntimeError):
    """The data cannot be prepared; the message says which file or record, and why."""

    user_facing = True
