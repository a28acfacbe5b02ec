"""User-facing errors.

Every problem a user can fix (bad input, bad option, unwritable output) is raised as
:class:`NtkSelectError` with a one-line message that names the file, the line where there
is one, and the fix. The CLI prints it without a traceback and exits non-zero.
"""

from __future__ import annotations

__all__ = ["NtkSelectError"]


class NtkSelectError(Exception):
    """An error the user can fix; ``str(err)`` is a single line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
