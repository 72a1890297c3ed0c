"""Real deployment on 127.0.0.1: `privseg server` + 3 `privseg site` processes, TLS, DP.

Every process is started in its own process group and stopped by id in ``finally``; the
processes those start (SuperLink, SuperNodes, site workers) leave pid files in logs/.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import e2e_config, store_worst
from privseg.config import Config
from privseg.federated.certs import make_certs
from privseg.federated.processes import free_port, stop_stale, write_pid_file
from privseg.federated.reaper import proc_start

pytestmark = pytest.mark.slow

SITES = ["site-0", "site-1", "site-2"]
CLI = [sys.executable, "-c", "from privseg.cli.app import main; main()"]
WORKER = [sys.executable, "-m", "privseg.federated.worker", "--runtime-api", "127.0.0.1:1"]


def _config(**fed: object) -> Config:
    return e2e_config(sites=3, **{"round_timeout": 120.0, **fed})


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from privseg.data.phantom import synth_task
    from privseg.data.prepare import prepare_cache

    root = tmp_path_factory.mktemp("fed-data")
    cfg = _config()
    task = synth_task(root / "task", sites=3, patients_per_site=4, size=32, slices=8)
    prepare_cache(task, root / "cache", cfg.data, seed=0)
    return root / "cache"


class Cluster:
    """Starts CLI processes; stops every process group it (or they) started."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs = root, {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [*CLI, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text(errors="replace")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs[name]
        _killpg(proc.pid, sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        for pid_file in self.root.rglob("logs/*.pid"):  # children a CLI process left behind
            stop_stale(pid_file)


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _wait_rounds(path: Path, n: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and len(json.loads(path.read_text() or "[]")) >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"{path} did not reach {n} rounds")


def _federation(
    tmp_path: Path,
    cache: Path,
    cfg: Config,
    kill: str | None = None,
    *,
    registered: list[str] = SITES,
    joining: dict[str, tuple[str, Path, Path]] | None = None,
) -> dict:
    """Run ``privseg server`` (``registered``: the site keys it registers) and one ``privseg
    site`` per entry of ``joining`` (process name -> its --site, --certs and --data; default:
    every registered site with the server's certificate folder and ``cache``)."""
    certs = tmp_path / "certs"
    if not certs.exists():  # a test may have made them itself
        make_certs(certs, registered)
    joining = joining or {site: (site, certs, cache) for site in registered}
    cfg_file = tmp_path / "cfg.toml"
    cfg_file.write_text(cfg.to_toml())
    port = free_port()
    run = tmp_path / "run"
    cluster = Cluster(tmp_path)
    try:
        server = cluster.start(
            "server",
            "server",
            "--config",
            str(cfg_file),
            "--out",
            str(run),
            "--port",
            str(port),
            "--certs",
            str(certs),
        )
        for name, (site, site_certs, data) in joining.items():
            cluster.start(
                name,
                "site",
                "--data",
                str(data),
                "--site",
                site,
                "--server",
                f"127.0.0.1:{port}",
                "--certs",
                str(site_certs),
                "--out",
                str(tmp_path / name),
                "--timeout",
                "120",
                "--budget",
                "1000",
            )
        killed_after = 0
        if kill is not None:
            _wait_rounds(run / "history.json", 1, server, 240)
            cluster.stop(kill, signal.SIGKILL)
            killed_after = len(json.loads((run / "history.json").read_text()))
        server.wait(420)
        assert server.returncode == 0, cluster.output("server")
        exits = {name: cluster.procs[name].wait(180) for name in joining}  # once the run is over
        results = json.loads((run / "results.json").read_text())
        return {**results, "killed_after": killed_after, "site_exits": exits}
    finally:
        cluster.stop_all()


def test_three_sites_over_tls(tmp_path: Path, cache: Path) -> None:
    cfg = _config()
    t0 = time.perf_counter()
    results = _federation(tmp_path, cache, cfg)
    print(
        f"deployment: {time.perf_counter() - t0:.1f} s, per round "
        f"{[round(h['seconds'], 1) for h in results['history']]}"
    )
    assert [h["round"] for h in results["history"]] == [1, 2]
    assert sorted(s["name"] for s in results["sites"]) == SITES
    assert results["history"][-1]["sites"] == SITES
    for site in results["sites"]:  # per-site epsilon is what the store says of its patients
        eps, releases = store_worst(
            cache, site["name"], delta=cfg.privacy.delta, accountant=cfg.privacy.accountant
        )
        assert site["epsilon"] == pytest.approx(eps) and eps > 0
        assert len(site["releases"]) == len(releases)  # sent at the end
        assert site["patients"] == []  # per-patient results stayed at the site
        report = json.loads(
            (tmp_path / site["name"] / "sites" / f"{site['name']}.json").read_text()
        )
        assert report["test"]["patients"]
    assert results["epsilon_max"] == pytest.approx(max(s["epsilon"] for s in results["sites"]))
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_a_site_dies_mid_run(tmp_path: Path, cache: Path) -> None:
    """SIGKILL one site after round 1: every round that starts after the kill goes on without
    it, and the budget it spent still counts."""
    cfg = _config(rounds=4)  # rounds to spare: a round that ends before the kill lands
    try:
        results = _federation(tmp_path, cache, cfg, kill="site-2")  # killed once round 1 is done
    except AssertionError as exc:
        # Seen twice on a loaded 2-core machine: Flower 1.42 dropped a surviving site's reply
        # ("object-push session expired"), a transport failure, not privseg's. Retry once.
        if "object-push session expired" not in str(exc):
            raise
        retry = tmp_path / "retry"
        retry.mkdir()
        results = _federation(retry, cache, cfg, kill="site-2")
    assert [h["round"] for h in results["history"]] == [1, 2, 3, 4]
    # The round in flight when the kill landed may still hold site-2's reply (seen in CI: a fast
    # round 2 finished before the kill); every later round must not.
    after = results["history"][results["killed_after"] + 1 :]
    assert after, f"the kill came too late to test: {results['history']}"
    assert all(h["sites"] == ["site-0", "site-1"] and h["failed"] <= 1 for h in after)
    if "site-2" in results["history"][0]["sites"]:  # (a heavily loaded machine may miss it)
        gone = next(s for s in results["sites"] if s["name"] == "site-2")
        assert not gone["completed"] and gone["epsilon"] > 0  # its spent budget still counts
        assert results["epsilon_max"] >= gone["epsilon"]


def test_a_node_with_another_sites_key_is_refused(tmp_path: Path, cache: Path) -> None:
    """Two authenticated nodes both call themselves site-0; one holds site-1's key. Its replies
    are refused and logged at the server; the results hold site-0 once, with its own epsilon."""
    cfg = _config(rounds=1, min_sites=1)
    wrong = tmp_path / "wrong-certs"  # a hospital given the wrong key file under its own name
    (wrong / "sites").mkdir(parents=True)
    make_certs(tmp_path / "certs", ["site-0", "site-1"])
    shutil.copy(tmp_path / "certs" / "ca.crt", wrong / "ca.crt")
    shutil.copy(tmp_path / "certs" / "sites" / "site-1.key", wrong / "sites" / "site-0.key")
    other = shutil.copytree(cache, tmp_path / "other-cache")  # a copy: the same patients
    results = _federation(
        tmp_path,
        cache,
        cfg,
        registered=["site-0", "site-1"],
        joining={
            "genuine": ("site-0", tmp_path / "certs", cache),
            "impostor": ("site-0", wrong, other),
        },
    )
    assert [s["name"] for s in results["sites"]] == ["site-0"]
    assert results["history"][0]["sites"] == ["site-0"] and results["history"][0]["failed"] == 1
    # issue 24: the impostor's own operator is told, with a non-zero exit (it was 0, "finished")
    assert results["site_exits"] == {"genuine": 0, "impostor": 2}
    told = " ".join((tmp_path / "impostor.out").read_text().split())
    assert "the server refused every reply from this site: wrong key?" in told
    log = " ".join((tmp_path / "server.out").read_text().split())  # rich wraps long lines
    assert "holds the key registered for site 'site-1' but its reply claims site 'site-0'" in log
    # the impostor trained the same patients (a copy of the data): its releases count for them
    # too, so what site-0 reported is at most what the store now holds for its patients
    eps, releases = store_worst(
        cache, "site-0", delta=cfg.privacy.delta, accountant=cfg.privacy.accountant
    )
    assert 0 < results["sites"][0]["epsilon"] <= eps + 1e-9
    assert len({r["run_id"] for r in releases}) == 1


def _live(pid: int) -> bool:
    return proc_start(pid) is not None  # a zombie has ended


def _until(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_privseg_site_owns_its_supernode_and_worker(tmp_path: Path, cache: Path) -> None:
    """SIGKILL `privseg site`: its SuperNode and worker end within seconds. A restart stops
    what an earlier crash left (verified as privseg's) and nothing else."""
    certs = make_certs(tmp_path / "certs", ["site-0"]).root
    out, logs = tmp_path / "site-0", tmp_path / "site-0" / "logs"
    args = ["site", "--data", str(cache), "--site", "site-0", "--certs", str(certs)]
    args += ["--server", f"127.0.0.1:{free_port()}", "--out", str(out), "--budget", "1000"]
    cluster = Cluster(tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    leftover = None
    try:
        site = cluster.start("site", *args, "--timeout", "120")
        children = {}

        def started() -> bool:
            for name in ("supernode", "worker"):
                with contextlib.suppress(OSError, ValueError):
                    children[name] = json.loads((logs / f"{name}.pid").read_text())["pid"]
            return len(children) == 2 and all(_live(p) for p in children.values())

        assert _until(started, 120), cluster.output("site")
        site.kill()  # SIGKILL: privseg cannot clean up; the kernel and the watchdogs must
        site.wait()
        t0 = time.monotonic()
        # issue 24: the worker was alive 5 s after; every child ends within 1 s (reaper)
        assert _until(lambda: not any(_live(p) for p in children.values()), 1.0), children
        print(f"children gone {time.monotonic() - t0:.1f} s after SIGKILL")

        # an older privseg's crash: its worker still runs; an unrelated pid is in the other file
        leftover = subprocess.Popen(WORKER, start_new_session=True, stdin=subprocess.DEVNULL)
        write_pid_file(logs / "worker.pid", leftover.pid, WORKER)
        write_pid_file(logs / "supernode.pid", sleeper.pid, WORKER)  # the pid, reused
        again = cluster.start("again", *args, "--timeout", "2")
        assert again.wait(120) == 2  # the server is unreachable: a clear error, after the cleanup
        assert f"stopped the worker (pid {leftover.pid})" in cluster.output("again")
        assert leftover.wait(5) is not None
        assert sleeper.poll() is None  # not privseg's: never touched
    finally:
        for proc in (sleeper, leftover):
            if proc is not None:
                proc.kill()
                proc.wait()
        cluster.stop_all()


def test_unreachable_server_is_an_error_not_a_hang(tmp_path: Path, cache: Path) -> None:
    from privseg.core.errors import FederationError
    from privseg.federated.site import join

    certs = make_certs(tmp_path / "certs", ["site-0"])
    t0 = time.monotonic()
    with pytest.raises(FederationError, match="no federation finished"):
        join(
            data=cache,
            site="site-0",
            server=f"127.0.0.1:{free_port()}",
            certs=certs.root,
            out=tmp_path / "site",
            timeout=3,
            worker=False,
            budget_epsilon=1000.0,
            echo=lambda _: None,
        )
    assert time.monotonic() - t0 < 90


def test_wrong_certificate_is_refused(tmp_path: Path, cache: Path) -> None:
    from privseg.core.errors import FederationError
    from privseg.federated.processes import Processes, flower_bin, flower_env, wait_for_port
    from privseg.federated.site import join

    good = make_certs(tmp_path / "good", ["site-0"])
    other = make_certs(tmp_path / "other", ["site-0"])  # another CA: the site cannot trust it
    port = free_port()
    with Processes() as procs:
        link = procs.start(
            "superlink",
            [
                flower_bin("flower-superlink"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--ssl-ca-certfile",
                str(good.ca),
                "--ssl-certfile",
                str(good.server_cert),
                "--ssl-keyfile",
                str(good.server_key),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
            ],
            env=flower_env(tmp_path / ".flwr"),
            log_file=tmp_path / "logs" / "superlink.log",
        )
        assert wait_for_port("127.0.0.1", port, 60, link)
        with pytest.raises(FederationError, match="does not verify against"):
            join(
                data=cache,
                site="site-0",
                server=f"127.0.0.1:{port}",
                certs=other.root,
                out=tmp_path / "site",
                timeout=3,
                worker=False,
                budget_epsilon=1000.0,
                echo=lambda _: None,
            )


def test_insecure_mode_warns_and_runs(tmp_path: Path, cache: Path) -> None:
    """`--insecure` says so loudly; one round on one site runs without TLS (worker path)."""
    cfg = _config(rounds=1, local_steps=1, min_sites=1, round_timeout=60.0)
    cfg_file = tmp_path / "cfg.toml"
    cfg_file.write_text(cfg.to_toml())
    port = free_port()
    cluster = Cluster(tmp_path)
    try:
        server = cluster.start(
            "server", "server", "--config", str(cfg_file), "--out", str(tmp_path / "run"),
            "--port", str(port), "--insecure",
        )  # fmt: skip
        site = cluster.start(
            "site", "site", "--data", str(cache), "--site", "site-0", "--insecure",
            "--server", f"127.0.0.1:{port}", "--out", str(tmp_path / "site-0"),
            "--timeout", "15", "--budget", "1000",
        )  # fmt: skip
        server.wait(240)
        assert server.returncode == 0, cluster.output("server")
        site.wait(90)  # the SuperNode retries for --timeout s after the server has gone
        assert site.returncode == 0, cluster.output("site")
        for name in ("server", "site"):
            assert "--insecure: no TLS" in cluster.output(name)
        results = json.loads((tmp_path / "run" / "results.json").read_text())
        assert [s["name"] for s in results["sites"]] == ["site-0"]
        assert "INSECURE" in cluster.output("server")
    finally:
        cluster.stop_all()


def test_service_port_is_free_and_below_the_ephemeral_range() -> None:
    """A client polling the port before the service listens can never self-connect to it."""
    import socket

    from privseg.federated.processes import ephemeral_low, service_port

    low = ephemeral_low()
    for _ in range(20):
        port = service_port()
        assert 1024 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # still free


def test_a_killed_privseg_server_leaves_no_process(tmp_path: Path) -> None:
    """Issue 24, finding 6: flwr-serverapp (started by the SuperLink, not by privseg) ran on
    10-11 s after a SIGKILL of `privseg server`; now every descendant ends within 1 s."""
    from privseg.federated.reaper import descendants

    certs = make_certs(tmp_path / "certs", ["site-0", "site-1"]).root
    cfg_file = tmp_path / "cfg.toml"
    cfg_file.write_text(_config().to_toml())
    cluster = Cluster(tmp_path)
    try:
        args = ["server", "--config", str(cfg_file), "--out", str(tmp_path / "run")]
        server = cluster.start("server", *args, "--port", str(free_port()), "--certs", str(certs))

        def serverapp() -> bool:
            procs = descendants(server.pid)
            return any(b"flwr-serverapp" in _cmdline(p) for p in procs)

        assert _until(serverapp, 120), cluster.output("server")
        time.sleep(0.5)  # the watcher has seen it
        children = descendants(server.pid)
        server.kill()  # SIGKILL: privseg cannot clean up
        server.wait()
        assert _until(lambda: not any(_live(p) for p in children), 1.0), [
            _cmdline(p) for p in children if _live(p)
        ]
    finally:
        cluster.stop_all()


def _cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""
