"""Solver parameters checked when the solver is built, each error naming the allowed range."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["number", "choice"]


def number(owner: str, name: str, value, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, integer: bool = False) -> float | int:
    """`value` as a float (or int) inside the range, else ValueError naming the range and the value.

    low / high: bounds (None: unbounded); low_open / high_open: the bound itself is excluded.
    """
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    allowed = " and ".join(part for part in (lo, hi) if part)
    kind = "a whole number" if integer else "a finite number"
    expected = f"{owner} {name} must be {kind}{' ' + allowed if allowed else ''}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{expected}, got {value!r} ({type(value).__name__})")
    if integer and float(value) != int(value):
        raise ValueError(f"{expected}, got {value!r}")
    v = int(value) if integer else float(value)
    if not math.isfinite(v):
        raise ValueError(f"{expected}, got {value!r}")
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high:
        raise ValueError(f"{expected}, got {value!r}")
    return v


def choice(owner: str, name: str, value, options: Sequence[str]) -> str:
    """`value` if it is one of `options`, else ValueError listing them (and the closest one)."""
    if value in options:
        return value
    import difflib

    close = difflib.get_close_matches(str(value), list(options), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"{owner} {name} must be one of {', '.join(map(repr, options))}; got {value!r}{hint}")
