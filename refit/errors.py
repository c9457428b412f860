"""The refit exception tree.

Every error a caller can trigger is a :class:`RefitError`; the subclasses say which stage
failed. Messages name the offending tensor or field and say what to do about it.
"""

from __future__ import annotations

from collections.abc import Iterable


class RefitError(Exception):
    """Base class of every error refit raises on purpose."""


class WireError(RefitError):
    """A control message could not be decoded or failed validation (names the field)."""


class PlanError(RefitError):
    """The state cannot be planned into buckets (bad names, dtypes, sizes or options)."""


class ResolveError(RefitError):
    """A receiver refused a push before loading anything; ``problems`` lists every reason."""

    def __init__(self, message: str, problems: Iterable[str] = ()) -> None:
        self.problems: list[str] = list(problems)
        super().__init__(message)


class TransportError(RefitError):
    """A transport failed or timed out; the message names the peer, the phase and the bucket."""


class IntegrityError(TransportError):
    """A bucket's bytes do not match the checksum its sender computed (nothing of it was
    applied; the message names the bucket and its tensors)."""


class TornStateError(RefitError):
    """A push broke after some buckets were applied: the target holds mixed weights."""


def error_reply(exc: BaseException) -> dict[str, object]:
    """``{"error": ...}`` for ``exc`` as a plain value (for RPC replies that must not raise): its
    refit kind (any other exception counts as a transport failure), its message, and a
    ``ResolveError``'s problems. The caller's side re-raises it as the same kind."""
    kind = type(exc).__name__ if isinstance(exc, RefitError) else "TransportError"
    problems = [str(p) for p in getattr(exc, "problems", [])]
    return {"error": {"kind": kind, "message": f"{type(exc).__name__}: {exc}", "problems": problems}}


def problem_list(problems: Iterable[str], limit: int = 20) -> str:
    """Sorted, de-duplicated, truncated bullet list of problems for an error message."""
    items = sorted(set(problems))
    shown = "\n".join(f"  - {p}" for p in items[:limit])
    if len(items) > limit:
        shown += f"\n  ... and {len(items) - limit} more"
    return shown
