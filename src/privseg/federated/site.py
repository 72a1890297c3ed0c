"""A hospital's side of a deployment: ``privseg site`` runs its SuperNode and site worker.

``join`` claims the site folder (``.privseg`` marker and lock: one ``privseg site`` per
folder), stops a SuperNode or worker left running by an earlier ``privseg site`` that crashed
(recognised by its pid file and ``/proc``, see :func:`~privseg.federated.processes.stop_stale`),
then starts its own; they die with it (:mod:`privseg.federated.processes`).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from privseg.config import Config
from privseg.core.device import resolve_device
from privseg.core.errors import ConfigError, DataError, FederationError
from privseg.core.io import atomic_write_text, make_folder
from privseg.core.output import claimed_folder
from privseg.core.run_folder import RunFolder
from privseg.data.cache import MANIFEST
from privseg.federated import messages as M
from privseg.federated.app_files import toml_str
from privseg.federated.certs import CertFiles
from privseg.federated.processes import Processes, flower_bin, flower_env, service_port, stop_stale

log = logging.getLogger(__name__)

SITE_POLICY = "site-privacy.toml"
"""The site's privacy floor in its folder (written by :func:`site_policy`)."""
SITE_PROCESSES = ("supernode", "worker")
"""The processes ``join`` starts (their logs and pid files are ``logs/<name>.log|pid``)."""


# ---- site ------------------------------------------------------------------------------------
def check_site_data(data: Path, site: str) -> None:
    """Fail fast when the site's cache or its split is missing."""
    from privseg.data.cache import SliceCache

    data = Path(data)
    if not (data / MANIFEST).is_file():
        raise DataError(
            f"{data} is not a prepared slice cache (no {MANIFEST}); run "
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
    """
    own = Config.load(config) if config is not None else Config()
    if device is not None:
        own = own.replace(**{"train.device": device})
    resolve_device(own.train.device)  # a GPU this machine lacks is refused before the site starts
    budgets = [b for b in (budget_epsilon, own.privacy.budget_epsilon) if b is not None]
    if not budgets:
        raise ConfigError(
            "a site needs its own lifetime privacy budget: pass --budget EPSILON or set "
            "privacy.budget_epsilon in the site's --config (what its patients may lose over "
            "every run; `privseg budget --data CACHE` shows what is spent)"
        )
    policy = own.replace(**{"privacy.enabled": True, "privacy.budget_epsilon": min(budgets)})
    if policy.privacy.constant_time is None:  # the server times this site's replies
        policy = policy.replace(**{"privacy.constant_time": True})
    path = out / SITE_POLICY
    make_folder(out)
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
    files = CertFiles(Path(certs).resolve()) if certs else None
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
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    inputs = [data, *([files.root] if files else [])]
    with claimed_folder(out, "site", inputs=inputs) as claim:
        claim.own([SITE_POLICY, "logs", "sites", ".flwr"])
        for name in SITE_PROCESSES:
            pid = stop_stale(RunFolder(out).process_log(name).with_suffix(".pid"))
            if pid is not None:
                echo(f"site {site}: stopped the {name} (pid {pid}) an earlier run left behind")
        privacy_config = site_policy(out, privacy_config, budget_epsilon, device)
        return _serve_site(
            data=data,
            site=site,
            server=server,
            files=files,
            key=key,
            insecure=insecure,
            out=out,
            timeout=timeout,
            worker=worker,
            privacy_config=privacy_config,
            echo=echo,
        )


def _serve_site(
    *,
    data: Path,
    site: str,
    server: str,
    files: CertFiles | None,
    key: Path | None,
    insecure: bool,
    out: Path,
    timeout: float,
    worker: bool,
    privacy_config: Path,
    echo: Callable[[str], None],
) -> Path:
    """:func:`join`'s processes, once the site folder is ours: until the federation ends."""
    report = RunFolder(out).site_report(site)
    started = time.time()
    env = flower_env(out / ".flwr")
    with Processes() as procs:
        node_config = " ".join(
            f"{key}={toml_str(value)}"
            for key, value in (
                (M.NODE_SITE, site),
                (M.NODE_DATA_DIR, str(data)),
                (M.NODE_OUT_DIR, str(out)),
                (M.NODE_PRIVACY, str(privacy_config)),
            )
        )
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
                log_file=RunFolder(out).process_log("worker"),
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

        done = RunFolder(out).site_done(site)

        def finished() -> bool:
            """The server said it kept this run's final test answers (written after the
            site's report): the SuperNode would only wait for further runs."""
            return done.is_file() and done.stat().st_mtime >= started and report.is_file()

        give_up = time.monotonic() + timeout
        node_log = RunFolder(out).process_log("supernode")
        while True:
            # A SuperNode exits at once when the server is not up yet or has not registered
            # this site's key (exit 305), and after `timeout` s without the server: retry
            # within the window, so sites may start before the server.
            offset = node_log.stat().st_size if node_log.exists() else 0
            node = procs.start("supernode", argv, env=env, log_file=node_log)
            code = _wait_node(node, procs.procs.get("worker"), finished)
            if finished():
                check_accepted(site, out, started)
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
        if report.is_file() and report.stat().st_mtime >= started:
            why = (
                "the site answered the final test, but the server never said it kept the "
                "answers (it stopped first): resume it with `privseg server --resume` while "
                "this site runs; the site replays its answer, no new release"
            )
        elif "CERTIFICATE_VERIFY_FAILED" in tail:
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


def check_accepted(site: str, out: Path, started: float) -> None:
    """FederationError when the server said (on this run's final test) that it refused every
    training reply of this site: its privacy was spent for nothing."""
    from privseg.federated.site_settings import SiteSettings

    note = SiteSettings(site, out, out).refused
    if note.is_file() and note.stat().st_mtime >= started:
        raise FederationError(
            f"site {site}: the server refused every reply from this site: wrong key? (the "
            f"server registered another site's key for this one, or refused its updates; its "
            "log names the reason)"
        )


def _wait_node(
    node: subprocess.Popen[bytes],
    worker: tuple[subprocess.Popen[bytes], Path] | None,
    finished: Callable[[], bool],
) -> int | None:
    """The SuperNode's exit code, or None as soon as ``finished()``; FederationError if the
    site worker dies first."""
    while True:
        try:
            return node.wait(1.0)
        except subprocess.TimeoutExpired:
            pass
        if finished():
            return None
        if worker is not None and worker[0].poll() is not None:
            text = worker[1].read_text(errors="replace") if worker[1].exists() else ""
            tail = "\n".join(text.strip().splitlines()[-15:])
            raise FederationError(
                f"the site worker stopped (exit {worker[0].returncode}); last lines of "
                f"{worker[1]}:\n{tail}"
            )
