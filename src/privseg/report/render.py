"""``report.md`` and a self-contained ``report.html`` from a study's ``results.json``.

The report is built once as blocks (:mod:`privseg.report.sections`), then rendered twice
(:mod:`privseg.report.blocks`), so the Markdown and HTML versions always say the same thing.
Every sentence of the summary is derived from numbers in the study
(:mod:`privseg.report.summary`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from privseg.core.io import atomic_write_text, make_folder
from privseg.core.run_folder import REPORT_HTML, REPORT_MD
from privseg.report.blocks import to_html, to_markdown
from privseg.report.sections import build_blocks
from privseg.report.tables import Table

log = logging.getLogger(__name__)


def write_report(study: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html``, ``figures/*.png`` (plots also as ``.svg`` next to
    them) and every table as ``tables/<name>.csv`` into ``out_dir``.

    Returns the written paths: ``"markdown"``, ``"html"``, one entry per figure stem
    (``"privacy_utility"``, ``"learning_curves"``, ``"dp_cost"``, ``"attack_1"``, ...; the PNG)
    and one per table (``"table_dice"``, ...). Attack grid paths in the study are resolved
    relative to ``out_dir``.
    """
    out_dir = Path(out_dir)
    make_folder(out_dir / "figures")
    blocks, written = build_blocks(study, out_dir)
    written.update(write_tables(blocks, out_dir / "tables"))
    written["markdown"], written["html"] = out_dir / REPORT_MD, out_dir / REPORT_HTML
    atomic_write_text(written["markdown"], to_markdown(blocks))
    atomic_write_text(written["html"], to_html(blocks))
    log.info("report written to %s", written["html"])
    return written


def write_tables(blocks: list[Any], folder: Path) -> dict[str, Path]:
    """Each table block as ``folder/<name>.csv`` (the cells the report shows), by its name;
    a name used twice gets a number."""
    written: dict[str, Path] = {}
    for i, blk in enumerate(b for b in blocks if isinstance(b, Table)):
        name = blk.name or f"table_{i + 1}"
        if f"table_{name}" in written:
            name = f"{name}_{i + 1}"
        path = folder / f"{name}.csv"
        atomic_write_text(path, blk.to_csv())
        written[f"table_{name}"] = path
    return written
