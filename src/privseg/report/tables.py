"""Tables of a study report, built from ``results.json`` only and rendered as Markdown or HTML.

Every builder takes plain dictionaries (the study schema) and returns a :class:`Table` of
already formatted strings, so Markdown and HTML show exactly the same numbers.
"""

from __future__ import annotations

import csv
import html
import io
import re
from dataclasses import dataclass, field
from typing import Any

from privseg.report.format import (
    MISSING,
    fmt,
    fmt_bool,
    fmt_eps,
    fmt_pm,
    fmt_value,
    is_num,
)
from privseg.report.study_view import (
    baseline_for,
    not_learned_label,
    run_label,
    site_names,
    sorted_runs,
    time_per_unit,
)


@dataclass
class Table:
    """Headers plus rows of display strings; the first column is a row label."""

    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""
    name: str = ""  # the CSV's stem next to the report (tables/<name>.csv)

    def numeric_columns(self) -> list[bool]:
        """Columns whose every shown cell starts like a number: right-aligned, others left."""

        def numeric(cell: str) -> bool:
            return cell == MISSING or bool(_NUMBER.match(cell))

        return [
            i > 0 and all(numeric(r[i]) for r in self.rows if i < len(r))
            for i in range(len(self.headers))
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
        """Headers and rows as CSV: the cells the report shows (MISSING stays an en dash)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.headers)
        writer.writerows(self.rows)
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


# ---- table builders -----------------------------------------------------------------------
def distance_units(runs: list[dict[str, Any]]) -> str:
    """The runs' common HD95 units; results without the key were scored on the model grid."""
    found = {str(r.get("hd95_units") or "model-grid voxels") for r in runs}
    return found.pop() if len(found) == 1 else "mixed units"


def dice_table(runs: list[dict[str, Any]]) -> Table:
    """Dice mean ± sd over test patient volumes per site and overall, one row per setting."""
    names = site_names(runs)
    t = Table(["Setting", *names, "Overall", f"HD95 ({distance_units(runs)})"], name="dice")
    for r in sorted_runs(runs):
        by_site = {s.get("name"): s for s in r.get("sites") or []}
        cells = [
            fmt_pm(by_site[n].get("dice"), by_site[n].get("dice_sd")) if n in by_site else MISSING
            for n in names
        ]
        hd = [s.get("hd95") for s in by_site.values() if is_num(s.get("hd95"))]
        t.rows.append(
            [
                not_learned_label(r),
                *cells,
                fmt_pm(r.get("dice_mean"), r.get("dice_sd")),
                fmt(sum(hd) / len(hd), ".1f") if hd else MISSING,
            ]
        )
    return t


def class_table(runs: list[dict[str, Any]]) -> Table | None:
    """Per class (``data.classes``): Dice over test patient volumes and HD95 (mean over sites),
    one row per setting; None with one class (the Dice table says it all)."""
    names = list(dict.fromkeys(n for r in runs for n in r.get("classes") or {}))
    if len(names) < 2:
        return None
    units = distance_units(runs)
    t = Table(
        ["Setting", *(f"{n} Dice" for n in names), *(f"{n} HD95 ({units})" for n in names)],
        name="classes",
    )
    for r in sorted_runs(runs):
        per_class = r.get("classes") or {}
        dice = [
            fmt_pm(*(per_class.get(n, {}).get(k) for k in ("dice_mean", "dice_sd"))) for n in names
        ]
        hd95 = []
        for n in names:
            v = [(s.get("classes") or {}).get(n, {}).get("hd95") for s in r.get("sites") or []]
            v = [x for x in v if is_num(x)]
            hd95.append(fmt(sum(v) / len(v), ".1f") if v else MISSING)
        t.rows.append([not_learned_label(r), *dice, *hd95])
    return t


def compute_table(runs: list[dict[str, Any]]) -> Table | None:
    """The compute each setting got, per site (``compute`` of each run's results)."""
    rows = [r for r in sorted_runs(runs) if isinstance(r.get("compute"), dict)]
    if not rows:
        return None
    t = Table(
        ["Setting", "Sequential steps", "Slices per step per site", "Slice gradients per site"],
        name="compute",
    )
    for r in rows:
        c = r["compute"]
        per_step = c.get("batch_size")
        if r.get("mode") == "central" and per_step and len(r.get("sites") or []):
            per_step = per_step / len(r["sites"])  # one pooled batch shared by the sites
        t.rows.append(
            [
                run_label(r),
                fmt_value(c.get("sequential_steps")),
                fmt(per_step, ".3g"),
                fmt(c.get("slices_per_site"), ".0f"),
            ]
        )
    return t


def cross_site_table(run: dict[str, Any]) -> Table | None:
    """Local-only models scored on every site's test split (rows: trained at; cols: tested at)."""
    sites = run.get("sites") or []
    if not any(s.get("cross") for s in sites):
        return None
    names = [s.get("name") for s in sites]
    t = Table(["Trained at \\ tested at", *names], name="cross_site")
    for s in sites:
        cross = s.get("cross") or {}
        t.rows.append(
            [
                str(s.get("name")),
                *[fmt(s.get("dice")) if n == s.get("name") else fmt(cross.get(n)) for n in names],
            ]
        )
    return t


def dp_cost_table(runs: list[dict[str, Any]]) -> Table | None:
    """Seconds per round (or epoch) of each DP run next to its non-private twin and the ratio."""
    t = Table(
        ["Setting", "Per", "Seconds (DP)", "Seconds (non-private)", "Ratio DP / non-DP"],
        name="dp_cost",
    )
    for r in sorted_runs(runs):
        if not r.get("dp"):
            continue
        sec, unit = time_per_unit(r)
        base = baseline_for(r, runs)
        base_sec = time_per_unit(base)[0] if base else None
        ratio = sec / base_sec if is_num(sec) and is_num(base_sec) and base_sec > 0 else None
        t.rows.append(
            [
                run_label(r),
                unit,
                fmt(sec, ".2f"),
                fmt(base_sec, ".2f"),
                f"{ratio:.2f}×" if ratio is not None else MISSING,
            ]
        )
    return t if t.rows else None


def epsilon_table(runs: list[dict[str, Any]]) -> Table | None:
    """Per-site privacy spent in each DP setting, with every parameter that determines it."""
    t = Table(
        [
            "Setting",
            "Site",
            "ε this run",
            "ε patients' total",
            "Target ε",
            "δ",
            "σ (noise)",
            "q (sample rate)",
            "Steps",
            "Clip C",
            "Accountant",
            "Unit",
        ],
        name="epsilon",
    )
    for r in sorted_runs(runs):
        if not r.get("dp"):
            continue
        for s in r.get("sites") or []:
            t.rows.append(
                [
                    run_label(r),
                    str(s.get("name")),
                    fmt_eps(s.get("epsilon_run")),
                    fmt_eps(s.get("epsilon")),
                    fmt_eps(r.get("target_epsilon")),
                    fmt(s.get("delta"), ".1e"),
                    fmt(s.get("noise_multiplier"), ".3g"),
                    fmt(s.get("sample_rate"), ".3g"),
                    fmt(s.get("steps"), ".0f"),
                    fmt(s.get("clip_norm"), ".3g"),
                    fmt_value(s.get("accountant")),
                    fmt_value(r.get("unit")),
                ]
            )
    return t if t.rows else None


def attack_label(attack: dict[str, Any]) -> str:
    """An attack's label; without one, what it attacked (no DP, or DP-SGD at its epsilon)."""
    if attack.get("label"):
        return str(attack["label"])
    return f"DP-SGD ε={fmt_eps(attack.get('epsilon'))}" if attack.get("dp") else "No DP"


def attack_table(attacks: list[dict[str, Any]], verdicts: list[bool | None]) -> Table:
    """Attack metrics next to the two baselines that say whether a reconstruction means much."""
    t = Table(
        [
            "Attack",
            "Threat",
            "DP",
            "ε",
            "Batch",
            "Mask",
            "PSNR median (dB)",
            "SSIM median",
            "Re-identified",
            "Prior PSNR (dB)",
            "Chance PSNR (dB)",
            "Reconstructed?",
        ],
        name="attack",
    )
    for a, ok in zip(attacks, verdicts, strict=True):
        rate = a.get("reidentification_rate")
        t.rows.append(
            [
                attack_label(a),
                fmt_value(a.get("threat")),
                fmt_bool(a.get("dp")),
                fmt_eps(a.get("epsilon")),
                fmt_value(a.get("batch_size")),
                fmt_value(a.get("mask_mode")),
                fmt(a.get("psnr_median"), ".1f"),
                fmt(a.get("ssim_median"), ".3f"),
                f"{rate:.0%}" if is_num(rate) else MISSING,
                fmt(a.get("prior_psnr_median"), ".1f"),
                fmt(a.get("chance_psnr_median"), ".1f"),
                fmt_bool(ok),
            ]
        )
    return t


def audit_table(audits: list[dict[str, Any]]) -> Table:
    """Empirical membership audit: observed success rate against the rate that ε allows."""
    t = Table(
        ["ε", "δ", "Trials", "Candidates", "Success rate", "Bound from ε", "Held"], name="audit"
    )
    for a in audits:
        t.rows.append(
            [
                fmt_eps(a.get("epsilon")),
                fmt(a.get("delta"), ".1e"),
                fmt_value(a.get("trials")),
                fmt_value(a.get("candidates")),
                fmt(a.get("success_rate"), ".4g"),
                fmt(a.get("bound"), ".4g"),
                fmt_bool(a.get("held"), "yes", "NO"),
            ]
        )
    return t


def key_value_table(
    d: dict[str, Any], headers: tuple[str, str] = ("Item", "Value"), name: str = ""
) -> Table:
    """Nested dicts flattened to ``a.b`` keys."""
    t = Table(list(headers), name=name)

    def walk(prefix: str, obj: dict[str, Any]) -> None:
        for k, v in obj.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                walk(f"{name}.", v)
            else:
                t.rows.append([name, fmt_value(v)])

    walk("", d)
    return t


def data_table(sites: list[dict[str, Any]]) -> Table:
    """Slices and patients per site and split."""
    t = Table(
        ["Site", "Train slices", "Val slices", "Test slices", "Train patients", "Test patients"],
        name="data",
    )
    for s in sites:
        t.rows.append(
            [
                str(s.get("name")),
                *[
                    fmt_value(s.get(k))
                    for k in ("n_train", "n_val", "n_test", "patients_train", "patients_test")
                ],
            ]
        )
    return t
