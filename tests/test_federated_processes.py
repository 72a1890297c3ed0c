"""privseg's child processes die with it, and a leftover one is stopped only if it is ours."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privseg.federated.processes import is_ours, stop_stale, write_pid_file
from privseg.federated.reaper import proc_start

WORKER = [sys.executable, "-m", "privseg.federated.worker", "--runtime-api", "127.0.0.1:1"]


def _gone(pid: int, within: float) -> bool:
    """Whether ``pid`` has ended (a zombie counts as ended) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc_start(pid) is None:
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def _spawned(argv: list[str]):
    proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_child_dies_with_privseg_even_when_privseg_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves no chance to clean up: the kernel (PR_SET_PDEATHSIG) ends the child."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from privseg.federated.processes import Processes, flower_env\n"
        "procs = Processes()\n"
        "child = procs.start('child', [sys.executable, '-c', 'import time; time.sleep(120)'],\n"
        f"    env=flower_env(), log_file=Path({str(tmp_path)!r}) / 'logs' / 'child.log')\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert proc_start(child) is not None
        record = json.loads((tmp_path / "logs" / "child.pid").read_text())
        assert record["pid"] == child and record["started"] == proc_start(child)
        parent.kill()
        parent.wait()
        assert _gone(child, 5.0), "the child outlived the privseg process that started it"
    finally:
        parent.kill()
        parent.wait()


def test_a_leftover_privseg_process_is_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    with _spawned(WORKER) as proc:
        write_pid_file(pid_file, proc.pid, WORKER)
        assert stop_stale(pid_file) == proc.pid
        assert proc.wait(5) is not None


def test_an_unrelated_process_is_never_killed(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    with _spawned(sleeper) as proc:
        start = proc_start(proc.pid)
        files = {
            "its own pid file": (sleeper, start),  # not a program privseg starts
            "the pid reused by another program": (WORKER, start),  # argv differs
            "another process with the same argv": (WORKER, (start or 0) + 1),  # start differs
        }
        for name, (argv, started) in files.items():
            path = tmp_path / f"{name}.pid"
            path.write_text(json.dumps({"pid": proc.pid, "argv": argv, "started": started}))
            assert stop_stale(path) is None, name
        legacy = tmp_path / "legacy.pid"
        legacy.write_text(f"{proc.pid}\n")  # an older privseg's file: nothing to verify
        assert stop_stale(legacy) is None
        assert stop_stale(tmp_path / "missing.pid") is None
        time.sleep(0.2)
        assert proc.poll() is None, "an unrelated process was killed"


@pytest.mark.parametrize(
    ("argv", "ours"),
    [
        (["/venv/bin/flower-supernode", "--superlink", "x"], True),
        (["/venv/bin/flower-superlink"], True),
        ([sys.executable, "-m", "privseg.federated.worker", "supernode"], True),
        ([sys.executable, "-m", "http.server"], False),
        (["sleep", "60"], False),
        ([], False),
    ],
)
def test_which_command_lines_are_privseg_processes(argv: list[str], ours: bool) -> None:
    assert is_ours(argv) is ours


def test_grandchildren_end_within_a_second_of_a_killed_privseg(tmp_path: Path) -> None:
    """Issue 24, finding 6: the SuperLink's ServerApp, Ray's agents and workers are privseg's
    grandchildren (no PR_SET_PDEATHSIG of ours) and ignored SIGTERM for 5-70 s. Here: a child
    (its own session, as Flower's services) whose child ignores SIGTERM."""
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    middle = (
        "import subprocess, sys, time\n"
        f"g = subprocess.Popen([sys.executable, '-c', {stubborn!r}], start_new_session=True)\n"
        "print(g.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    script = (
        "import subprocess, sys, time\n"
        "from privseg.federated.reaper import reaping\n"
        "with reaping():\n"
        f"    m = subprocess.Popen([sys.executable, '-c', {middle!r}], start_new_session=True)\n"
        "    time.sleep(120)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert owner.stdout is not None
        grandchild = int(owner.stdout.readline())
        time.sleep(0.5)  # the watcher has seen it
        owner.kill()
        owner.wait()
        t0 = time.monotonic()
        assert _gone(grandchild, 1.0), "a grandchild outlived privseg by more than 1 s"
        print(f"gone {time.monotonic() - t0:.2f} s after SIGKILL")
    finally:
        owner.kill()
        owner.wait()
