"""Progress outside a terminal: lines with elapsed and left times, in run.log and on stderr."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from privseg.core.progress import LoggedProgress, logged
from privseg.core.run_folder import RunFolder
from privseg.runs.train import run_log

SRC = Path(__file__).resolve().parents[1] / "src"


def test_logged_progress_logs_first_every_twentieth_and_last_with_time_left(caplog):
    now = [0.0]
    seen = []
    progress = LoggedProgress(lambda *a: seen.append(a), clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="privseg.core.progress"):
        for done in range(0, 41):
            now[0] = 3.0 * done
            progress(f"federated: round {done}/40, ε 1.00 so far", done, 40)
    assert len(seen) == 41  # every call reaches the bars
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 21  # the first, every 2 rounds (5 %), the last
    assert lines[1] == "federated: round 2/40, ε 1.00 so far [2/40] 0:06 elapsed, about 1:54 left"
    assert lines[-1] == "federated: round 40/40, ε 1.00 so far [40/40] 2:00 elapsed"


def test_a_study_logs_each_line_once_for_its_runs():
    study = logged(lambda *a: None)
    assert logged(study) is study  # train() inside the study adds no second logger


def test_run_log_keeps_privseg_records_and_other_libraries_warnings(tmp_path):
    folder = RunFolder(tmp_path)
    with run_log(folder):
        logging.getLogger("privseg.runs.test").info("privseg info")
        logging.getLogger("flwr.test").info("flower info")
        logging.getLogger("flwr.test").warning("flower warning")
    text = folder.log.read_text()
    assert "privseg info" in text and "flower warning" in text and "flower info" not in text


def test_a_train_without_a_terminal_writes_progress_to_run_log_and_stderr(tmp_path, phantom_cache):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *sys.path])}
    args = ["train", "--data", str(phantom_cache.root), "--out", str(out), "--epochs", "2"]
    args += ["--set", "model.features=4", "--set", "train.threads=1"]
    done = subprocess.run(
        [sys.executable, "-c", "from privseg.cli.app import main; main()", *args],
        capture_output=True,  # stderr is a pipe, as under make, nohup or CI
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    for text in (done.stderr, (out / "run.log").read_text()):
        assert "privseg.core.progress: central: epoch 1/2 [1/" in text, text
        assert "about" in text and "left" in text and "elapsed" in text
        assert "epoch 2/2, train loss " in text and "val Dice" in text
