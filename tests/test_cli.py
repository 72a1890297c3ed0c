"""The `privseg` command: every group is registered, config errors exit 2 with a clear message."""

from __future__ import annotations

import logging
import tomllib
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privseg.cli.app import app
from privseg.cli.common import setup_logging

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src" / "privseg"


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


@pytest.fixture
def privseg_log_level():
    logger = logging.getLogger("privseg")
    level = logger.level
    yield logger
    logger.setLevel(level)


@pytest.mark.parametrize(("args", "level"), [(["-v"], logging.DEBUG), ([], logging.INFO)])
def test_verbose_option_sets_privseg_log_level(privseg_log_level, args, level):
    privseg_log_level.setLevel(logging.NOTSET)
    result = runner.invoke(app, [*args, "config", "show"])
    assert result.exit_code == 0, result.output
    assert privseg_log_level.level == level
    assert "--verbose" in runner.invoke(app, ["--help"]).output


def test_setup_logging_prints_privseg_records_and_leaves_other_loggers(
    privseg_log_level, monkeypatch, capsys
):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    with warnings.catch_warnings():  # undoes the routing of warnings setup_logging does
        setup_logging(verbose=True)
        assert [type(h) for h in root.handlers] == [logging.StreamHandler]  # not a terminal
        logging.getLogger("privseg.test").debug("debug from privseg")
        logging.getLogger("other.lib").info("info from another library")
        logging.getLogger("other.lib").warning("warning from another library")
        logging.getLogger("privseg.core.progress").info("round 1/2")
        warnings.simplefilter("always")
        warnings.warn("Optimal order is the largest alpha", stacklevel=1)  # not privseg's code
        warnings.warn_explicit("slice unit", UserWarning, str(SRC / "privacy" / "engine.py"), 1)
    err = capsys.readouterr().err
    assert "debug from privseg" in err and "round 1/2" in err and "slice unit" in err
    assert "another library" not in err and "Optimal order" not in err
    setup_logging(verbose=False)
    assert len(root.handlers) == 1 and privseg_log_level.level == logging.INFO


def test_a_finished_progress_bar_is_removed_and_the_next_run_gets_a_fresh_one():
    from privseg.cli.common import progress_bar

    with progress_bar(transient=True) as progress:
        progress("federated: round 1/2", 1, 2)
        progress("site-0: epoch 1/3", 1, 3)
        assert len(progress.bar.tasks) == 2  # one bar per activity
        progress("federated: round 2/2", 2, 2)
        assert [t.description for t in progress.bar.tasks] == ["site-0: epoch 1/3"]
        progress("federated: round 1/6", 1, 6)  # the DP run after the non-private one
        fresh = [t for t in progress.bar.tasks if t.description.startswith("federated")]
        assert len(fresh) == 1 and fresh[0].completed == 1 and fresh[0].total == 6


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"privseg {version('privseg')}"


def test_help_lists_commands_in_workflow_order():
    from privseg.cli.app import WORKFLOW

    listed = [
        line.split()[1]
        for line in runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output.splitlines()
        if line.startswith("│ ") and line[2] not in " -"  # a command's first line
    ]
    assert listed == list(WORKFLOW)  # every command, each in its place


@pytest.mark.parametrize(
    ("command", "choices"),
    [
        (["train"], "[central|local|federated]"),
        (["run"], "[full|quick|paper]"),
        (["attack"], "[T1|T2|T3]"),
        (["attack"], "[given|joint|predicted]"),
        (["attack"], "[last|first]"),
        (["attack"], "[table|json]"),
        (["audit"], "[table|json]"),
        (["export"], "[torchscript|onnx]"),
        (["budget"], "[prv|rdp]"),
        (["data", "synth"], "[liver|pancreas]"),
    ],
)
def test_options_with_a_fixed_set_of_values_list_them_in_help(command, choices):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and choices in result.output


def test_cli_choices_are_the_library_tables():
    from typing import get_args

    from privseg.core.choices import ExportFormat, MaskFormat, Organ, Preset
    from privseg.data.phantom import ORGANS
    from privseg.inference.export import FORMATS
    from privseg.inference.volume import FORMATS as MASK_FORMATS
    from privseg.runs.study import PRESETS

    pairs = (
        (Preset, PRESETS),
        (ExportFormat, FORMATS),
        (Organ, ORGANS),
        (MaskFormat, MASK_FORMATS),
    )
    for choice, table in pairs:
        assert list(get_args(choice)) == list(table)


def test_help_shows_bracketed_words_as_written():
    result = runner.invoke(app, ["site", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "TOML whose [privacy] section" in result.output


def test_messages_show_bracketed_words_as_written(capsys):
    from privseg.cli.common import say

    say("input float32 [batch, 1, 64, 64] in [0, 1]", label="wrote")
    say("[privacy] section", label="error:", style="bold red", err=True)
    out, err = capsys.readouterr()
    assert "wrote input float32 [batch, 1, 64, 64] in [0, 1]" in out
    assert "error: [privacy] section" in err
