"""How the report shows numbers: one formatting for tables, sentences and captions."""

from __future__ import annotations

import math
from typing import Any

MISSING = "–"
"""Shown for None, NaN and absent values, so a gap is never mistaken for a zero."""


def is_num(x: Any) -> bool:
    """True for a finite int/float (bools excluded): the values we may compute with."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x: Any, spec: str = ".3f") -> str:
    """Format a number, or MISSING for None / NaN / inf / non-numbers."""
    if not is_num(x):
        return MISSING if x is None or isinstance(x, int | float) else str(x)
    return format(x, spec)


def fmt_pm(mean: Any, sd: Any, spec: str = ".3f") -> str:
    """``mean ± sd``; only the mean when the spread is unknown."""
    if not is_num(mean):
        return MISSING
    return f"{mean:{spec}} ± {sd:{spec}}" if is_num(sd) else format(mean, spec)


def fmt_eps(x: Any) -> str:
    """Epsilon; infinite (a release without DP, ``"inf"`` in results.json) as ∞."""
    if x == "inf" or (isinstance(x, float) and math.isinf(x) and x > 0):
        return "∞"
    return fmt(x, ".3g")


def fmt_ratio(x: Any) -> str:
    """A ratio as ``2.13×``."""
    return f"{fmt(x, '.2f')}×" if is_num(x) else MISSING


def csv_cell(x: Any) -> str:
    """A value as a CSV cell a program can read: a number in full, empty where it is missing
    (never a dash, never 0), a flag as 1 / 0, infinity as ``inf``, text as it is."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, bool):
        return "1" if x else "0"
    return repr(x) if isinstance(x, float) else str(x)


def fmt_bool(x: Any, yes: str = "yes", no: str = "no") -> str:
    return MISSING if x is None else (yes if x else no)


def fmt_seconds(x: Any) -> str:
    """Seconds as ``1 h 02 min``, ``3 min 05 s`` or ``12.3 s``."""
    if not is_num(x):
        return MISSING
    if x >= 3600:
        return f"{int(x // 3600)} h {int(x % 3600 // 60):02d} min"
    if x >= 60:
        return f"{int(x // 60)} min {int(x % 60):02d} s"
    return f"{x:.1f} s"


def fmt_value(v: Any) -> str:
    """Any config / threat-model value as short text."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return fmt(v, "g")
    if isinstance(v, list | tuple):
        return "[" + ", ".join(fmt_value(i) for i in v) + "]"
    if isinstance(v, dict):
        return "; ".join(f"{k}: {fmt_value(i)}" for k, i in v.items())
    return MISSING if v is None else str(v)
