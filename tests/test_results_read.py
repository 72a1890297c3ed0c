"""results.json read back typed: what the writer wrote loads equal; a bad field is named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from privseg.config import Config, PrivacyConfig
from privseg.core.errors import DataError
from privseg.core.results import RunResult, SiteResult
from privseg.core.study_result import StudyResult, StudyRun

PRIVACY = {
    "epsilon": math.inf,  # a release without DP on these patients: "inf" in JSON
    "epsilon_run": 2.5,
    "delta": 1e-5,
    "unit": "patient",
    "noise_multiplier": 1.1,
    "sample_rate": 0.25,
    "steps": 40,
    "steps_lifetime": 41,
    "max_grad_norm": 1.0,
    "accountant": "prv",
    "budget_epsilon": None,
    "budget_delta": None,
    "releases": [{"steps": 40}],
}


def _result() -> RunResult:
    test = {
        "dice": 0.8,
        "dice_sd": 0.05,
        "hd95": 4.5,
        "assd": 1.25,
        "patients": [{"id": "p0", "dice": 0.75}, {"id": "p1", "dice": 0.85}],
        "classes": {"liver": {"dice": 0.8, "hd95": 4.5}},
    }
    sites = [SiteResult.from_test("a", 12, test, PRIVACY), SiteResult.from_test("b", 9, test, None)]
    sites[0].cross = {"b": 0.5}
    sites[1].completed = False
    result = RunResult.of(
        PrivacyConfig(enabled=True, unit="patient", target_epsilon=3.0), "federated", sites, []
    )
    result.history = [{"round": 1, "val_dice": 0.5}]
    result.seconds_per_round, result.wall_seconds = 2.5, 12.0
    result.compute = {"sequential_steps": 40, "batch_size": 4, "slices_per_site": 160}
    result.federation = {
        "strategy": "fedavg",
        "rounds": 4,
        "local_steps": 10,
        "secure_aggregation": False,
    }
    result.provenance = {"run_id": "r1", "cache_dir": "/c", "device": "cpu"}
    return result


def test_a_written_run_result_loads_back_equal(tmp_path: Path) -> None:
    written = _result()
    out = written.write(tmp_path / "results.json")
    loaded = RunResult.load(tmp_path / "results.json")
    assert loaded == written
    assert loaded.to_dict() == out
    assert loaded.sites[0].privacy["epsilon"] == math.inf  # "inf" read back as a number


def test_a_written_study_result_loads_back_equal(tmp_path: Path) -> None:
    study = StudyResult(
        preset="quick",
        privseg_version="0",
        created="2026-01-01T00:00:00+00:00",
        machine={"cpu": "x"},
        data={"source": "d"},
        config=Config().to_dict(),
        wall_seconds=3.0,
        runs=[StudyRun("federated_dp", "Federated + DP", "runs/x", _result())],
        attack=[{"psnr_median": 10.0, "threat_model": {"threat": "T1"}}],
        audit=[],
        privacy={"plan": {}, "spent": []},
    )
    out = study.write(tmp_path / "results.json")
    loaded = StudyResult.load(tmp_path / "results.json")
    assert loaded == study and loaded.to_dict() == out


def _broken(tmp_path: Path, change) -> Path:
    data = _result().to_dict()
    change(data)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d.pop("mode"),
            "field 'mode' must be one of central, local, federated, got nothing",
        ),
        (lambda d: d.update(dp="yes"), "field 'dp' must be true or false, got 'yes'"),
        (lambda d: d["sites"][1].update(dice="high"), "field 'sites[1].dice' must be a number"),
        (
            lambda d: d["sites"][0].update(epsilon="lots"),
            "'sites[0].epsilon' must be a number or \"inf\"",
        ),
        (lambda d: d["sites"][0].update(steps=2.5), "'sites[0].steps' must be a whole number"),
        (lambda d: d["sites"][0]["classes"].update(liver=3), "'sites[0].classes.liver' must be"),
        (lambda d: d.update(sites={}), "field 'sites' must be a list, got {}"),
        (lambda d: d.update(rounds=None), "field 'rounds' must be a whole number, got None"),
    ],
)
def test_a_bad_field_is_named_with_its_file(tmp_path: Path, change, message: str) -> None:
    path = _broken(tmp_path, change)
    with pytest.raises(DataError) as err:
        RunResult.load(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_a_missing_or_malformed_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot be read"):
        RunResult.load(tmp_path / "none.json")
    (tmp_path / "cut.json").write_text('{"mode": "central", "si')
    with pytest.raises(DataError, match="cut.json is not valid JSON"):
        RunResult.load(tmp_path / "cut.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="its top level must be a JSON object"):
        RunResult.load(tmp_path / "list.json")
