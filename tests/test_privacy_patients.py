"""Issue 22, end to end: a patient's budget follows the patient, not files, names or flags.

One small phantom (2 sites x 4 patients), a budget of 3 nearly spent on the first cache; then
every way the issue found to train the same patients again from zero is tried, and each must be
refused (exit 2) with nothing recorded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privseg.cli.app import app
from privseg.config import Config
from privseg.privacy.accounting import epsilon
from privseg.privacy.ledger import PrivacyLedger
from privseg.privacy.stores import LEDGER_FILE, store_dir

pytestmark = pytest.mark.slow  # end to end through the CLI: about 100 s
runner = CliRunner()
SMALL = {
    "data": {"resolution": 32, "sites": 2},
    "model": {"features": 4, "groups": 1},
    "train": {"epochs": 1, "batch_size": 4, "threads": 1},
}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from privseg.data.phantom import synth_task

    root = tmp_path_factory.mktemp("patients")
    return synth_task(root / "Task01", sites=2, patients_per_site=4, size=32, slices=8)


def config(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(Config.from_dict(SMALL).to_toml())
    return path


def invoke(*args: str) -> object:
    return runner.invoke(app, [str(a) for a in args])


def prepare(task: Path, out: Path, *extra: str) -> Path:
    extra = extra or ("--set", "data.sites=2")
    res = invoke("data", "prepare", task, "--out", out, "--set", "data.resolution=32", *extra)
    assert res.exit_code == 0, res.output
    return out


def train(data: Path, out: Path, cfg: Path, *extra: str) -> object:
    rdp = ("--set", "privacy.accountant='rdp'") if "--dp" in extra else ()
    args = ("--data", data, "--out", out, "--mode", "local", "--config", cfg, *extra, *rdp)
    return invoke("train", *args)


def store_rows() -> int:
    path = store_dir() / LEDGER_FILE
    return len(PrivacyLedger(path).rows()) if path.is_file() else 0


@pytest.fixture
def spent(task: Path, tmp_path: Path) -> dict[str, Path]:
    """The first cache's patients at epsilon ~2.99 of a budget of 3 (delta 1e-5)."""
    cfg = config(tmp_path)
    cache = prepare(task, tmp_path / "cache")
    res = train(cache, tmp_path / "first", cfg, "--dp", "--epsilon", "2.99", "--set",
                "privacy.budget_epsilon=3")  # fmt: skip
    assert res.exit_code == 0, res.output
    refused = train(cache, tmp_path / "again", cfg, "--dp", "--epsilon", "2")
    assert refused.exit_code == 2 and "refuses" in refused.output
    return {"cache": cache, "cfg": cfg}


def refused(res: object, rows: int) -> None:
    assert res.exit_code == 2, res.output  # type: ignore[attr-defined]
    assert store_rows() == rows  # nothing recorded


def test_1a_a_second_cache_of_the_same_task(spent: dict, task: Path, tmp_path: Path) -> None:
    rows = store_rows()
    other = prepare(task, tmp_path / "second-cache")
    refused(train(other, tmp_path / "r", spent["cfg"], "--dp", "--epsilon", "2"), rows)


def test_1b_training_on_the_task_folder(spent: dict, task: Path, tmp_path: Path) -> None:
    rows = store_rows()
    refused(train(task, tmp_path / "r", spent["cfg"], "--dp", "--epsilon", "2"), rows)


def test_1c_an_empty_ledger_dir(spent: dict, tmp_path: Path) -> None:
    rows = store_rows()
    empty = tmp_path / "empty-store"
    res = train(spent["cache"], tmp_path / "r", spent["cfg"], "--dp", "--epsilon", "2", "--set",
                f"privacy.ledger_dir='{empty}'")  # fmt: skip
    refused(res, rows)
    assert "not where these patients are accounted" in res.output  # type: ignore[attr-defined]
    assert not (empty / LEDGER_FILE).is_file() or not PrivacyLedger(empty / LEDGER_FILE).rows()


def test_1d_the_cache_moved(spent: dict, tmp_path: Path) -> None:
    rows = store_rows()
    moved = tmp_path / "moved"
    shutil.move(str(spent["cache"]), moved)
    refused(train(moved, tmp_path / "r", spent["cfg"], "--dp", "--epsilon", "2"), rows)
    shown = invoke("budget", "--data", moved, "--format", "json")
    assert shown.exit_code == 0, shown.output
    assert all(s["epsilon"] > 2.9 for s in json.loads(shown.stdout)["sites"])


def test_1e_the_task_copied_under_another_name(spent: dict, task: Path, tmp_path: Path) -> None:
    rows = store_rows()
    copy = tmp_path / "Task99_Renamed"
    shutil.copytree(task, copy)
    meta = json.loads((copy / "dataset.json").read_text())
    meta["name"] = "SomethingElse"
    (copy / "dataset.json").write_text(json.dumps(meta))
    other = prepare(copy, tmp_path / "renamed-cache")
    refused(train(other, tmp_path / "r", spent["cfg"], "--dp", "--epsilon", "2"), rows)


def test_1_another_partition_and_site_name(spent: dict, task: Path, tmp_path: Path) -> None:
    rows = store_rows()
    one = prepare(task, tmp_path / "one-site", "--set", "data.partition='iid'", "--set",
                  "data.sites=1", "--set", "data.site_name='hospital-x'")  # fmt: skip
    refused(train(one, tmp_path / "r", spent["cfg"], "--dp", "--epsilon", "2"), rows)


def test_budget_gives_the_same_answer_for_the_task_and_its_caches(spent: dict, task: Path) -> None:
    answers = []
    for data in (spent["cache"], task):
        shown = invoke("budget", "--data", data, "--format", "json")
        assert shown.exit_code == 0, shown.output
        answers.append({s["name"]: s["epsilon"] for s in json.loads(shown.stdout)["sites"]})
    assert answers[0] == answers[1] and len(answers[0]) == 2
    assert all(2.9 < e <= 3.0 for e in answers[0].values())


# ---- finding 2: non-private training is a release -----------------------------------------------
def test_2_non_private_training_on_patients_under_a_budget_is_refused(
    spent: dict, tmp_path: Path
) -> None:
    rows = store_rows()
    refused(train(spent["cache"], tmp_path / "r", spent["cfg"], "--no-dp"), rows)
    res = train(spent["cache"], tmp_path / "r2", spent["cfg"], "--no-dp", "--set",
                "privacy.allow_nonprivate=true")  # fmt: skip
    assert res.exit_code == 0, res.output
    shown = json.loads(invoke("budget", "--data", spent["cache"], "--format", "json").stdout)
    assert all(s["epsilon"] == "inf" and s["remaining"] == "-inf" for s in shown["sites"])
    assert any(r["kind"] == "non-private" for s in shown["sites"] for r in s["releases"])


def test_2_non_private_training_is_recorded_as_infinite(task: Path, tmp_path: Path) -> None:
    cache = prepare(task, tmp_path / "cache")
    res = train(cache, tmp_path / "plain", config(tmp_path), "--no-dp")
    assert res.exit_code == 0, res.output
    shown = json.loads(invoke("budget", "--data", cache, "--format", "json").stdout)
    assert {s["epsilon"] for s in shown["sites"]} == {"inf"}
    # a DP run on the same patients afterwards reports the truth: infinite, not its own 2
    res = train(cache, tmp_path / "dp", config(tmp_path), "--dp", "--epsilon", "2")
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "dp" / "results.json").read_text())
    assert {s["epsilon"] for s in results["sites"]} == {"inf"}
    assert all(s["epsilon_run"] <= 2.0 for s in results["sites"])


# ---- finding 9: a privacy option without --dp ------------------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        ("--epsilon", "3"),
        ("--delta", "1e-6"),
        ("--set", "privacy.budget_epsilon=3"),
        ("--config-privacy", "budget_epsilon = 3.0"),
    ],
)
def test_9_a_dp_option_without_dp_is_refused(task: Path, tmp_path: Path, extra: tuple) -> None:
    cfg = config(tmp_path)
    if extra[0] == "--config-privacy":  # written into the config file (review finding 8)
        cfg.write_text(Config.from_dict({**SMALL, "privacy": {"budget_epsilon": 3.0}}).to_toml())
        extra = ()
    res = invoke("train", "--data", task, "--out", tmp_path / "r", "--mode", "local",
                 "--config", cfg, *extra)  # fmt: skip
    assert res.exit_code == 2 and "DP is off" in res.output, res.output
    assert not (tmp_path / "r" / "results.json").exists() and store_rows() == 0


def test_the_reported_epsilon_recomputes_from_the_release_list(spent: dict, tmp_path: Path) -> None:
    results = json.loads((tmp_path / "first" / "results.json").read_text())
    for s in results["sites"]:
        history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in s["releases"]]
        assert s["accountant"] == "rdp", s
        assert s["epsilon"] == pytest.approx(epsilon(history, accountant="rdp", delta=1e-5))
        assert s["steps"] == s["steps_lifetime"] == sum(n for *_, n in history)
        assert s["budget_epsilon"] == 3.0 and s["budget_delta"] == 1e-5
