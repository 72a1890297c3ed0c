"""Local processes and ports: Flower's executables in their own process groups, stopped by id."""

from __future__ import annotations

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
from contextlib import suppress
from pathlib import Path
from typing import Any

from privseg.federated.flower_compat import SUPEREXEC_POLL_ENV
from privseg.io import atomic_write_text

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
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as fh:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs[name] = (proc, log_file)
        atomic_write_text(log_file.with_suffix(".pid"), f"{proc.pid}\n")  # for manual cleanup
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
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
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
