"""The study report: every file written, self-contained HTML, claims that follow the numbers."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from privseg.core.results import SLICE_UNIT_NOTE
from privseg.report import figures
from privseg.report.format import MISSING, fmt_pm
from privseg.report.render import write_report
from privseg.report.sections import SECTIONS
from privseg.report.study_view import (
    DID_NOT_LEARN_DICE,
)
from privseg.report.summary import attack_reconstructs, summarise

PNG = b"\x89PNG\r\n\x1a\n"
SITES = ["site-a", "site-b", "site-c"]


def _site(
    name: str,
    dice: float,
    *,
    dp: bool,
    eps: float | None = None,
    cross: dict[str, float] | None = None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "n_train": 300 + 10 * SITES.index(name),
        "dice": dice,
        "dice_sd": 0.041,
        "hd95": 4.5 + SITES.index(name),
        "patients": [
            {"id": f"{name}-{i}", "dice": dice + 0.01 * (i - 1), "hd95": 4.0} for i in range(3)
        ],
        "epsilon": eps * 0.97 if dp and eps else None,
        "delta": 1e-5 if dp else None,
        "noise_multiplier": 1.7 / eps if dp and eps else None,
        "sample_rate": 0.0267 if dp else None,
        "steps": 120 if dp else None,
        "max_grad_norm": 1.0 if dp else None,
        "accountant": "prv" if dp else None,
    }
    if cross is not None:
        entry["cross"] = cross
    return entry


def _history(key: str, n: int, top: float, *, dp: bool) -> list[dict[str, Any]]:
    return [
        {
            key: i + 1,
            "train_loss": 1.0 / (i + 1),
            "val_dice": top * (i + 1) / n,
            "val_dice_sites": {s: top * (i + 1) / n - 0.01 * j for j, s in enumerate(SITES)},
            "epsilon_max": (i + 1) / n if dp else None,
            "seconds": 2.0,
        }
        for i in range(n)
    ]


def _run(
    setting: str,
    label: str,
    mode: str,
    dice: list[float],
    *,
    dp: bool = False,
    eps: float | None = None,
    sec: float = 1.25,
    cross: bool = False,
) -> dict[str, Any]:
    sites = [
        _site(s, d, dp=dp, eps=eps, cross={o: d - 0.2 for o in SITES if o != s} if cross else None)
        for s, d in zip(SITES, dice, strict=True)
    ]
    fed = mode == "federated"
    return {
        "setting": setting,
        "label": label,
        "mode": mode,
        "dp": dp,
        "unit": "slice" if dp else None,
        "target_epsilon": eps,
        "sites": sites,
        "dice_mean": sum(dice) / len(dice),
        "dice_sd": 0.052,
        "hd95_units": "mm",
        "assd_units": "mm",
        "epsilon_max": eps * 0.97 if dp and eps else None,
        "history": _history("round" if fed else "epoch", 4, max(dice), dp=dp),
        "seconds_per_round": sec if fed else None,
        "seconds_per_epoch": None if fed else sec,
        "wall_seconds": sec * 10,
    }


@pytest.fixture(scope="module")
def grid_png(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real PNG standing in for an attack's reconstruction grid (drawn once per module)."""
    path = tmp_path_factory.mktemp("grid") / "grid.png"
    return figures.plot_learning_curve([], path, "grid stand-in").read_bytes()


@pytest.fixture
def study(tmp_path: Path, grid_png: bytes) -> dict[str, Any]:
    runs = [
        _run("central", "Centralised", "central", [0.912, 0.898, 0.905], sec=3.5),
        _run("local", "Local only", "local", [0.801, 0.774, 0.792], sec=1.1, cross=True),
        _run("federated", "Federated", "federated", [0.874, 0.861, 0.869], sec=1.25),
    ]
    for eps, base in ((1.0, 0.61), (3.0, 0.72), (8.0, 0.80)):
        runs.append(
            _run(
                "federated_dp",
                f"Federated DP (ε={eps:g})",
                "federated",
                [base, base - 0.013, base + 0.007],
                dp=True,
                eps=eps,
                sec=4.75,
            )
        )
    tm = {
        "attacker": "honest-but-curious server",
        "sees": "one site's update",
        "knows": {"labels": True, "architecture": True},
    }
    attack = [
        {
            "label": "No DP",
            "threat": "T1",
            "dp": False,
            "epsilon": None,
            "batch_size": 1,
            "psnr_median": 27.4,
            "ssim_median": 0.812,
            "reidentification_rate": 0.9,
            "prior_psnr_median": 13.2,
            "chance_psnr_median": 11.8,
            "mask_mode": "given",
            "threat_model": tm,
            "grid_png": "attack/grid_nodp.png",
        },
        {
            "label": "DP ε=8",
            "threat": "T1",
            "dp": True,
            "epsilon": 8.0,
            "batch_size": 1,
            "psnr_median": 12.9,
            "ssim_median": 0.104,
            "reidentification_rate": 0.1,
            "prior_psnr_median": 13.2,
            "chance_psnr_median": 11.8,
            "mask_mode": "given",
            "threat_model": tm,
            "grid_png": str(tmp_path / "grid_dp.png"),
        },
    ]
    (tmp_path / "study" / "attack").mkdir(parents=True)
    (tmp_path / "study" / "attack" / "grid_nodp.png").write_bytes(grid_png)  # relative path
    (tmp_path / "grid_dp.png").write_bytes(grid_png)  # absolute path
    return {
        "privseg_version": "0.1.0",
        "created": "2026-11-27T02:00:00+00:00",
        "machine": {
            "device": "cuda:0 (NVIDIA H200)",
            "cpu": "x86_64",
            "cores": 2,
            "torch_threads": 2,
            "python": "3.11.2",
            "torch": "2.13.0",
            "opacus": "1.6.0",
            "flwr": "1.42.0",
        },
        "data": {
            "source": "phantom",
            "cache_dir": "/tmp/cache",
            "resolution": 64,
            "sites": [
                {
                    "name": s,
                    "n_train": 300,
                    "n_val": 60,
                    "n_test": 70,
                    "patients_train": 6,
                    "patients_test": 2,
                }
                for s in SITES
            ],
        },
        "config": {
            "seed": 0,
            "data": {"resolution": 64, "hu_window": [-150.0, 200.0]},
            "privacy": {"enabled": False, "delta": 1e-5, "accountant": "prv"},
            "study": {"epsilons": [1.0, 3.0, 8.0]},
        },
        "wall_seconds": 3725.0,
        "runs": runs,
        "attack": attack,
        "audit": [
            {
                "trials": 200,
                "success_rate": 0.58,
                "bound": 0.9997,
                "held": True,
                "epsilon": 8.0,
                "delta": 1e-5,
                "candidates": 2,
            }
        ],
        "threat_model": tm,
    }


def test_full_report_writes_every_file_with_sections_and_numbers(study, tmp_path):
    out = tmp_path / "study"
    paths = write_report(study, out)
    for name in ("privacy_utility", "learning_curves", "dp_cost", "attack_1", "attack_2"):
        png = paths[name].read_bytes()
        assert paths[name].parent == out / "figures"
        assert png.startswith(PNG) and len(png) > 5_000, name
    md = (out / "report.md").read_text()
    for title in SECTIONS.values():
        assert f"## {title}" in md
    headings = [md.index(f"## {t}") for t in SECTIONS.values()]
    assert headings == sorted(headings), "sections out of order"
    central = study["runs"][0]
    assert fmt_pm(central["sites"][0]["dice"], central["sites"][0]["dice_sd"]) in md
    assert fmt_pm(central["dice_mean"], central["dice_sd"]) in md
    assert "0.601" in md  # local site-a model on site-b (cross-site matrix)
    assert "3.80×" in md  # 4.75 s / 1.25 s per round
    assert "27.4" in md and "13.2" in md  # attack PSNR and its prior baseline
    assert "0.58" in md and "0.9997" in md  # audit success rate and bound
    assert SLICE_UNIT_NOTE in md
    assert "honest-but-curious server" in md
    assert "resolution = 64" in md  # the config as TOML
    assert "1 h 02 min" in md  # wall time
    assert "| device | cuda:0 (NVIDIA H200) |" in md  # where the study computed
    assert "figures/privacy_utility.png" in md
    assert "| HD95 (mm) |" in md and "original grid" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5
    assert 'src="http' not in html and "<link" not in html and "<script" not in html
    assert SECTIONS["attack"] in html


def test_summary_follows_the_numbers(study):
    text = summarise(study)
    assert "Centralised" in text and "0.905 ± 0.052" in text
    assert "0.608 at ε = 0.97" in text  # DP Dice at the spent epsilon
    assert "26.0 points lower at ε = 0.97" in text  # 0.868 - 0.608, non-private federated
    assert "3.8×" in text
    assert "reconstructed training slices from non-private updates" in text
    assert "With DP it failed" in text
    assert "audit held" in text


def test_summary_does_not_claim_dp_helps_when_attack_still_works(study):
    broken = copy.deepcopy(study)
    broken["attack"][1]["psnr_median"] = 26.0
    broken["audit"][0].update(held=False, success_rate=0.999, bound=0.95)
    text = summarise(broken)
    assert "did not prevent reconstruction" in text
    assert "failed at" not in text and "With DP it failed" not in text
    assert "FAILED" in text


def test_summary_when_attack_fails_even_without_dp(study):
    weak = copy.deepcopy(study)
    weak["attack"][0]["psnr_median"] = 14.0
    text = summarise(weak)
    assert "did not reconstruct training slices beyond the baselines even without DP" in text
    assert "With DP it failed" not in text


def test_central_only_study_gets_notes_not_crashes(study, tmp_path):
    only = {k: v for k, v in study.items() if k not in ("attack", "audit", "threat_model")}
    only["runs"] = [study["runs"][0]]
    only["runs"][0]["sites"][1]["dice"] = math.nan
    only["runs"][0]["sites"][1]["dice_sd"] = None
    paths = write_report(only, tmp_path / "central")
    assert {k for k in paths if not k.startswith("table_")} == {
        "learning_curves",
        "markdown",
        "html",
    }
    md = paths["markdown"].read_text()
    for title in SECTIONS.values():
        assert f"## {title}" in md
    assert md.count("Not in this study") >= 5
    assert f"| {MISSING} |" in md
    assert "No DP run" in md and "No gradient-inversion attack" in md
    assert "nan" not in md.lower().replace("nanmean", "")


def test_empty_study_still_renders(tmp_path):
    paths = write_report({}, tmp_path)
    assert "This study contains no training runs." in paths["markdown"].read_text()
    assert paths["html"].read_text().startswith("<!DOCTYPE html>")


def test_missing_attack_grid_is_a_note(study, tmp_path):
    study["attack"][0]["grid_png"] = "nowhere/grid.png"
    study["runs"] = []
    paths = write_report(study, tmp_path / "study")
    assert "attack_2" in paths
    assert "not found at nowhere/grid.png" in paths["markdown"].read_text()


def test_plot_learning_curve_for_a_single_run(tmp_path):
    hist = _history("epoch", 5, 0.9, dp=False)
    hist[2]["val_dice"] = None
    path = figures.plot_learning_curve(hist, tmp_path / "run" / "learning_curve.png", "central")
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 5_000
    assert not list(path.parent.glob(".*.tmp"))


def test_attack_verdict_needs_a_margin_over_the_best_baseline():
    base = {"prior_psnr_median": 13.0, "chance_psnr_median": 15.0}
    assert attack_reconstructs({**base, "psnr_median": 18.5}) is True
    assert attack_reconstructs({**base, "psnr_median": 17.0}) is False  # < 3 dB over 15.0
    assert attack_reconstructs({"psnr_median": 30.0}) is None  # no baseline: no verdict


def test_reconstruction_grid_shows_at_most_eight_pairs():
    rng = np.random.default_rng(0)
    pairs = [(rng.random((16, 16)), rng.random((16, 16))) for _ in range(10)]
    result = {
        "threat": "T1",
        "batch_size": 1,
        "mask_mode": "given",
        "dp": True,
        "epsilon": 8.0,
        "psnr_median": 12.3,
        "chance_psnr_median": 11.0,
        "prior_psnr_median": 13.0,
        "targets": [{"psnr": 10.0 + i, "ssim": 0.1 * i} for i in range(3)],  # fewer than pairs
    }
    png = figures.reconstruction_grid_png(pairs, result)
    assert png.startswith(PNG) and len(png) > 5_000
    assert figures.reconstruction_grid_png(pairs[:8], result) == png
    one = figures.reconstruction_grid_png(pairs[:1], {**result, "dp": False, "targets": []})
    assert one.startswith(PNG)


# ---- the report tells the truth about itself ---------------------------------------------
def test_attack_grid_written_by_the_runner_is_embedded(study, tmp_path):
    """The runner's result names its PNG relative to the study folder; the report embeds it."""
    import base64

    import torch

    from conftest import TinySeg, phantom
    from privseg.attack.runner import attack_setting
    from privseg.config import Config
    from privseg.core.io import read_json

    root = tmp_path / "real"
    torch.manual_seed(0)
    x, y = phantom(24)
    split = type(
        "Split", (), {"images": x[:, 0].numpy(), "labels": y[:, 0].numpy(), "patient": None}
    )
    cfg = Config().replace(
        **{
            "data.resolution": 32,
            "attack.iterations": 10,
            "attack.restarts": 1,
            "attack.targets": 2,
        }
    )
    result = attack_setting(TinySeg(), split, cfg, None, out_dir=root / "attack", relative_to=root)
    assert result["grid_png"] == "attack/no_dp/attack.png"
    assert read_json(root / "attack" / "no_dp" / "attack.json")["grid_png"] == result["grid_png"]
    png = (root / result["grid_png"]).read_bytes()
    assert png.startswith(PNG)
    paths = write_report({**study, "attack": [result], "runs": []}, root)
    assert paths["attack_1"].read_bytes() == png  # copied next to the report
    assert base64.b64encode(png).decode() in paths["html"].read_text()
    assert "No DP: originals (top)" in paths["markdown"].read_text()
    assert "figures/attack_1.png" in paths["markdown"].read_text()


def test_quick_study_is_a_smoke_test_that_compares_nothing(study, tmp_path):
    quick = {**copy.deepcopy(study), "preset": "quick", "quick": True}
    text = summarise(quick)
    assert text.startswith("Smoke test")
    for claim in ("best non-private", "points lower", "was above", "With DP it failed", "held"):
        assert claim not in text, claim
    paths = write_report(quick, tmp_path / "quick")
    md = paths["markdown"].read_text()
    assert md.startswith("# privseg smoke test (not a study)")
    assert md.index('Smoke test: this is "privseg run --quick"') < md.index("## Summary")


def test_a_setting_that_did_not_learn_is_named_and_never_compared(study, tmp_path):
    failed = copy.deepcopy(study)
    local = next(r for r in failed["runs"] if r["setting"] == "local")
    local["dice_mean"] = DID_NOT_LEARN_DICE / 2
    dp8 = failed["runs"][-1]
    dp8["dice_mean"] = 0.02
    text = summarise(failed)
    assert "Did not learn" in text and "Local only 0.050" in text and "0.020" in text
    assert "sites training alone" not in text  # federated vs local: not compared
    assert "at ε = 7.76" not in text  # the failed DP run is not in the DP sentences
    md = write_report(failed, tmp_path / "failed")["markdown"].read_text()
    assert "| Local only (did not learn) |" in md
    assert "Not compared: Local only, Federated DP (ε=8) did not learn" in md
    nothing = copy.deepcopy(study)
    for r in nothing["runs"]:
        r["dice_mean"] = 0.01
    assert "No setting learned" in summarise(nothing)
    assert "best non-private" not in summarise(nothing)


def test_tables_are_csv_and_figures_svg_next_to_the_report(study, tmp_path):
    import csv

    out = tmp_path / "study"
    paths = write_report(study, out)
    for name in ("dice", "cross_site", "dp_cost", "epsilon", "attack", "audit", "data"):
        assert paths[f"table_{name}"] == out / "tables" / f"{name}.csv", name
    rows = list(csv.DictReader(paths["table_dice"].open()))
    per_site = [f"{s}_dice_{k}" for s in SITES for k in ("mean", "sd")]
    assert list(rows[0]) == [
        "setting",
        "did_not_learn",
        *per_site,
        "dice_mean",
        "dice_sd",
        "hd95_mm_mean",
    ]
    central = study["runs"][0]
    assert rows[0]["setting"] == "Centralised" and rows[0]["did_not_learn"] == "0"
    assert float(rows[0]["dice_mean"]) == central["dice_mean"]  # the number, not "0.601 ± 0.035"
    for stem in ("privacy_utility", "learning_curves", "dp_cost"):
        svg = paths[stem].with_suffix(".svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg, stem
    assert "validation Dice" in (out / "figures" / "learning_curves.svg").read_text()


TEXT_COLUMNS = {
    "setting",
    "site",
    "trained_at",
    "per",
    "accountant",
    "unit",
    "attack",
    "threat",
    "mask_mode",
}
"""CSV columns that name things; every other cell is a number or empty."""
KEY_VALUE_TABLES = {"threat_model", "machine", "config"}  # settings as written, not results


def test_every_csv_cell_is_a_number_or_empty(study, tmp_path):
    import csv

    written = write_report(study, tmp_path / "study")
    tables = [p for k, p in written.items() if k.startswith("table_")]
    assert len(tables) >= 7
    for path in tables:
        if path.stem in KEY_VALUE_TABLES:
            continue
        for row in csv.DictReader(path.open()):
            for column, cell in row.items():
                if column not in TEXT_COLUMNS and cell != "":
                    float(cell)  # "0.601 ± 0.035", "2.13×", "–" or "(did not learn)" fail here
                assert cell not in (MISSING, "nan"), (path.name, column)


def test_a_missing_value_is_an_empty_csv_cell_and_a_dash_in_the_report():
    from privseg.report.tables import dp_cost_table

    runs = [{"label": "DP", "mode": "federated", "dp": True, "seconds_per_round": 2.0}]
    table = dp_cost_table(runs)
    assert table.rows == [["DP", "round", "2.00", MISSING, MISSING]]
    assert table.to_csv().splitlines() == [
        "setting,per,seconds_dp,seconds_nonprivate,ratio_x",
        "DP,round,2.0,,",
    ]
