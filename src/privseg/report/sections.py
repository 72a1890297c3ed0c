"""The report's sections, one builder each, in the order of :data:`SECTIONS`.

Every builder returns its blocks, starting with its heading; a section whose data is missing
is replaced by a one-line note instead of failing. Builders that draw a figure write the PNG
under ``figures/`` and record it in a :class:`FigureSink`, because ``write_report`` returns
the paths it wrote.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from privseg.core.io import atomic_write_bytes
from privseg.core.results import LOCAL, NATIVE_UNITS, SLICE_UNIT_NOTE
from privseg.report import figures
from privseg.report.blocks import Block, Code, Heading, Image, Note, Para
from privseg.report.format import MISSING, fmt_seconds, is_num
from privseg.report.study_view import (
    DID_NOT_LEARN_DICE,
    baseline_for,
    learned,
    run_epsilon,
    run_label,
    sorted_runs,
    time_per_unit,
)
from privseg.report.summary import (
    RECONSTRUCTION_MARGIN_DB,
    attack_reconstructs,
    is_quick,
    smoke_test_note,
    summarise,
)
from privseg.report.tables import (
    attack_label,
    attack_table,
    audit_table,
    class_table,
    compute_table,
    cross_site_table,
    data_table,
    dice_table,
    distance_units,
    dp_cost_table,
    epsilon_table,
    key_value_table,
)

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

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

Runs = list[dict[str, Any]]


class FigureSink:
    """Where figures go (``out_dir/figures``), and the ones written so far, by stem."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.written: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        return self.out_dir / "figures" / f"{name}.png"

    def image(self, name: str, caption: str) -> Image:
        """The written figure ``name`` as a block (its bytes are embedded in the HTML)."""
        path = self.path(name)
        self.written[name] = path
        return Image(f"figures/{name}.png", path.read_bytes(), caption)


def _missing(text: str) -> Note:
    return Note(f"Not in this study: {text}.")


def build_blocks(study: dict[str, Any], out_dir: Path) -> tuple[list[Block], dict[str, Path]]:
    """The whole report as blocks, and the figures written for it (stem -> path, in order)."""
    runs = sorted_runs([r for r in study.get("runs") or [] if isinstance(r, dict)])
    sink = FigureSink(out_dir)
    blocks = [
        *_title(study),
        *_summary(study),
        *_dice(runs, study.get("compute_rule")),
        *_privacy_utility(runs, sink),
        *_learning(runs, sink),
        *_dp_cost(runs, sink),
        *_epsilon(runs),
        *_attack(study, sink),
        *_audit(study),
        *_settings(study),
        *_machine(study, runs),
    ]
    return blocks, sink.written


def _title(study: dict[str, Any]) -> list[Block]:
    """The title line; a smoke test (``privseg run --quick``) says so before anything else."""
    data = study.get("data") or {}
    title = "privseg smoke test (not a study)" if is_quick(study) else "privseg study report"
    b: list[Block] = [Heading(title, 1)]
    if is_quick(study):
        b.append(Note(smoke_test_note(study), "warning"))
    b.append(
        Para(
            f"privseg {study.get('privseg_version', MISSING)} · created "
            f"{study.get('created', MISSING)} · data: {data.get('source', MISSING)}"
        )
    )
    return b


def _summary(study: dict[str, Any]) -> list[Block]:
    return [Heading(SECTIONS["summary"]), Para(summarise(study))]


def _dice(runs: Runs, compute_rule: str | None) -> list[Block]:
    """Test Dice per setting, the compute each got, then local-only models on every site."""
    b: list[Block] = [Heading(SECTIONS["dice"])]
    if not runs:
        return b + [_missing("no training runs")]
    t = dice_table(runs)
    units = distance_units(runs)
    grid = "each case's original grid" if units == NATIVE_UNITS else "the model grid"
    t.caption = (
        f"Test Dice, mean ± sd over patient volumes, on {grid}; Local only: each site's own "
        f"model on its own test split. HD95 is the mean over sites, in {units}."
    )
    b.append(t)
    classes = class_table(runs)
    if classes:
        classes.caption = (
            "Per class (data.classes; classes may overlap): test Dice, mean ± sd over patient "
            f"volumes; HD95 the mean over sites, in {units}. A patient with a class in neither "
            "label nor prediction scores Dice 1 for it."
        )
        b.append(classes)
    compute = compute_table(runs)
    if compute:
        compute.caption = "Compute per site. " + (compute_rule or "")
        b.append(compute)
    local = next((r for r in runs if r.get("mode") == LOCAL), None)
    cross = cross_site_table(local) if local else None
    b.append(Heading("Local-only models across sites", 3))
    if cross:
        cross.caption = "Dice of each site's own model on every site's test split."
        b.append(cross)
    else:
        b.append(_missing("no local-only run with cross-site scores"))
    return b


def _privacy_utility(runs: Runs, sink: FigureSink) -> list[Block]:
    b: list[Block] = [Heading(SECTIONS["privacy_utility"])]
    failed = [run_label(r) for r in runs if learned(r) is False]
    runs = [r for r in runs if learned(r) is not False]  # a setting that did not learn: no point
    dp_runs = [r for r in runs if r.get("dp") and run_epsilon(r) is not None]
    if not dp_runs:
        return b + [_missing("no DP run that learned"), *_not_compared(failed)]
    points = [(run_epsilon(r), r.get("dice_mean"), r.get("dice_sd"), run_label(r)) for r in dp_runs]
    refs = [
        (
            run_label(r) if r.get("mode") != LOCAL else f"{run_label(r)}, site mean",
            r.get("dice_mean"),
        )
        for r in runs
        if not r.get("dp") and is_num(r.get("dice_mean"))
    ]
    figures.plot_privacy_utility(points, refs, sink.path("privacy_utility"))
    b.append(
        sink.image(
            "privacy_utility",
            "Test Dice (mean ± sd over patients) against ε spent by the worst site (log "
            "scale); horizontal lines: non-private settings.",
        )
    )
    return b + _not_compared(failed)


def _not_compared(labels: list[str]) -> list[Block]:
    if not labels:
        return []
    return [
        Note(
            f"Not compared: {', '.join(labels)} did not learn (mean test Dice below "
            f"{DID_NOT_LEARN_DICE:g})."
        )
    ]


def _learning(runs: Runs, sink: FigureSink) -> list[Block]:
    b: list[Block] = [Heading(SECTIONS["learning"])]
    if not any(r.get("history") for r in runs):
        return b + [_missing("no training history")]
    figures.plot_learning_curves(runs, sink.path("learning_curves"))
    b.append(
        sink.image(
            "learning_curves",
            "Validation Dice per epoch (central, local-only: mean over sites) and per "
            "federated round.",
        )
    )
    return b


def _dp_cost(runs: Runs, sink: FigureSink) -> list[Block]:
    """Time per round/epoch of each DP run and of the non-private run it is compared with."""
    b: list[Block] = [Heading(SECTIONS["dp_cost"])]
    cost = dp_cost_table(runs)
    if not cost:
        return b + [_missing("no DP runs, so no timing comparison")]
    b.append(cost)
    bars: list[tuple[str, float, bool]] = []
    units: set[str] = set()
    for r in runs:
        if r.get("dp") or any(d.get("dp") and baseline_for(d, runs) is r for d in runs):
            sec, unit = time_per_unit(r)
            units.add(unit)
            bars.append((run_label(r), sec if sec is not None else math.nan, bool(r.get("dp"))))
    figures.plot_dp_cost(bars, sink.path("dp_cost"), unit=" / ".join(sorted(units)))
    b.append(sink.image("dp_cost", "Seconds per round (federated) or epoch."))
    return b


def _epsilon(runs: Runs) -> list[Block]:
    b: list[Block] = [Heading(SECTIONS["epsilon"])]
    eps = epsilon_table(runs)
    if not eps:
        return b + [_missing("no DP runs")]
    b.append(eps)
    if any(r.get("dp") and r.get("unit") == "slice" for r in runs):
        b.append(Note(SLICE_UNIT_NOTE, "warning"))
    return b


def _attack(study: dict[str, Any], sink: FigureSink) -> list[Block]:
    """Reconstruction grids (copied into ``figures/``), the results table, the threat model."""
    b: list[Block] = [Heading(SECTIONS["attack"])]
    attacks = [a for a in study.get("attack") or [] if isinstance(a, dict)]
    if not attacks:
        return b + [_missing("no gradient-inversion attack")]
    for i, a in enumerate(attacks, 1):
        grid = a.get("grid_png")
        if not grid:
            continue
        src = Path(grid) if Path(grid).is_absolute() else sink.out_dir / grid
        data = src.read_bytes() if src.is_file() else b""
        if not data.startswith(PNG_SIGNATURE):
            b.append(Note(f"Reconstruction grid for {attack_label(a)} not found at {grid}."))
            continue
        name = f"attack_{i}"
        atomic_write_bytes(sink.path(name), data)
        b.append(sink.image(name, f"{attack_label(a)}: originals (top) and reconstructions."))
    t = attack_table(attacks, [attack_reconstructs(a) for a in attacks])
    t.caption = (
        f"Reconstructed: median PSNR at least {RECONSTRUCTION_MARGIN_DB:g} dB above the "
        "better baseline (prior only; a random other slice)."
    )
    b.append(t)
    threat = study.get("threat_model") or attacks[0].get("threat_model") or {}
    b.append(Heading("Threat model", 3))
    if isinstance(threat, dict) and threat:
        b.append(key_value_table(threat, ("Aspect", "Assumption"), name="threat_model"))
    else:
        b.append(_missing("no threat model recorded"))
    return b


def _audit(study: dict[str, Any]) -> list[Block]:
    b: list[Block] = [Heading(SECTIONS["audit"])]
    audits = [a for a in study.get("audit") or [] if isinstance(a, dict)]
    if not audits:
        return b + [_missing("no empirical audit")]
    t = audit_table(audits)
    t.caption = (
        "Held: the observed membership success rate is at or below the rate that (ε, δ)-DP allows."
    )
    return b + [t]


def _settings(study: dict[str, Any]) -> list[Block]:
    """The resolved config, then the data each site had."""
    b: list[Block] = [Heading(SECTIONS["settings"])]
    cfg = study.get("config")
    if isinstance(cfg, dict) and cfg:
        b.append(_config_block(cfg))
    else:
        b.append(_missing("no configuration recorded"))
    data = study.get("data") or {}
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
    return b


def _config_block(cfg: dict[str, Any]) -> Block:
    """The resolved config as TOML (paste-able into a config file); a table if it is not TOML."""
    from privseg.config import dumps_toml

    try:
        return Code(dumps_toml(cfg).strip(), "toml")
    except TypeError:
        return key_value_table(cfg, ("Setting", "Value"), name="config")


def _machine(study: dict[str, Any], runs: Runs) -> list[Block]:
    b: list[Block] = [Heading(SECTIONS["machine"])]
    machine = study.get("machine") or {}
    if machine:
        b.append(key_value_table(machine, name="machine"))
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
