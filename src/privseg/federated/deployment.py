"""Real multi-site deployment: a SuperLink at the server, a SuperNode at every site.

``serve`` starts ``flower-superlink`` (TLS and SuperNode authentication by default), registers
every site's public key, submits the run with ``flwr run`` and waits for it. ``join`` starts a
site: its worker (torch and the trainer stay loaded between rounds) and ``flower-supernode``.
Every process started here is stopped by process group when the call returns.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privseg.config import Config
from privseg.device import resolve_device
from privseg.errors import ConfigError, DataError, FederationError
from privseg.federated.app_files import CONNECTION, toml_str, write_app, write_flower_home
from privseg.federated.certs import CertFiles
from privseg.federated.processes import (
    Processes,
    flower_bin,
    flower_env,
    service_port,
    signal_group,
    wait_for_port,
)
from privseg.io import atomic_write_text, read_json
from privseg.run_folder import RunFolder

log = logging.getLogger(__name__)


# ---- server ----------------------------------------------------------------------------------
def serve(
    cfg: Config,
    *,
    out: Path,
    port: int,
    certs: Path | None,
    insecure: bool = False,
    host: str = "127.0.0.1",
    resume: bool = False,
    run_id: str | None = None,
    echo: Callable[[str], None] | None = None,
    startup_timeout: float = 60.0,
) -> dict[str, Any]:
    """Run the whole federation from the server side; return ``results.json``."""
    out = Path(out).resolve()
    files = CertFiles(Path(certs)) if certs else None
    if not insecure:
        if files is None:
            raise FederationError("--certs DIR is required (or --insecure, for tests only)")
        for path in (files.ca, files.server_cert, files.server_key):
            if not path.is_file():
                raise FederationError(f"{path} is missing: run `privseg certs {files.root}`")
    else:
        log.warning("INSECURE: the SuperLink runs without TLS; weights travel in clear text")
    keys = files.site_public_keys() if files else {}
    if not keys and not insecure:
        raise FederationError(f"no site public keys in {files.root / 'sites' if files else '?'}")
    if len(keys) and len(keys) < cfg.federated.min_sites:
        raise FederationError(
            f"{len(keys)} site key(s) registered but federated.min_sites = "
            f"{cfg.federated.min_sites}"
        )
    run_id = run_id or uuid.uuid4().hex
    home = out / ".flwr"
    address = f"{host}:{port}"
    write_flower_home(home, address, None if insecure else files.ca if files else None)
    run_config = write_app(
        home / "app", cfg, run_id=run_id, out=out, resume=resume, expected_sites=len(keys)
    )
    run = RunFolder(out)
    for stale in (run.federation_status, run.results):  # written anew when this run ends
        stale.unlink(missing_ok=True)
    env = flower_env(home)
    argv = [
        flower_bin("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        argv.append("--insecure")
    else:
        assert files is not None
        argv += [
            "--ssl-ca-certfile",
            str(files.ca),
            "--ssl-certfile",
            str(files.server_cert),
            "--ssl-keyfile",
            str(files.server_key),
        ]
    if keys:
        argv.append("--enable-supernode-auth")
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    with Processes() as procs:
        link = procs.start("superlink", argv, env=env, log_file=out / "logs" / "superlink.log")
        if not wait_for_port(host, port, startup_timeout, link):
            raise FederationError(
                f"the SuperLink did not start on {address}:\n{procs.tail('superlink')}"
            )
        registering = {  # in parallel: each `flwr` call pays its own start-up
            site: subprocess.Popen(
                [flower_bin("flwr"), "supernode", "register", str(pub), CONNECTION, "--name", site],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for site, pub in keys.items()
        }
        for site, reg in registering.items():
            output, _ = reg.communicate(timeout=120)
            if reg.returncode:
                raise FederationError(f"registering {site}'s key failed:\n{output}")
        echo(
            f"SuperLink on {address} ({'INSECURE' if insecure else 'TLS'}); "
            f"{len(keys)} site key(s) registered; waiting for sites..."
        )
        with open(out / "logs" / "run.log", "a") as run_log:
            proc = subprocess.Popen(
                [
                    flower_bin("flwr"),
                    "run",
                    str(home / "app"),
                    CONNECTION,
                    "--run-config",
                    str(run_config),
                    "--stream",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    run_log.write(line)
                    run_log.flush()
                    echo(line.rstrip())
                    if _finished(out):
                        break
            finally:
                signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    signal_group(proc, signal.SIGKILL)
                    proc.wait()
    status = read_json(run.federation_status) if run.federation_status.is_file() else None
    if status is None:
        raise FederationError(f"the run ended without a result; see {out / 'logs'}")
    if status["status"] == "stopped":
        raise FederationError(status["message"])
    if status["status"] != "completed" or not run.results.is_file():
        raise FederationError(
            f"the run failed after round {status['round']}; see {out / 'logs' / 'run.log'}"
        )
    return read_json(run.results)


def _finished(out: Path) -> bool:
    """The ServerApp has written its final status (completed, or stopped)."""
    run = RunFolder(out)
    if not run.federation_status.is_file():
        return False
    status = read_json(run.federation_status)["status"]
    return status == "stopped" or (status == "completed" and run.results.is_file())


def _wait_node(
    node: subprocess.Popen[bytes], worker: tuple[subprocess.Popen[bytes], Path] | None
) -> int:
    """The SuperNode's exit code; FederationError if the site worker dies first."""
    while True:
        try:
            return node.wait(1.0)
        except subprocess.TimeoutExpired:
            pass
        if worker is not None and worker[0].poll() is not None:
            text = worker[1].read_text(errors="replace") if worker[1].exists() else ""
            tail = "\n".join(text.strip().splitlines()[-15:])
            raise FederationError(
                f"the site worker stopped (exit {worker[0].returncode}); last lines of "
                f"{worker[1]}:\n{tail}"
            )


# ---- site ------------------------------------------------------------------------------------
def check_site_data(data: Path, site: str) -> None:
    """Fail fast when the site's cache or its split is missing."""
    from privseg.data.cache import SliceCache

    data = Path(data)
    if not (data / "manifest.json").is_file():
        raise DataError(
            f"{data} is not a prepared slice cache (no manifest.json); run "
            "`privseg data prepare` at this site first"
        )
    sites = SliceCache.open(data).sites
    if site not in sites:
        raise DataError(f"site {site!r} is not in {data} (it holds {', '.join(sites)})")


def site_policy(
    out: Path, config: Path | None, budget_epsilon: float | None, device: str | None = None
) -> Path:
    """The site's privacy floor as a TOML file (``out/site-privacy.toml`` when written here).

    A deployed site always trains under its own lifetime budget: ``--budget`` or
    ``privacy.budget_epsilon`` in its ``--config`` (the smaller when both), else refused.
    Its ``train.device`` (``device``, else its ``--config``'s) is where it trains, whatever
    the server asks; a GPU this machine lacks is refused here, before the site starts.
    """
    own = Config.load(config) if config is not None else Config()
    if device is not None:
        own = own.replace(**{"train.device": device})
    resolve_device(own.train.device)
    budgets = [b for b in (budget_epsilon, own.privacy.budget_epsilon) if b is not None]
    if not budgets:
        raise ConfigError(
            "a site needs its own lifetime privacy budget: pass --budget EPSILON or set "
            "privacy.budget_epsilon in the site's --config (what its patients may lose over "
            "every run; `privseg budget --data CACHE` shows what is spent)"
        )
    policy = own.replace(**{"privacy.enabled": True, "privacy.budget_epsilon": min(budgets)})
    path = out / "site-privacy.toml"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, policy.to_toml())
    return path


def join(
    *,
    data: Path,
    site: str,
    server: str,
    certs: Path | None,
    insecure: bool = False,
    out: Path | None = None,
    timeout: float = 60.0,
    worker: bool = True,
    privacy_config: Path | None = None,
    budget_epsilon: float | None = None,
    echo: Callable[[str], None] | None = None,
    device: str | None = None,
) -> Path:
    """Serve as site ``site`` until the server goes away; return the site's test report.

    ``timeout``: how long the SuperNode tries to (re)connect before giving up, so an
    unreachable server or a wrong certificate ends in an error, not a hang.
    ``privacy_config``: a TOML file whose ``[privacy]`` section is this site's floor, whatever
    the server sends (the site, not the server, owns its privacy guarantee); it or
    ``budget_epsilon`` must give the site's lifetime budget.
    """
    data = Path(data).resolve()
    out = Path(out or Path.cwd() / f"privseg-{site}").resolve()
    check_site_data(data, site)
    privacy_config = site_policy(out, privacy_config, budget_epsilon, device)
    files = CertFiles(Path(certs)) if certs else None
    key = files.site_key(site) if files else None
    if not insecure:
        if files is None or not files.ca.is_file():
            raise FederationError(
                f"the federation's ca.crt is missing in {certs}: copy it from "
                "the server's certificate folder (or use --insecure for tests)"
            )
        if key is None or not key.is_file():
            raise FederationError(
                f"this site's key {key} is missing: copy sites/{site}.key "
                "from the server's certificate folder"
            )
    else:
        log.warning("INSECURE: site %s connects without TLS", site)
    out.mkdir(parents=True, exist_ok=True)
    report = RunFolder(out).site_report(site)
    started = time.time()
    env = flower_env(out / ".flwr")
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    with Processes() as procs:
        node_config = (
            f"site={toml_str(site)} data-dir={toml_str(str(data))} out-dir={toml_str(str(out))}"
        )
        if privacy_config:
            node_config += f" privacy-config={toml_str(str(privacy_config))}"
        runtime_port = service_port()  # the SuperNode's local Runtime API (127.0.0.1)
        if worker:
            # The worker runs every ClientApp task in one process (torch and the trainer stay
            # loaded); the SuperNode leaves task execution to it (--isolation process) and
            # polls faster than Flower's hard-coded 3 s (see privseg.federated.flower_compat).
            procs.start(
                "worker",
                [
                    sys.executable,
                    "-m",
                    "privseg.federated.worker",
                    "--runtime-api",
                    f"127.0.0.1:{runtime_port}",
                ],
                env=env,
                log_file=out / "logs" / "worker.log",
            )
            argv = [sys.executable, "-m", "privseg.federated.worker", "supernode"]
            argv += ["--isolation", "process"]
        else:  # Flower's stock SuperNode: one flwr-clientapp process per message
            argv = [flower_bin("flower-supernode")]
        argv += [
            "--superlink",
            server,
            "--max-wait-time",
            str(timeout),
            "--port",
            str(runtime_port),
            "--node-config",
            node_config,
        ]
        argv += ["--insecure"] if insecure else ["--root-certificates", str(files.ca)]  # type: ignore[union-attr]
        if key is not None and key.is_file():
            argv += ["--auth-supernode-private-key", str(key)]
        echo(f"site {site}: connecting to {server} ({'INSECURE' if insecure else 'TLS'})")
        give_up = time.monotonic() + timeout
        node_log = out / "logs" / "supernode.log"
        while True:
            # A SuperNode exits at once when the server is not up yet or has not registered
            # this site's key (exit 305), and after `timeout` s without the server: retry
            # within the window, so sites may start before the server.
            offset = node_log.stat().st_size if node_log.exists() else 0
            node = procs.start("supernode", argv, env=env, log_file=node_log)
            code = _wait_node(node, procs.procs.get("worker"))
            if report.is_file() and report.stat().st_mtime >= started:
                echo(f"site {site}: federation finished; local report in {report}")
                return report
            with open(node_log, "rb") as fh:
                fh.seek(offset)
                if b"SuperNode ID" in fh.read():  # it was connected: allow a reconnect
                    give_up = time.monotonic() + timeout
            if time.monotonic() >= give_up:
                break
            time.sleep(2.0)
        tail = procs.tail("supernode")
        if "CERTIFICATE_VERIFY_FAILED" in tail:
            why = (
                f"TLS failed: the server's certificate does not verify against "
                f"{files.ca if files else 'the CA'} (another federation's ca.crt, or a "
                "server certificate without this host name: `privseg certs --host`)"
            )
        elif "Failed to activate SuperNode" in tail:
            why = (
                f"the server refused this site: is {key} the key of site {site!r} that the "
                "server registered (its sites/*.pub)?"
            )
        else:
            why = f"is the server running at {server}?"
        raise FederationError(
            f"site {site}: no federation finished with the server at {server} (SuperNode exit "
            f"{code}, gave up after {timeout:g} s); {why}\nlast lines of "
            f"{node_log}:\n{tail}"
        )
