"""Ctrl-C (SIGINT) and SIGTERM end `privseg train` / `privseg run` with one line: what finished
and the command that continues; exit status 130 / 143; no traceback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import e2e_config
from privseg.cli import study as study_cli
from privseg.cli import train as train_cli
from privseg.core.io import write_json
from privseg.core.run_folder import RunFolder

SRC = Path(__file__).resolve().parents[1] / "src"
LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ privseg[.a-z_]*: ")


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """`privseg ARGS` in a fresh interpreter, stderr to ``log`` (no terminal)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *sys.path])}
    cli = [sys.executable, "-c", "from privseg.cli.app import main; main()"]
    with open(log, "wb") as err:
        return subprocess.Popen([*cli, *args], stdout=subprocess.DEVNULL, stderr=err, env=env)


def interrupt(train: subprocess.Popen[bytes], sig: int, ready: Path, log: Path) -> list[str]:
    """Send ``sig`` once ``ready`` exists; the stderr lines that are not privseg's log records."""
    deadline = time.monotonic() + 300
    try:
        while not ready.exists():
            assert time.monotonic() < deadline and train.poll() is None, log.read_text()
            time.sleep(0.2)
        train.send_signal(sig)
        assert train.wait(timeout=30) == 128 + sig, log.read_text()
    finally:
        train.kill()
        train.wait()
    text = log.read_text()
    assert "Traceback" not in text and "SIGTERM received" not in text, text
    return [line for line in text.splitlines() if line.strip() and not LOG_RECORD.match(line)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_central_train_says_how_to_run_it_again(tmp_path, phantom_cache, sig):
    out, log = tmp_path / "run", tmp_path / "stderr"
    args = ["train", "--data", str(phantom_cache.root), "--out", str(out), "--epochs", "50"]
    train = start([*args, "--set", "model.features=4", "--set", "train.threads=1"], log)
    started = out / "run.log"
    lines = interrupt(train, sig, started, log)
    assert len(lines) == 1, lines
    assert lines[0].startswith("interrupted: the central run did not finish")
    assert lines[0].endswith(
        f"privseg train --data {phantom_cache.root} --out {out} --epochs 50 "
        "--set model.features=4 --set train.threads=1"
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_federated_train_says_how_to_resume(tmp_path, phantom_dir, sig):
    """Ray's and Flower's tracebacks (115 lines) and Ray's absl dump at SIGTERM stay away."""
    cfg_file = tmp_path / "cfg.toml"
    cfg_file.write_text(e2e_config(rounds=500).to_toml())
    out, log = tmp_path / "run", tmp_path / "stderr"
    args = ["train", "--data", str(phantom_dir), "--out", str(out), "--mode", "federated"]
    train = start([*args, "--config", str(cfg_file)], log)
    lines = interrupt(train, sig, RunFolder(out).federated_state, log)
    assert len(lines) == 1, lines
    assert re.match(rf"interrupted: \d+ round\(s\) done and saved in {out}; ", lines[0])
    assert lines[0].endswith(f"{' '.join(args)} --config {cfg_file} --resume")


def test_what_an_interrupted_command_says(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["privseg", "run", "--data", "my data", "--out", "s"])
    folder = RunFolder(tmp_path)
    assert study_cli.stopped(tmp_path).startswith(f"0 setting(s) finished in {tmp_path} (none)")
    for key in ("central", "local"):
        write_json(folder.setting(key).results, {})
    assert study_cli.stopped(tmp_path) == (
        f"2 setting(s) finished in {tmp_path} (central, local); the same command skips them "
        "and runs the rest: privseg run --data 'my data' --out s"
    )
    monkeypatch.setattr(sys, "argv", ["privseg", "train", "--mode", "federated", "--resume"])
    folder.federated_state.write_bytes(b"")
    write_json(folder.federation_status, {"round": 3, "message": "round 3 of 9 done"})
    assert train_cli.stopped(folder, "federated") == (
        f"3 round(s) done and saved in {tmp_path}; continue with: "
        "privseg train --mode federated --resume"
    )


def test_the_ray_internals_the_clean_stop_relies_on_are_there():
    """Ray 2.55: ``ray.init`` sets SIGTERM's handler through ``set_sigterm_handler`` (replaced
    while privseg starts Ray), and reads ``RAY_DISABLE_FAILURE_SIGNAL_HANDLER`` (its absl dump)."""
    import inspect

    worker = pytest.importorskip("ray._private.worker")
    from ray._private import ray_constants

    assert "ray._private.utils.set_sigterm_handler(" in inspect.getsource(worker.init)
    assert hasattr(ray_constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER")
