"""`privseg data synth|prepare` through Typer: summary output, reuse, exit code 2 on bad input."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from privseg.cli.data import app

runner = CliRunner()


def _text(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_synth_then_prepare_then_reuse(tmp_path: Path) -> None:
    task = tmp_path / "task"
    result = runner.invoke(
        app,
        ["synth", str(task), "--sites", "2", "--patients", "3", "--size", "32", "--slices", "8"],
    )
    assert result.exit_code == 0, result.output
    assert (task / "dataset.json").is_file() and (task / "sites.json").is_file()
    args = [
        "prepare",
        str(task),
        "--out",
        str(tmp_path / "cache"),
        "--sites",
        "2",
        "--set",
        "data.resolution=16",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "built" in result.output and "site-1" in result.output and "train" in result.output
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "reused" in result.output


def test_prepare_with_config_file(phantom_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('seed = 4\n[data]\nresolution = 16\nslice_policy = "all"\n')
    result = runner.invoke(
        app, ["prepare", str(phantom_dir), "--out", str(tmp_path / "c"), "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    assert "resolution 16" in result.output


def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 2
    assert f"{tmp_path / 'missing'} does not exist" in _text(result)
    assert "Traceback" not in result.output


def test_bad_override_and_too_many_sites_exit_2(phantom_dir: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "c")
    result = runner.invoke(
        app, ["prepare", str(phantom_dir), "--out", out, "--set", "data.resolution=30"]
    )
    assert result.exit_code == 2 and "multiple of 8" in _text(result)
    result = runner.invoke(
        app,
        ["prepare", str(phantom_dir), "--out", out, "--sites", "13", "--set", "data.partition=iid"],
    )
    assert result.exit_code == 2 and "has no patients" in _text(result)
    result = runner.invoke(app, ["synth", str(tmp_path / "t"), "--organ", "brain"])
    assert result.exit_code == 2 and "'brain' is not one of 'liver', 'pancreas'" in _text(result)
