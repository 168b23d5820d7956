"""Argument checks that name the field they reject, and :class:`UserError`, the error a user must fix.

``check_int`` / ``check_fraction`` / ``check_choice`` replace the hand-written "an int but not a bool,
in range" tests: each returns the value when it is fine and raises :class:`UserError` (a ``ValueError``,
so ``except ValueError`` keeps working) with a message of the form ``"<field> must be ..., got <value>"``
otherwise. Imports nothing heavy (the ``rosa`` CLI's startup reads it).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional


class UserError(ValueError):
    """Input the user must fix: a bad flag value, a bad file (missing key, malformed content), a bad config key.

    Raised on purpose by the layers that validate input. The ``rosa`` CLI prints it as one line and exits
    with status 2; any other exception keeps its traceback (it is a bug, not the user's mistake). A plain
    ``ValueError`` means "wrong call" (a programming error in the caller), not "wrong input".
    """


def is_int(value: Any) -> bool:
    """True for an ``int`` that is not a ``bool`` (Python counts ``True`` as 1; a config never should)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """True for a finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_words(minimum: Optional[int]) -> str:
    if minimum is None:
        return "an integer"
    if minimum == 0:
        return "a non-negative integer"
    if minimum == 1:
        return "a positive integer"
    return f"an integer >= {minimum}"


def check_int(field: str, value: Any, minimum: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
    """``value`` if it is an integer (not a bool) ``>= minimum`` (or None with ``allow_none``).

    Messages: ``"limit must be a positive integer, got 0"`` (minimum 1), ``"... a non-negative integer"``
    (minimum 0), ``"... an integer >= 2"`` (other minimums), ``"... an integer"`` (none), with
    ``" or None"`` after the kind when ``allow_none``.
    """
    if value is None and allow_none:
        return None
    if not is_int(value) or (minimum is not None and value < minimum):
        raise UserError(f"{field} must be {_int_words(minimum)}{' or None' if allow_none else ''}, got {value!r}")
    return value


_BRACKETS = {"left": "[)", "right": "(]", "both": "[]", "neither": "()"}


def _inside(value: float, low: float, high: float, closed: str) -> bool:
    above = value >= low if closed in ("left", "both") else value > low
    below = value <= high if closed in ("right", "both") else value < high
    return above and below


def check_fraction(field: str, value: Any, low: float = 0.0, high: float = 1.0, closed: str = "left") -> float:
    """``value`` as a float if it is a finite number (not a bool) in the interval from ``low`` to ``high``.

    ``closed`` says which ends belong to the interval, as in ``pandas.Interval``: ``"left"`` ``[low, high)``,
    ``"right"`` ``(low, high]``, ``"both"`` ``[low, high]``, ``"neither"`` ``(low, high)``. Message:
    ``"density must be a number in [0, 1), got 1.5"``.
    """
    if closed not in _BRACKETS:
        raise ValueError(f"closed must be one of {', '.join(_BRACKETS)}, got {closed!r}")
    if not is_real(value) or not _inside(value, low, high, closed):
        opening, closing = _BRACKETS[closed]
        raise UserError(f"{field} must be a number in {opening}{low:g}, {high:g}{closing}, got {value!r}")
    return float(value)


def _alternatives(choices: list) -> str:
    shown = [repr(c) for c in choices]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def check_choice(field: str, value: Any, choices: Iterable, why: str = "") -> Any:
    """``value`` if it is one of ``choices`` (``in``: ``1`` counts as ``True``).

    Message: ``"impl must be 'auto', 'merged' or 'sp_add', got 'x'"``; ``why`` (e.g. ``" (biases stay
    frozen)"``) goes after the alternatives.
    """
    choices = list(choices)
    if value not in choices:
        raise UserError(f"{field} must be {_alternatives(choices)}{why}, got {value!r}")
    return value
