"""`privseg run --quick`: the whole grid end to end, the report's sections, and resume."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from privseg.cli.app import app
from privseg.report.sections import SECTIONS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "study"
    result = CliRunner().invoke(
        app, ["run", "--data", str(phantom_dir), "--out", str(out), "--quick"]
    )
    assert result.exit_code == 0, result.output
    return out, result.output


def test_quick_study_writes_every_artifact(study):
    out, output = study
    results = json.loads((out / "results.json").read_text())
    settings = [r["setting"] for r in results["runs"]]
    assert settings == ["central", "local", "federated", "federated_dp"]
    dp_run = results["runs"][-1]
    assert dp_run["dp"] is True and 0 < dp_run["epsilon_run_max"] <= dp_run["target_epsilon"]
    # the study trained these patients without DP first: their total is infinite (issue 22)
    assert dp_run["epsilon_max"] == "inf"
    assert {s["epsilon"] for s in results["privacy"]["spent"]} == {"inf"}
    assert all(
        r["mode"] == ("local" if r["setting"] == "local" else r["mode"]) for r in results["runs"]
    )
    assert {a["dp"] for a in results["attack"]} == {False, True}
    assert results["audit"] and all("held" in a for a in results["audit"])
    assert results["preset"] == "quick" and results["quick"] is True
    assert all(r["hd95_units"] == "mm" for r in results["runs"])
    for a in results["attack"]:  # each reconstruction grid, relative to the study folder
        assert (out / a["grid_png"]).read_bytes().startswith(b"\x89PNG"), a["grid_png"]
    for name in (
        "report.md",
        "report.html",
        "config.toml",
        "figures/learning_curves.png",
        "figures/learning_curves.svg",
        "figures/attack_1.png",
        "tables/dice.csv",
    ):
        assert (out / name).is_file(), name
    # the privacy-utility plot shows only DP settings that learned (quick ones rarely do)
    learned_dp = [r for r in results["runs"] if r["dp"] and r["dice_mean"] >= 0.1]
    assert (out / "figures" / "privacy_utility.png").is_file() == bool(learned_dp)
    assert "report.html" in output


def test_report_has_every_section(study):
    out, _ = study
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for heading in SECTIONS.values():
        assert heading in md, heading
    assert "data:image/png;base64," in html and 'src="http' not in html


def test_rerun_skips_finished_settings(study):
    out, _ = study
    marker = out / "runs" / "central" / "results.json"
    before = marker.stat().st_mtime_ns
    result = CliRunner().invoke(
        app, ["run", "--data", str(out / "cache"), "--out", str(out), "--quick"]
    )
    assert result.exit_code == 0, result.output
    assert marker.stat().st_mtime_ns == before
