"""Issue 24, finding 6 (modes): every folder privseg creates is 0700 and every file 0600, over
the commands, whatever the umask; and a cache is never written into its own task folder."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privseg.cli.app import app

runner = CliRunner()
TINY = ["--set", "data.resolution=16"]


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The common umask 022: anything privseg leaves to it would be 0755 / 0644."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _ok(*args: object) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)


def test_every_path_the_commands_create_is_private(tmp_path: Path, loose_umask: None) -> None:
    task, cache, run = tmp_path / "task", tmp_path / "cache", tmp_path / "run"
    _ok("data", "synth", task, "--sites", "2", "--patients", "3", "--size", "16", "--slices", "4")
    _ok("data", "prepare", task, "--out", cache, "--sites", "2", *TINY)
    _ok("train", "--data", cache, "--out", run, *TINY, "--set", "model.features=4",
        "--set", "train.steps=1", "--set", "train.epochs=1")  # fmt: skip
    predictions = tmp_path / "out" / "masks"  # a missing parent is created as well
    (tmp_path / "out").mkdir(mode=0o700)
    _ok("predict", "--checkpoint", run / "checkpoint.pt", "--image", task / "imagesTr",
        "--out", predictions, "--probabilities", "--preview")  # fmt: skip
    _ok("certs", tmp_path / "certs" / "federation", "--names", "a,b")
    assert (run / "run.log").is_file() and (tmp_path / "certs" / "federation" / "sites").is_dir()
    loose = []
    for path in tmp_path.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode != (0o700 if path.is_dir() else 0o600):
            loose.append(f"{path.relative_to(tmp_path)} {oct(mode)}")
    assert not loose, loose


def test_a_cache_inside_its_task_folder_is_refused(tmp_path: Path) -> None:
    task = tmp_path / "task"
    _ok("data", "synth", task, "--sites", "1", "--patients", "3", "--size", "16", "--slices", "4")
    before = sorted(p.name for p in task.iterdir())
    args = ["data", "prepare", task, "--out", task / "cache", "--sites", "1", *TINY]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2
    assert "inside the input folder" in " ".join(result.output.split())
    assert sorted(p.name for p in task.iterdir()) == before


def test_what_other_programs_create_under_privseg_is_private_too(tmp_path: Path) -> None:
    """Review of #24: Flower wrote `.flwr/source` under the server folder 0644. The `privseg`
    process sets umask 077, which the programs it starts inherit."""
    import subprocess
    import sys

    made = tmp_path / "made-by-a-child"
    code = (
        "import subprocess, sys; from privseg.cli import app as a; "
        "a.app = lambda: subprocess.run(['touch', sys.argv[1]], check=True); a.main()"
    )
    subprocess.run([sys.executable, "-c", code, str(made)], check=True)
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
