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

from privseg.io import atomic_write_text
from privseg.report.blocks import to_html, to_markdown
from privseg.report.sections import build_blocks

log = logging.getLogger(__name__)


def write_report(study: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out_dir``.

    Returns the written paths: ``"markdown"``, ``"html"`` and one entry per figure stem
    (``"privacy_utility"``, ``"learning_curves"``, ``"dp_cost"``, ``"attack_1"``, ...).
    Attack grid paths in the study are resolved relative to ``out_dir``.
    """
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    blocks, written = build_blocks(study, out_dir)
    atomic_write_text(out_dir / "report.md", to_markdown(blocks))
    atomic_write_text(out_dir / "report.html", to_html(blocks))
    written["markdown"] = out_dir / "report.md"
    written["html"] = out_dir / "report.html"
    log.info("report written to %s", out_dir / "report.html")
    return written
