"""How long-running steps report progress, everywhere in privseg (the CLI draws the bars)."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
"""``progress(description, completed, total)``."""


def no_progress(description: str, completed: int, total: int) -> None:
    """The default: report nothing."""
    return None
