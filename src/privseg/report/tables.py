"""Tables of a study report, built from ``results.json`` only: Markdown, HTML and CSV.

Every builder takes plain dictionaries (the study schema) and returns a :class:`Table` of the
values behind each cell: Markdown and HTML show them formatted once (so both show exactly the
same), ``tables/<name>.csv`` keeps them as numbers a program can analyse.
"""

from __future__ import annotations

import csv
import html
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from privseg.core.results import CENTRAL, MODEL_GRID_UNITS
from privseg.report.format import (
    MISSING,
    csv_cell,
    fmt,
    fmt_bool,
    fmt_eps,
    fmt_pm,
    fmt_ratio,
    fmt_value,
    is_num,
)
from privseg.report.study_view import (
    baseline_for,
    learned,
    run_label,
    site_names,
    sorted_runs,
    time_per_unit,
    with_verdict,
)


@dataclass(frozen=True)
class Column:
    """One column of the report: its header, the CSV columns behind it (one quantity each,
    units in the name: ``dice_mean``, ``hd95_mm_mean``) and how the report shows them."""

    header: str
    csv: tuple[str, ...]
    show: Callable[..., str] = fmt_value


@dataclass
class Table:
    """Columns plus, per row, the values behind them (one per CSV column): the report shows
    them formatted once (:mod:`privseg.report.format`), the CSV keeps the numbers."""

    columns: list[Column]
    values: list[list[Any]] = field(default_factory=list)
    caption: str = ""
    name: str = ""  # the CSV's stem next to the report (tables/<name>.csv)

    def add(self, *values: Any) -> None:
        self.values.append(list(values))

    @property
    def headers(self) -> list[str]:
        return [c.header for c in self.columns]

    @property
    def rows(self) -> list[list[str]]:
        """The cells the report shows (Markdown and HTML alike)."""
        out = []
        for values in self.values:
            it = iter(values)
            out.append([c.show(*(next(it) for _ in c.csv)) for c in self.columns])
        return out

    def numeric_columns(self) -> list[bool]:
        """Columns whose every shown cell starts like a number: right-aligned, others left."""

        def numeric(cell: str) -> bool:
            return cell == MISSING or bool(_NUMBER.match(cell))

        rows = self.rows
        return [
            i > 0 and all(numeric(r[i]) for r in rows if i < len(r))
            for i in range(len(self.columns))
        ]

    def to_markdown(self) -> str:
        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        rule = "|" + "|".join("--:" if n else ":--" for n in self.numeric_columns()) + "|"
        out = [line(self.headers), rule, *[line(r) for r in self.rows]]
        if self.caption:
            out += ["", f"*{self.caption}*"]
        return "\n".join(out)

    def to_csv(self) -> str:
        """One column per quantity: numbers as numbers, an empty cell where one is missing,
        flags as 1 / 0, labels as text."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([name for c in self.columns for name in c.csv])
        writer.writerows([csv_cell(v) for v in values] for values in self.values)
        return buf.getvalue()

    def to_html(self) -> str:
        cls = [' class="num"' if n else "" for n in self.numeric_columns()]
        head = "".join(
            f"<th{c}>{html.escape(h)}</th>" for c, h in zip(cls, self.headers, strict=True)
        )
        body = "".join(
            "<tr>"
            + "".join(f"<td{c}>{html.escape(v)}</td>" for c, v in zip(cls, row, strict=False))
            + "</tr>"
            for row in self.rows
        )
        cap = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_NUMBER = re.compile(r"^[-+]?(\d|\.\d)")
_1F, _2F, _3G = partial(fmt, spec=".1f"), partial(fmt, spec=".2f"), partial(fmt, spec=".3g")
SETTING = Column("Setting", ("setting", "did_not_learn"), with_verdict)
"""A run's label; in the CSV a flag instead of "(did not learn)"."""


# ---- table builders -----------------------------------------------------------------------
def distance_units(runs: list[dict[str, Any]]) -> str:
    """The runs' common HD95 units; results without the key were scored on the model grid."""
    found = {str(r.get("hd95_units") or MODEL_GRID_UNITS) for r in runs}
    return found.pop() if len(found) == 1 else "mixed units"


def _unit_name(units: str) -> str:
    """Units as a CSV column name's part: ``mm``, ``voxels``, ``mixed_units``."""
    return units.removeprefix("model-grid ").replace(" ", "_")


def _mean(values: list[Any]) -> float | None:
    known = [v for v in values if is_num(v)]
    return sum(known) / len(known) if known else None


def _setting(r: dict[str, Any]) -> tuple[str, bool]:
    return run_label(r), learned(r) is False


def dice_table(runs: list[dict[str, Any]]) -> Table:
    """Dice mean ± sd over test patient volumes per site and overall, one row per setting."""
    names, units = site_names(runs), distance_units(runs)
    t = Table(
        [
            SETTING,
            *(Column(n, (f"{n}_dice_mean", f"{n}_dice_sd"), fmt_pm) for n in names),
            Column("Overall", ("dice_mean", "dice_sd"), fmt_pm),
            Column(f"HD95 ({units})", (f"hd95_{_unit_name(units)}_mean",), _1F),
        ],
        name="dice",
    )
    for r in sorted_runs(runs):
        by_site = {s.get("name"): s for s in r.get("sites") or []}
        dice = [by_site.get(n, {}).get(k) for n in names for k in ("dice", "dice_sd")]
        hd95 = _mean([s.get("hd95") for s in by_site.values()])
        t.add(*_setting(r), *dice, r.get("dice_mean"), r.get("dice_sd"), hd95)
    return t


def class_table(runs: list[dict[str, Any]]) -> Table | None:
    """Per class (``data.classes``): Dice over test patient volumes and HD95 (mean over sites),
    one row per setting; None with one class (the Dice table says it all)."""
    names = list(dict.fromkeys(n for r in runs for n in r.get("classes") or {}))
    if len(names) < 2:
        return None
    units = distance_units(runs)
    t = Table(
        [
            SETTING,
            *(Column(f"{n} Dice", (f"{n}_dice_mean", f"{n}_dice_sd"), fmt_pm) for n in names),
            *(
                Column(f"{n} HD95 ({units})", (f"{n}_hd95_{_unit_name(units)}_mean",), _1F)
                for n in names
            ),
        ],
        name="classes",
    )
    for r in sorted_runs(runs):
        per_class = r.get("classes") or {}
        dice = [per_class.get(n, {}).get(k) for n in names for k in ("dice_mean", "dice_sd")]
        sites = r.get("sites") or []
        hd95 = [
            _mean([(s.get("classes") or {}).get(n, {}).get("hd95") for s in sites]) for n in names
        ]
        t.add(*_setting(r), *dice, *hd95)
    return t


def compute_table(runs: list[dict[str, Any]]) -> Table | None:
    """The compute each setting got, per site (``compute`` of each run's results)."""
    rows = [r for r in sorted_runs(runs) if isinstance(r.get("compute"), dict)]
    if not rows:
        return None
    t = Table(
        [
            Column("Setting", ("setting",), str),
            Column("Sequential steps", ("sequential_steps",)),
            Column("Slices per step per site", ("slices_per_step_per_site",), _3G),
            Column(
                "Slice gradients per site", ("slice_gradients_per_site",), partial(fmt, spec=".0f")
            ),
        ],
        name="compute",
    )
    for r in rows:
        c = r["compute"]
        per_step = c.get("batch_size")
        if r.get("mode") == CENTRAL and per_step and len(r.get("sites") or []):
            per_step = per_step / len(r["sites"])  # one pooled batch shared by the sites
        t.add(run_label(r), c.get("sequential_steps"), per_step, c.get("slices_per_site"))
    return t


def cross_site_table(run: dict[str, Any]) -> Table | None:
    """Local-only models scored on every site's test split (rows: trained at; cols: tested at)."""
    sites = run.get("sites") or []
    if not any(s.get("cross") for s in sites):
        return None
    names = [s.get("name") for s in sites]
    t = Table(
        [
            Column("Trained at \\ tested at", ("trained_at",), str),
            *(Column(str(n), (f"{n}_dice",), fmt) for n in names),
        ],
        name="cross_site",
    )
    for s in sites:
        cross = s.get("cross") or {}
        t.add(
            s.get("name"), *[s.get("dice") if n == s.get("name") else cross.get(n) for n in names]
        )
    return t


def dp_cost_table(runs: list[dict[str, Any]]) -> Table | None:
    """Seconds per round (or epoch) of each DP run next to its non-private twin and the ratio."""
    t = Table(
        [
            Column("Setting", ("setting",), str),
            Column("Per", ("per",), str),
            Column("Seconds (DP)", ("seconds_dp",), _2F),
            Column("Seconds (non-private)", ("seconds_nonprivate",), _2F),
            Column("Ratio DP / non-DP", ("ratio_x",), fmt_ratio),
        ],
        name="dp_cost",
    )
    for r in sorted_runs(runs):
        if not r.get("dp"):
            continue
        sec, unit = time_per_unit(r)
        base = baseline_for(r, runs)
        base_sec = time_per_unit(base)[0] if base else None
        ratio = sec / base_sec if is_num(sec) and is_num(base_sec) and base_sec > 0 else None
        t.add(run_label(r), unit, sec, base_sec, ratio)
    return t if t.values else None


def epsilon_table(runs: list[dict[str, Any]]) -> Table | None:
    """Per-site privacy spent in each DP setting, with every parameter that determines it
    (the CSV's columns are the results.json names)."""
    t = Table(
        [
            Column("Setting", ("setting",), str),
            Column("Site", ("site",), str),
            Column("ε this run", ("epsilon_run",), fmt_eps),
            Column("ε patients' total", ("epsilon",), fmt_eps),
            Column("Target ε", ("target_epsilon",), fmt_eps),
            Column("δ", ("delta",), partial(fmt, spec=".1e")),
            Column("σ (noise)", ("noise_multiplier",), _3G),
            Column("q (sample rate)", ("sample_rate",), _3G),
            Column("Steps", ("steps",), partial(fmt, spec=".0f")),
            Column("Clip C", ("max_grad_norm",), _3G),
            Column("Accountant", ("accountant",)),
            Column("Unit", ("unit",)),
        ],
        name="epsilon",
    )
    keys = ("epsilon_run", "epsilon")
    site_keys = ("delta", "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "accountant")
    for r in sorted_runs(runs):
        if r.get("dp"):
            for s in r.get("sites") or []:
                eps = [s.get(k) for k in keys]
                t.add(
                    run_label(r),
                    s.get("name"),
                    *eps,
                    r.get("target_epsilon"),
                    *[s.get(k) for k in site_keys],
                    r.get("unit"),
                )
    return t if t.values else None


def attack_label(attack: dict[str, Any]) -> str:
    """An attack's label; without one, what it attacked (no DP, or DP-SGD at its epsilon)."""
    if attack.get("label"):
        return str(attack["label"])
    return f"DP-SGD ε={fmt_eps(attack.get('epsilon'))}" if attack.get("dp") else "No DP"


def attack_table(attacks: list[dict[str, Any]], verdicts: list[bool | None]) -> Table:
    """Attack metrics next to the two baselines that say whether a reconstruction means much."""
    t = Table(
        [
            Column("Attack", ("attack",), str),
            Column("Threat", ("threat",)),
            Column("DP", ("dp",), fmt_bool),
            Column("ε", ("epsilon",), fmt_eps),
            Column("Batch", ("batch_size",)),
            Column("Mask", ("mask_mode",)),
            Column("PSNR median (dB)", ("psnr_median_db",), _1F),
            Column("SSIM median", ("ssim_median",), fmt),
            Column("Re-identified", ("reidentification_rate",), partial(fmt, spec=".0%")),
            Column("Prior PSNR (dB)", ("prior_psnr_median_db",), _1F),
            Column("Chance PSNR (dB)", ("chance_psnr_median_db",), _1F),
            Column("Reconstructed?", ("reconstructed",), fmt_bool),
        ],
        name="attack",
    )
    keys = ("threat", "dp", "epsilon", "batch_size", "mask_mode", "psnr_median", "ssim_median")
    baselines = ("reidentification_rate", "prior_psnr_median", "chance_psnr_median")
    for a, ok in zip(attacks, verdicts, strict=True):
        t.add(attack_label(a), *[a.get(k) for k in keys], *[a.get(k) for k in baselines], ok)
    return t


def audit_table(audits: list[dict[str, Any]]) -> Table:
    """Empirical membership audit: observed success rate against the rate that ε allows."""
    _4G = partial(fmt, spec=".4g")
    t = Table(
        [
            Column("ε", ("epsilon",), fmt_eps),
            Column("δ", ("delta",), partial(fmt, spec=".1e")),
            Column("Trials", ("trials",)),
            Column("Candidates", ("candidates",)),
            Column("Success rate", ("success_rate",), _4G),
            Column("Bound from ε", ("bound",), _4G),
            Column("Held", ("held",), partial(fmt_bool, yes="yes", no="NO")),
        ],
        name="audit",
    )
    keys = ("epsilon", "delta", "trials", "candidates", "success_rate", "bound", "held")
    for a in audits:
        t.add(*[a.get(k) for k in keys])
    return t


def key_value_table(
    d: dict[str, Any], headers: tuple[str, str] = ("Item", "Value"), name: str = ""
) -> Table:
    """Nested dicts flattened to ``a.b`` keys (text: the CSV keeps the values as they are)."""
    t = Table([Column(headers[0], ("item",), str), Column(headers[1], ("value",))], name=name)

    def walk(prefix: str, obj: dict[str, Any]) -> None:
        for k, v in obj.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                walk(f"{key}.", v)
            else:
                t.add(key, v)

    walk("", d)
    return t


def data_table(sites: list[dict[str, Any]]) -> Table:
    """Slices and patients per site and split."""
    counts = {
        "n_train": "Train slices",
        "n_val": "Val slices",
        "n_test": "Test slices",
        "patients_train": "Train patients",
        "patients_test": "Test patients",
    }
    t = Table(
        [Column("Site", ("site",), str), *(Column(h, (k,)) for k, h in counts.items())],
        name="data",
    )
    for s in sites:
        t.add(s.get("name"), *[s.get(k) for k in counts])
    return t
