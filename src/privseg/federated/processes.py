"""Local processes and ports: Flower's executables in their own process groups, stopped by id.

A process started here belongs to the ``privseg`` process that started it and never outlives
it: on Linux the kernel sends it SIGTERM when that parent dies, even by SIGKILL
(``PR_SET_PDEATHSIG``), privseg's own long-lived processes (the site worker, the SuperNode
wrapper) also watch their parent (:func:`exit_with_parent`), and the processes *they* start
end within 1 s too (:mod:`privseg.federated.reaper`, started with :class:`Processes`). Each
writes a pid file (pid, argv, start time) beside its log, so a process left over by an older
crash is found and stopped at the next start (:func:`stop_stale`) -- only when ``/proc`` shows
that very process (same argv and start time) and it is one of privseg's (:func:`is_ours`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from privseg.core.io import atomic_write_text, private_file
from privseg.federated.flower_compat import SUPEREXEC_POLL_ENV
from privseg.federated.reaper import proc_start, reaping

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (bind to port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ephemeral_low(default: int = 32768) -> int:
    """The lowest port the kernel hands out as a connection's source port."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def service_port(host: str = "127.0.0.1", span: int = 10000) -> int:
    """A free port *below* the ephemeral range, for a local service that a client polls
    before it listens (the site worker polls the SuperNode's Runtime API, which restarts
    until the server is up). A client retrying ``connect()`` to an ephemeral-range port can
    be given that very port as its source and connect to itself; the service then cannot
    bind (seen in CI: ``[Errno 98] address already in use``, the site lost)."""
    top = ephemeral_low()
    for port in random.sample(range(max(1024, top - span), top), 200):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    return free_port(host)


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for Flower's executables: this interpreter's bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault(*SUPEREXEC_POLL_ENV)  # Flower's default: 1 s per message
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def flower_bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


class Processes:
    """Processes started in their own process group; ``stop()`` ends each group by its id."""

    def __init__(self) -> None:
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start(
        self, name: str, argv: list[str], *, env: dict[str, str], log_file: Path
    ) -> subprocess.Popen[bytes]:
        with open(private_file(log_file), "ab") as fh:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(os.getpid()),  # noqa: PLW1509 - only prctl, getppid
            )
        self.procs[name] = (proc, log_file)
        write_pid_file(log_file.with_suffix(".pid"), proc.pid, argv)
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def tail(self, name: str, lines: int = 15) -> str:
        _, log_file = self.procs[name]
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        for proc, _ in self.procs.values():
            signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc, _ in self.procs.values():
            with suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            signal_group(proc, signal.SIGKILL)  # children (flwr-serverapp, ...) too
            proc.wait()
        self.procs.clear()

    def __enter__(self) -> Processes:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        self._reaper = reaping()  # their own children too, if privseg is killed (see reaper)
        self._reaper.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self._reaper.__exit__(None, None, None)
            if getattr(self, "_previous", None) is not None:
                signal.signal(signal.SIGTERM, self._previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds, so every started process group is stopped


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.3)
    return False


# ---- owning child processes ----------------------------------------------------------------
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Any:
    """libc's ``prctl`` (None off Linux), looked up before a fork, not in the child."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when ``parent`` dies (Linux), and exits at
    once if ``parent`` is already gone by the time the child runs.

    The kernel ties the signal to the *thread* that forked: start children from a thread that
    lives as long as they should (privseg starts them from the main thread)."""
    prctl = _prctl()

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # it died between fork and prctl
            os._exit(1)

    return preexec


def exit_with_parent(parent: int, *, grace: float = 10.0, every: float = 0.5) -> None:
    """Watch ``parent`` from a daemon thread: once it is gone (the process was re-parented),
    SIGTERM this process (its own clean exit), and ``os._exit`` after ``grace`` seconds if
    that did not end it. The portable twin of :func:`die_with_parent`."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        log.warning("parent process %d is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _proc_argv(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def write_pid_file(path: Path, pid: int, argv: list[str]) -> None:
    """What :func:`stop_stale` needs to recognise the process later: pid, argv, start time."""
    record = {"pid": pid, "argv": [str(a) for a in argv], "started": proc_start(pid)}
    atomic_write_text(path, json.dumps(record) + "\n")


OUR_PROGRAMS = ("flower-superlink", "flower-supernode")
OUR_MODULES = ("privseg.federated.worker",)


def is_ours(argv: list[str]) -> bool:
    """Whether a command line is one privseg starts (a Flower service, or privseg's worker)."""
    if not argv:
        return False
    program = Path(argv[0]).name
    module = argv[2] if len(argv) > 2 and argv[1] == "-m" else None
    return program in OUR_PROGRAMS or module in OUR_MODULES


def stop_stale(path: Path, timeout: float = 10.0) -> int | None:
    """Stop the process ``path`` (a pid file of :func:`write_pid_file`) names, if it is a
    live process privseg started: same argv and start time in ``/proc``, and :func:`is_ours`.
    Returns its pid when one was stopped; anything else (no file, a dead or reused pid, an
    unreadable file, another program) is left alone."""
    try:
        record = json.loads(path.read_text())
        pid, argv, started = int(record["pid"]), list(record["argv"]), record["started"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if started is None or pid <= 1 or pid == os.getpid():
        return None
    actual = _proc_argv(pid) or []
    same = actual == argv or actual[1:] == argv  # [1:]: a script run by its #! interpreter
    if proc_start(pid) != started or not same or not is_ours(argv):
        return None
    log.warning("stopping pid %d, left over by an earlier run: %s", pid, " ".join(argv))
    group = pid if _pgid(pid) == pid else None  # started as its own group's leader
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(group, sig)
            else:
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc_start(pid) == started:
            time.sleep(0.1)
        if proc_start(pid) != started:
            return pid
    return pid


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
