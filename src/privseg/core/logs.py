"""Which log records go where: privseg's own, and other libraries' only from a level up."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TextIO

PACKAGE = str(Path(__file__).resolve().parents[1])  # privseg/, this module being in core/


class OursOrAtLeast(logging.Filter):
    """Pass privseg's records, and other libraries' (Flower, Ray, Opacus; ``py.warnings`` for
    captured warnings) only from ``level`` up: their warnings are noise on a console and
    belong in ``run.log``."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "privseg" or record.name.startswith("privseg.")
        return ours or record.levelno >= self.level


def route_warnings() -> None:
    """Turn ``warnings`` into log records: privseg's own (risky-but-legal settings) as
    ``privseg.warnings``, shown like every privseg record; other libraries' (Opacus' "Optimal
    order is the largest alpha", Flower's deprecations) as ``py.warnings``, which
    :class:`OursOrAtLeast` keeps off the console and in ``run.log``. A warning is privseg's
    when the code it points at is in this package."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if str(filename).startswith(PACKAGE):
            logging.getLogger("privseg.warnings").warning("%s", message)
        else:
            text = warnings.formatwarning(message, category, filename, lineno, line)
            logging.getLogger("py.warnings").warning("%s", text.rstrip())

    warnings.showwarning = show
