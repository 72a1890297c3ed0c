"""A named table of plug-ins of one kind, with "did you mean" lookups (MONAI's
``look_up_option``, Opacus's ``accountants/registry.py``).

An entry is an object, or a ``"module:attribute"`` reference imported on first use: the tables
of :mod:`privseg.core.plugins` list the built-ins that way, so the config can check a name (and
``privseg config show`` can run) without importing torch, Opacus or Flower.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from privseg.core.errors import ConfigError

T = TypeVar("T")


def choice_error(name: str, value: object, allowed: Collection[str]) -> ConfigError:
    """The error for a value outside ``allowed``: names the field, the value, the closest
    allowed value and all of them."""
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"{name} = {value!r} is invalid{hint}: allowed values are "
        + ", ".join(repr(a) for a in allowed)
    )


@dataclass
class _Entry:
    target: Any  # the object, or "module:attribute" until first use
    help: str
    info: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Plug-ins of one kind by name, in registration order; ``field`` names the config field
    (or the input) the name comes from, for error messages."""

    def __init__(self, field: str) -> None:
        self.field = field
        self._entries: dict[str, _Entry] = {}

    def add(self, name: str, target: T | str, *, help: str = "", **info: Any) -> None:
        """Register ``target`` (or its ``"module:attribute"``) as ``name``; ``info`` holds the
        facts the config checks without loading it (e.g. a model's channel widths)."""
        if name in self._entries:
            raise ValueError(f"{self.field}: {name!r} is already registered")
        self._entries[name] = _Entry(target, help, info)

    def register(self, name: str, *, help: str = "", **info: Any) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorate(target: T) -> T:
            self.add(name, target, help=help, **info)
            return target

        return decorate

    def remove(self, name: str) -> None:
        """Forget ``name`` (a plug-in registered for a while, e.g. by a test)."""
        self._entries.pop(self.check(name))

    def check(self, name: str) -> str:
        """``name`` when registered, else a ConfigError naming the field and the choices."""
        if name not in self._entries:
            raise choice_error(self.field, name, self.names())
        return name

    def get(self, name: str) -> T:
        """The plug-in registered as ``name`` (imported on first use)."""
        entry = self._entries[self.check(name)]
        if isinstance(entry.target, str):
            module, _, attr = entry.target.partition(":")
            entry.target = getattr(importlib.import_module(module), attr)
        return entry.target  # type: ignore[no-any-return]

    def help(self, name: str) -> str:
        """The help text registered with ``name``."""
        return self._entries[self.check(name)].help

    def info(self, name: str) -> dict[str, Any]:
        """The facts registered with ``name`` (empty when none)."""
        return self._entries[self.check(name)].info

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def describe(self) -> str:
        """``'a' (help), 'b' (help)``: for help texts, from the table itself."""
        return ", ".join(
            f"{n!r} ({e.help})" if e.help else repr(n) for n, e in self._entries.items()
        )

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.field!r}, {list(self._entries)})"
