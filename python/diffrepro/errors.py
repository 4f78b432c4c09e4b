# SPDX-License-Identifier: Apache-2.0
"""The two kinds of error a user can fix, as the command line reports them.

Both are ordinary Python exceptions (a ``UsageError`` is a ``ValueError``), so library callers can
catch them as such; ``diffrepro`` prints their message as one line and exits with status 2
(:class:`UsageError`) or 1 (:class:`RunError`).
"""

from __future__ import annotations

import contextlib

__all__ = ["RunError", "UsageError", "usage_errors"]


class UsageError(ValueError):
    """A bad argument or input value: the message names it, what it got and what was expected."""


class RunError(RuntimeError):
    """A failure while running that is not a bug: an unreadable or corrupt file (named in the
    message), a lost process, an output folder claimed by another run."""


@contextlib.contextmanager
def usage_errors(prefix: str):
    """Re-raise ``ValueError`` from the block as :class:`UsageError` prefixed with ``prefix``
    (the argument that carried the bad value)."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(f"{prefix}: {exc}") from exc
