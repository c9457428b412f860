"""Checks of the options every public entry point takes, so a wrong value or name is a
:class:`~refit.errors.RefitError` that names it and the fix, never a raw ``TypeError`` from
deep inside a transport (or, worse, one raised after workers were already told to join)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

from refit.errors import RefitError


def check_timeout(value: Any, what: str, *, allow_none: bool = False) -> float | None:
    """``value`` as seconds: a positive finite number (or None, where that means forever).

    Raises:
        RefitError: naming ``what`` and the value.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        forever = " (or None to wait forever)" if allow_none else ""
        raise RefitError(f"{what} must be a positive number of seconds{forever}, got {value!r:.80}")
    return value  # as given (an int stays an int in messages)


def check_options(factory: Callable[..., Any], options: Mapping[str, Any], what: str) -> None:
    """Refuse keyword options ``factory`` does not take, listing the ones it does.

    Raises:
        RefitError: ``transport 'zmq' takes no option 'bogus'; its options: peers, timeout``.
    """
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in ("self", "cls")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise RefitError(f"{what} takes no option {', '.join(map(repr, unknown))}; its options: {', '.join(known) or 'none'}")
