"""``report.md`` and a self-contained ``report.html`` from a study's ``results.json``.

The report is first built as a list of blocks (headings, paragraphs, tables, figures), then
rendered twice, so the Markdown and HTML versions always say the same thing. Every sentence of
the summary is derived from numbers in the study; a section whose data is missing is replaced by
a one-line note instead of failing.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privseg.io import atomic_write_bytes, atomic_write_text
from privseg.report import figures
from privseg.report.tables import (
    MISSING,
    Table,
    attack_table,
    audit_table,
    baseline_for,
    cross_site_table,
    data_table,
    dice_table,
    dp_cost_table,
    epsilon_table,
    fmt,
    fmt_eps,
    fmt_pm,
    fmt_seconds,
    is_num,
    key_value_table,
    run_epsilon,
    run_label,
    sorted_runs,
    time_per_unit,
)

log = logging.getLogger(__name__)

RECONSTRUCTION_MARGIN_DB = 3.0
"""An attack counts as reconstructing when its median PSNR beats the better of the two
baselines (prior-only and a random other slice) by at least this many dB."""

SECTIONS = {
    "summary": "Summary",
    "dice": "Segmentation quality (Dice)",
    "privacy_utility": "Privacy–utility trade-off",
    "learning": "Learning curves",
    "dp_cost": "Training-time cost of DP",
    "epsilon": "Privacy spent per site",
    "attack": "Gradient-inversion attack",
    "audit": "Empirical privacy audit",
    "settings": "Settings used",
    "machine": "Machine and wall time",
}
"""Section headings, in report order (tests and readers can rely on them)."""

SLICE_CAVEAT = (
    "Privacy unit is one slice. Slice-level DP does not bound what leaks about a whole "
    "patient: one patient contributes many correlated slices, each counted as a separate "
    "record, so the guarantee for a patient is much weaker than the ε shown. Use "
    'privacy.unit = "patient" for a patient-level guarantee.'
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- blocks -------------------------------------------------------------------------------
@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Note:
    """A one-line remark (kind "note") or a caveat the reader must not miss (kind "warning")."""

    text: str
    kind: str = "note"


@dataclass
class Image:
    rel_path: str
    data: bytes
    caption: str


@dataclass
class Code:
    text: str
    lang: str = ""


Block = Heading | Para | Note | Image | Code | Table


# ---- judgements used by the summary -------------------------------------------------------
def attack_reconstructs(attack: dict[str, Any]) -> bool | None:
    """True when median PSNR beats the best baseline by the margin; None when unknown."""
    psnr = attack.get("psnr_median")
    baselines = [attack.get(k) for k in ("prior_psnr_median", "chance_psnr_median")]
    baselines = [b for b in baselines if is_num(b)]
    if not is_num(psnr) or not baselines:
        return None
    return psnr - max(baselines) >= RECONSTRUCTION_MARGIN_DB


def _best_baseline(attack: dict[str, Any]) -> float | None:
    vals = [attack.get(k) for k in ("prior_psnr_median", "chance_psnr_median")]
    vals = [v for v in vals if is_num(v)]
    return max(vals) if vals else None


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _eps_phrase(eps: float | None) -> str:
    return f"ε = {fmt_eps(eps)}" if eps is not None else "unknown ε"


def summarise(study: dict[str, Any]) -> str:
    """One paragraph of findings; each statement is conditioned on the numbers it reports."""
    runs = [r for r in study.get("runs") or [] if isinstance(r, dict)]
    parts: list[str] = []
    plain = [r for r in runs if not r.get("dp") and is_num(r.get("dice_mean"))]
    dp_runs = [r for r in sorted_runs(runs) if r.get("dp") and is_num(r.get("dice_mean"))]
    if plain:
        best = max(plain, key=lambda r: r["dice_mean"])
        parts.append(
            f"The best non-private model was {run_label(best)} with a test Dice of "
            f"{fmt_pm(best['dice_mean'], best.get('dice_sd'))} (mean ± sd over patient "
            "volumes)."
        )
        local = next((r for r in plain if r.get("mode") == "local"), None)
        fed = next((r for r in plain if r.get("mode") == "federated"), None)
        if local and fed:
            verb = "above" if fed["dice_mean"] > local["dice_mean"] else "not above"
            parts.append(
                f"Federated training ({fmt(fed['dice_mean'])}) was {verb} sites "
                f"training alone ({fmt(local['dice_mean'])})."
            )
    elif runs:
        parts.append("No non-private run has a test Dice.")
    else:
        parts.append("This study contains no training runs.")
    if dp_runs:
        deltas = {
            s.get("delta") for r in dp_runs for s in r.get("sites") or [] if is_num(s.get("delta"))
        }
        delta = f"; δ = {fmt(deltas.pop(), '.0e')}" if len(deltas) == 1 else ""
        parts.append(
            "With DP-SGD, test Dice was "
            + _join([f"{fmt(r['dice_mean'])} at {_eps_phrase(run_epsilon(r))}" for r in dp_runs])
            + f" (ε spent by the worst site{delta})."
        )
        cost = []
        for r in dp_runs:
            base = baseline_for(r, runs)
            if base and is_num(base.get("dice_mean")):
                d = (base["dice_mean"] - r["dice_mean"]) * 100
                cost.append(
                    (
                        base,
                        f"{abs(d):.1f} points {'lower' if d >= 0 else 'higher'} at "
                        f"{_eps_phrase(run_epsilon(r))}",
                    )
                )
        if cost:
            base = cost[0][0]
            parts.append(
                f"Against non-private {run_label(base)} training "
                f"({fmt(base['dice_mean'])}), Dice was "
                f"{_join([c[1] for c in cost])}."
            )
        ratios = []
        for r in dp_runs:
            base = baseline_for(r, runs)
            sec, unit = time_per_unit(r)
            base_sec = time_per_unit(base)[0] if base else None
            if is_num(sec) and is_num(base_sec) and base_sec > 0:
                ratios.append((sec / base_sec, unit))
        if ratios:
            lo, hi = min(x[0] for x in ratios), max(x[0] for x in ratios)
            span = f"{lo:.1f}×" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}–{hi:.1f}×"
            parts.append(f"A DP {ratios[0][1]} took {span} as long as a non-private one.")
    elif runs:
        parts.append("No DP run is in this study, so the cost of privacy is not measured.")
    parts.append(_attack_sentence(study.get("attack") or []))
    parts.append(_audit_sentence(study.get("audit") or []))
    return " ".join(p for p in parts if p)


def _attack_sentence(attacks: list[dict[str, Any]]) -> str:
    if not attacks:
        return "No gradient-inversion attack was run."
    plain = [a for a in attacks if not a.get("dp")]
    priv = [a for a in attacks if a.get("dp")]

    def psnr(a: dict[str, Any]) -> str:
        return (
            f"median PSNR {fmt(a.get('psnr_median'), '.1f')} dB vs "
            f"{fmt(_best_baseline(a), '.1f')} dB for the best baseline"
        )

    out = []
    plain_ok = [attack_reconstructs(a) for a in plain]
    if plain:
        a = plain[0]
        if any(plain_ok):
            out.append(
                f"The gradient-inversion attack reconstructed training slices from "
                f"non-private updates ({psnr(a)})."
            )
        elif all(v is False for v in plain_ok):
            out.append(
                f"The gradient-inversion attack did not reconstruct training slices "
                f"beyond the baselines even without DP ({psnr(a)}), so this study cannot "
                "show that DP is what prevents reconstruction."
            )
        else:
            out.append("The attack on non-private updates has no PSNR or baseline to judge it.")
    if priv:
        verdicts = [(a, attack_reconstructs(a)) for a in priv]
        broke = [a for a, v in verdicts if v]
        held = [a for a, v in verdicts if v is False]
        if broke:
            out.append(
                "It also reconstructed slices from DP updates at "
                + _join([_eps_phrase(a.get("epsilon")) for a in broke])
                + f" ({psnr(broke[0])}): DP at this budget did not prevent "
                "reconstruction."
            )
        if held:
            lead = (
                "With DP it failed"
                if any(plain_ok) and not broke
                else "It did not reconstruct slices from DP updates"
            )
            out.append(
                f"{lead} at "
                + _join([_eps_phrase(a.get("epsilon")) for a in held])
                + f" ({psnr(held[0])})."
            )
        if not broke and not held:
            out.append("The attack on DP updates has no PSNR or baseline to judge it.")
    elif plain:
        out.append("No attack on DP updates was run.")
    return " ".join(out)


def _audit_sentence(audits: list[dict[str, Any]]) -> str:
    if not audits:
        return "No empirical privacy audit was run."
    judged = [a for a in audits if a.get("held") is not None]
    failed = [a for a in judged if not a.get("held")]

    def detail(a: dict[str, Any], rel: str) -> str:
        return (
            f"membership success rate {fmt(a.get('success_rate'), '.4g')} {rel} the bound "
            f"{fmt(a.get('bound'), '.4g')} that {_eps_phrase(a.get('epsilon'))} allows"
        )

    if failed:
        return (
            f"The empirical audit FAILED in {len(failed)} of {len(judged)} test(s) "
            f"({detail(failed[0], 'above')}), so the claimed guarantee is in doubt."
        )
    if len(judged) == 1:
        return f"The empirical audit held ({detail(judged[0], 'at or below')})."
    if judged:
        return (
            f"The empirical audit held in all {len(judged)} tests (membership success "
            "rate at or below the bound implied by ε)."
        )
    return "The empirical audit has no verdict."


# ---- sections -----------------------------------------------------------------------------
def _figure(
    blocks: list[Block], written: dict[str, Path], out_dir: Path, name: str, caption: str
) -> None:
    path = out_dir / "figures" / f"{name}.png"
    written[name] = path
    blocks.append(Image(f"figures/{name}.png", path.read_bytes(), caption))


def _missing(text: str) -> Note:
    return Note(f"Not in this study: {text}.")


def _build(study: dict[str, Any], out_dir: Path, written: dict[str, Path]) -> list[Block]:
    runs = sorted_runs([r for r in study.get("runs") or [] if isinstance(r, dict)])
    b: list[Block] = [Heading("privseg study report", 1)]
    data = study.get("data") or {}
    b.append(
        Para(
            f"privseg {study.get('privseg_version', MISSING)} · created "
            f"{study.get('created', MISSING)} · data: {data.get('source', MISSING)}"
        )
    )
    b += [Heading(SECTIONS["summary"]), Para(summarise(study))]

    b.append(Heading(SECTIONS["dice"]))
    if runs:
        t = dice_table(runs)
        t.caption = (
            "Test Dice, mean ± sd over patient volumes; Local only: each site's own model on "
            "its own test split. HD95 is the mean over sites, in voxels of the model grid."
        )
        b.append(t)
        local = next((r for r in runs if r.get("mode") == "local"), None)
        cross = cross_site_table(local) if local else None
        b.append(Heading("Local-only models across sites", 3))
        if cross:
            cross.caption = "Dice of each site's own model on every site's test split."
            b.append(cross)
        else:
            b.append(_missing("no local-only run with cross-site scores"))
    else:
        b.append(_missing("no training runs"))

    b.append(Heading(SECTIONS["privacy_utility"]))
    dp_runs = [r for r in runs if r.get("dp") and run_epsilon(r) is not None]
    if dp_runs:
        points = [
            (run_epsilon(r), r.get("dice_mean"), r.get("dice_sd"), run_label(r)) for r in dp_runs
        ]
        refs = [
            (
                run_label(r) if r.get("mode") != "local" else f"{run_label(r)}, site mean",
                r.get("dice_mean"),
            )
            for r in runs
            if not r.get("dp") and is_num(r.get("dice_mean"))
        ]
        figures.plot_privacy_utility(points, refs, out_dir / "figures" / "privacy_utility.png")
        _figure(
            b,
            written,
            out_dir,
            "privacy_utility",
            "Test Dice (mean ± sd over patients) against ε spent by the worst site (log "
            "scale); horizontal lines: non-private settings.",
        )
    else:
        b.append(_missing("no DP runs"))

    b.append(Heading(SECTIONS["learning"]))
    if any(r.get("history") for r in runs):
        figures.plot_learning_curves(runs, out_dir / "figures" / "learning_curves.png")
        _figure(
            b,
            written,
            out_dir,
            "learning_curves",
            "Validation Dice per epoch (central, local-only: mean over sites) and per "
            "federated round.",
        )
    else:
        b.append(_missing("no training history"))

    b.append(Heading(SECTIONS["dp_cost"]))
    cost = dp_cost_table(runs)
    if cost:
        b.append(cost)
        bars: list[tuple[str, float, bool]] = []
        units: set[str] = set()
        for r in runs:
            if r.get("dp") or any(d.get("dp") and baseline_for(d, runs) is r for d in runs):
                sec, unit = time_per_unit(r)
                units.add(unit)
                bars.append((run_label(r), sec if sec is not None else math.nan, bool(r.get("dp"))))
        figures.plot_dp_cost(
            bars, out_dir / "figures" / "dp_cost.png", unit=" / ".join(sorted(units))
        )
        _figure(b, written, out_dir, "dp_cost", "Seconds per round (federated) or epoch.")
    else:
        b.append(_missing("no DP runs, so no timing comparison"))

    b.append(Heading(SECTIONS["epsilon"]))
    eps = epsilon_table(runs)
    if eps:
        b.append(eps)
        if any(r.get("dp") and r.get("unit") == "slice" for r in runs):
            b.append(Note(SLICE_CAVEAT, "warning"))
    else:
        b.append(_missing("no DP runs"))

    b += _attack_section(study, out_dir, written)

    b.append(Heading(SECTIONS["audit"]))
    audits = [a for a in study.get("audit") or [] if isinstance(a, dict)]
    if audits:
        t = audit_table(audits)
        t.caption = (
            "Held: the observed membership success rate is at or below the rate "
            "that (ε, δ)-DP allows."
        )
        b.append(t)
    else:
        b.append(_missing("no empirical audit"))

    b.append(Heading(SECTIONS["settings"]))
    cfg = study.get("config")
    if isinstance(cfg, dict) and cfg:
        b.append(_config_block(cfg))
    else:
        b.append(_missing("no configuration recorded"))
    if data.get("sites"):
        b.append(Heading("Data", 3))
        b.append(
            Para(
                f"Source: {data.get('source', MISSING)}; resolution "
                f"{data.get('resolution', MISSING)} px; cache: "
                f"{data.get('cache_dir', MISSING)}."
            )
        )
        b.append(data_table(data["sites"]))

    b.append(Heading(SECTIONS["machine"]))
    machine = study.get("machine") or {}
    if machine:
        b.append(key_value_table(machine))
    else:
        b.append(_missing("no machine information"))
    lines = [f"Study wall time: {fmt_seconds(study.get('wall_seconds'))}."]
    timed = [
        f"{run_label(r)} {fmt_seconds(r.get('wall_seconds'))}"
        for r in runs
        if is_num(r.get("wall_seconds"))
    ]
    if timed:
        lines.append("Per setting: " + "; ".join(timed) + ".")
    b.append(Para(" ".join(lines)))
    return b


def _config_block(cfg: dict[str, Any]) -> Block:
    """The resolved config as TOML (paste-able into a config file); a table if it is not TOML."""
    from privseg.config import dumps_toml

    try:
        return Code(dumps_toml(cfg).strip(), "toml")
    except TypeError:
        return key_value_table(cfg, ("Setting", "Value"))


def _attack_section(study: dict[str, Any], out_dir: Path, written: dict[str, Path]) -> list[Block]:
    b: list[Block] = [Heading(SECTIONS["attack"])]
    attacks = [a for a in study.get("attack") or [] if isinstance(a, dict)]
    if not attacks:
        return b + [_missing("no gradient-inversion attack")]
    for i, a in enumerate(attacks, 1):
        grid = a.get("grid_png")
        if not grid:
            continue
        src = Path(grid) if Path(grid).is_absolute() else out_dir / grid
        data = src.read_bytes() if src.is_file() else b""
        if not data.startswith(PNG_SIGNATURE):
            b.append(
                Note(f"Reconstruction grid for {a.get('label', 'attack')} not found at {grid}.")
            )
            continue
        name = f"attack_{i}"
        atomic_write_bytes(out_dir / "figures" / f"{name}.png", data)
        _figure(
            b,
            written,
            out_dir,
            name,
            f"{a.get('label', 'attack')}: originals (top) and reconstructions.",
        )
    t = attack_table(attacks, [attack_reconstructs(a) for a in attacks])
    t.caption = (
        f"Reconstructed: median PSNR at least {RECONSTRUCTION_MARGIN_DB:g} dB above the "
        "better baseline (prior only; a random other slice)."
    )
    b.append(t)
    threat = study.get("threat_model") or attacks[0].get("threat_model") or {}
    b.append(Heading("Threat model", 3))
    if isinstance(threat, dict) and threat:
        b.append(key_value_table(threat, ("Aspect", "Assumption")))
    else:
        b.append(_missing("no threat model recorded"))
    return b


# ---- rendering ----------------------------------------------------------------------------
def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for blk in blocks:
        if isinstance(blk, Heading):
            out.append("#" * blk.level + " " + blk.text)
        elif isinstance(blk, Para):
            out.append(blk.text)
        elif isinstance(blk, Note):
            out.append(("> **Caveat:** " if blk.kind == "warning" else "> ") + blk.text)
        elif isinstance(blk, Image):
            out.append(f"![{blk.caption}]({blk.rel_path})\n\n*{blk.caption}*")
        elif isinstance(blk, Code):
            out.append(f"```{blk.lang}\n{blk.text}\n```")
        else:
            out.append(blk.to_markdown())
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1000px;
  margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
caption { caption-side: bottom; font-style: italic; color: #555; padding-top: .4em;
  text-align: left; }
th, td { border: 1px solid #ddd; padding: .3em .6em; }
th { background: #f2f2f2; }
th, td { text-align: left; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-style: italic; color: #555; font-size: .9em; }
.note { color: #555; font-style: italic; }
.warning { background: #fff4e5; border-left: 4px solid #f0a030; padding: .6em 1em; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: .85em; }
"""


def to_html(blocks: list[Block], title: str = "privseg study report") -> str:
    body: list[str] = []
    for blk in blocks:
        if isinstance(blk, Heading):
            body.append(f"<h{blk.level}>{html.escape(blk.text)}</h{blk.level}>")
        elif isinstance(blk, Para):
            body.append(f"<p>{html.escape(blk.text)}</p>")
        elif isinstance(blk, Note):
            label = "<strong>Caveat:</strong> " if blk.kind == "warning" else ""
            body.append(f'<p class="{blk.kind}">{label}{html.escape(blk.text)}</p>')
        elif isinstance(blk, Image):
            uri = "data:image/png;base64," + base64.b64encode(blk.data).decode("ascii")
            cap = html.escape(blk.caption)
            body.append(
                f'<figure><img src="{uri}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'
            )
        elif isinstance(blk, Code):
            body.append(f"<pre><code>{html.escape(blk.text)}</code></pre>")
        else:
            body.append(blk.to_html())
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_report(study: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out_dir``.

    Returns the written paths: ``"markdown"``, ``"html"`` and one entry per figure stem
    (``"privacy_utility"``, ``"learning_curves"``, ``"dp_cost"``, ``"attack_1"``, ...).
    Attack grid paths in the study are resolved relative to ``out_dir``.
    """
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    blocks = _build(study, out_dir, written)
    atomic_write_text(out_dir / "report.md", to_markdown(blocks))
    atomic_write_text(out_dir / "report.html", to_html(blocks))
    written["markdown"] = out_dir / "report.md"
    written["html"] = out_dir / "report.html"
    log.info("report written to %s", out_dir / "report.html")
    return written
