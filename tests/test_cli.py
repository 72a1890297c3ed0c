"""The `privseg` command: every group is registered, config errors exit 2 with a clear message."""

from __future__ import annotations

import tomllib

from typer.testing import CliRunner

from privseg.cli.app import app

runner = CliRunner()


def test_every_command_is_registered():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in (
        "data",
        "config",
        "train",
        "run",
        "predict",
        "budget",
        "attack",
        "audit",
        "server",
        "site",
        "certs",
    ):
        assert command in result.output, command


def test_config_show_prints_resolved_toml():
    result = runner.invoke(
        app, ["config", "show", "--set", "train.lr=0.05", "--set", "privacy.enabled=true"]
    )
    assert result.exit_code == 0, result.output
    parsed = tomllib.loads(result.output)
    assert parsed["train"]["lr"] == 0.05 and parsed["privacy"]["enabled"] is True


def test_bad_config_value_exits_2_naming_the_field(tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "r"),
            "--set",
            "privacy.delta=2",
        ],
    )
    assert result.exit_code == 2
    assert "privacy.delta = 2" in result.output and "Traceback" not in result.output


def test_train_on_a_folder_that_is_not_data_says_what_is_expected(tmp_path):
    result = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "dataset.json" in result.output and "manifest.json" in result.output


def test_unknown_mode_is_rejected(tmp_path, phantom_cache):
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(phantom_cache.root),
            "--mode",
            "solo",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 2
    assert "'solo'" in result.output and "central" in result.output
