"""Typed reading of a JSON object privseg wrote: a bad field fails with the file and field named.

``results.json`` is written typed (:mod:`privseg.core.results`) and read back through
:class:`Fields`, so a hand-edited or truncated file is refused with "results.json: field
'sites[1].dice' must be a number, got 'high'" (a :class:`~privseg.core.errors.DataError`: exit
status 2), not a KeyError deep inside the report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from privseg.core.errors import DataError
from privseg.core.io import read_json

INFINITE = "inf"
"""How an infinite epsilon (a release without DP) is written in JSON: never 0, never missing."""


def is_number(value: Any) -> bool:
    """An int or float (NaN included; bools excluded): what a numeric field may hold."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_fields(path: Path) -> Fields:
    """A JSON file's top-level object; a missing, unreadable or malformed file is a DataError."""
    try:
        return Fields(read_json(path), str(path))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON ({exc}); rerun the command that wrote it"
        ) from exc
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc})") from exc


class Fields:
    """One JSON object of ``source``; ``prefix`` names where it sits (``sites[1].``)."""

    def __init__(self, data: Any, source: str, prefix: str = "") -> None:
        if not isinstance(data, dict):
            where = f"field {prefix.rstrip('.')!r}" if prefix else "its top level"
            raise DataError(f"{source}: {where} must be a JSON object, got {_shown(data)}")
        self.data, self.source, self.prefix = data, source, prefix

    def error(self, key: str, rule: str) -> DataError:
        value = self.data.get(key)
        got = "nothing (the field is missing)" if key not in self.data else _shown(value)
        return DataError(f"{self.source}: field {self.prefix + key!r} {rule}, got {got}")

    def _take(self, key: str, ok: Any, rule: str, optional: bool) -> Any:
        value = self.data.get(key)
        if value is None and optional:
            return None
        if not ok(value):
            raise self.error(key, rule + (" or null" if optional else ""))
        return value

    def text(self, key: str, *, optional: bool = False) -> Any:
        return self._take(key, lambda v: isinstance(v, str), "must be a string", optional)

    def flag(self, key: str, *, optional: bool = False) -> Any:
        return self._take(key, lambda v: isinstance(v, bool), "must be true or false", optional)

    def integer(self, key: str, *, optional: bool = False) -> Any:
        ok = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        return self._take(key, ok, "must be a whole number", optional)

    def number(self, key: str, *, optional: bool = False) -> Any:
        """A float (NaN allowed); ``optional``: None when null or absent."""
        value = self._take(key, is_number, "must be a number", optional)
        return None if value is None else float(value)

    def metric(self, key: str) -> float:
        """A metric that may be unknown: NaN when null or absent, never 0."""
        value = self.number(key, optional=True)
        return math.nan if value is None else value

    def epsilon(self, key: str) -> float | None:
        """An epsilon: a number, :data:`INFINITE` (a release without DP) or null."""
        ok = lambda v: is_number(v) or v in (INFINITE, f"-{INFINITE}")  # noqa: E731
        value = self._take(key, ok, f'must be a number or "{INFINITE}"', True)
        return None if value is None else float(value)

    def items(self, key: str, *, optional: bool = False) -> Any:
        return self._take(key, lambda v: isinstance(v, list), "must be a list", optional)

    def mapping(self, key: str, *, optional: bool = False) -> Any:
        return self._take(key, lambda v: isinstance(v, dict), "must be an object", optional)

    def sub(self, key: str, *, optional: bool = False) -> Any:
        """The object ``key`` as :class:`Fields` (None when optional and absent)."""
        value = self.mapping(key, optional=optional)
        return None if value is None else Fields(value, self.source, f"{self.prefix}{key}.")

    def metrics(self) -> dict[str, float]:
        """Every field of this object as a metric (a Dice per site, a class's scores)."""
        return {k: self.metric(k) for k in self.data}

    def one_of(self, key: str, allowed: tuple[str, ...]) -> str:
        return self._take(
            key, lambda v: v in allowed, f"must be one of {', '.join(allowed)}", False
        )

    def each(self, key: str) -> list[Fields]:
        """The objects of list ``key``, each named by its index."""
        return [
            Fields(item, self.source, f"{self.prefix}{key}[{i}].")
            for i, item in enumerate(self.items(key))
        ]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
