"""Real multi-site deployment, the server's side: ``privseg server``.

``serve`` claims the run folder, starts ``flower-superlink`` (TLS and SuperNode authentication
by default), registers every site's public key, submits the run with ``flwr run`` and waits for
it. Registering a key returns the node id Flower gives it; those ids, written into the run
config, are how the ServerApp knows which node is which site (:mod:`privseg.federated.identity`).
A site's side is :mod:`privseg.federated.site`. Every process started here is stopped by process
group when the call returns, and dies with this process (:mod:`privseg.federated.processes`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privseg.config import Config
from privseg.core.errors import FederationError
from privseg.core.io import private_file, read_json
from privseg.core.run_folder import RunFolder, RunInputs
from privseg.federated.app_files import CONNECTION, write_app, write_flower_home
from privseg.federated.certs import CertFiles, check_distinct_keys
from privseg.federated.identity import SiteNodes
from privseg.federated.processes import (
    Processes,
    die_with_parent,
    flower_bin,
    flower_env,
    signal_group,
    stop_stale,
    wait_for_port,
)

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
    """Run the whole federation from the server side; return ``results.json``: check the
    certificates and site keys, claim the run folder, start the SuperLink, register the
    sites, submit the run and stream its log until it ends."""
    out = Path(out).resolve()
    files, keys = _credentials(cfg, certs, insecure)
    run = RunFolder(out).claim("run", inputs=[files.root] if files else [])
    run.admit(RunInputs("server", None), resume=resume)  # a finished run: only with --resume
    run_id = run_id or uuid.uuid4().hex
    home = out / ".flwr"
    address = f"{host}:{port}"
    write_flower_home(home, address, None if insecure else files.ca if files else None)
    for stale in (run.federation_status, run.results):  # written anew when this run ends
        stale.unlink(missing_ok=True)
    env = flower_env(home)
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    link_log = run.process_log("superlink")
    if stop_stale(link_log.with_suffix(".pid")) is not None:
        echo("stopped the SuperLink an earlier `privseg server` left running in this folder")
    with Processes() as procs:
        argv = _superlink_argv(host, port, None if insecure else files, auth=bool(keys))
        link = procs.start("superlink", argv, env=env, log_file=link_log)
        if not wait_for_port(host, port, startup_timeout, link):
            raise FederationError(
                f"the SuperLink did not start on {address}:\n{procs.tail('superlink')}"
            )
        nodes = register_sites(keys, env)
        for node, site in sorted(nodes.items(), key=lambda item: item[1]):
            log.info("site %s's key is node %d", site, node)
        run_config = write_app(
            home / "app",
            cfg,
            run_id=run_id,
            out=out,
            resume=resume,
            expected_sites=len(keys),
            site_nodes=nodes,
        )
        echo(
            f"SuperLink on {address} ({'INSECURE' if insecure else 'TLS'}); "
            f"{len(keys)} site key(s) registered; waiting for sites..."
        )
        _stream_run(home, run_config, env, run, echo)
    return _outcome(run)


def _credentials(
    cfg: Config, certs: Path | None, insecure: bool
) -> tuple[CertFiles | None, dict[str, Path]]:
    """The server's TLS files and the registered sites' public keys, checked (refused:
    missing files, fewer keys than ``federated.min_sites``, two sites with one key)."""
    files = CertFiles(Path(certs).resolve()) if certs else None
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
    check_distinct_keys(keys)
    return files, keys


def _superlink_argv(host: str, port: int, files: CertFiles | None, *, auth: bool) -> list[str]:
    """The SuperLink's command line: TLS with the server's files (None: insecure), site
    authentication when site keys are registered."""
    argv = [flower_bin("flower-superlink"), "--host", host, "--port", str(port)]
    argv.append("--disable-runtime-dependency-installation")
    if files is None:
        argv.append("--insecure")
    else:
        argv += ["--ssl-ca-certfile", str(files.ca), "--ssl-certfile", str(files.server_cert)]
        argv += ["--ssl-keyfile", str(files.server_key)]
    return [*argv, "--enable-supernode-auth"] if auth else argv


def _stream_run(
    home: Path, run_config: Path, env: dict[str, str], run: RunFolder, echo: Callable[[str], None]
) -> None:
    """Submit the run (``flwr run --stream``) and pass its log on until the run's status file
    says it ended; the ``flwr`` process group is stopped whatever happens."""
    argv = [flower_bin("flwr"), "run", str(home / "app"), CONNECTION]
    argv += ["--run-config", str(run_config), "--stream"]
    with open(private_file(run.process_log("flwr-run")), "a") as run_log:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid()),  # noqa: PLW1509 - only prctl, getppid
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                run_log.write(line)
                run_log.flush()
                echo(line.rstrip())
                if _finished(run.root):
                    break
        finally:
            signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
                proc.wait()


def _outcome(run: RunFolder) -> dict[str, Any]:
    """The finished run's results, or FederationError saying how it ended."""
    status = read_json(run.federation_status) if run.federation_status.is_file() else None
    if status is None:
        raise FederationError(f"the run ended without a result; see {run.root / 'logs'}")
    if status["status"] == "stopped":
        raise FederationError(status["message"])
    if status["status"] != "completed" or not run.results.is_file():
        raise FederationError(
            f"the run failed after round {status['round']}; see {run.process_log('flwr-run')}"
        )
    return read_json(run.results)


def register_sites(keys: dict[str, Path], env: dict[str, str]) -> SiteNodes:
    """Register each site's public key with the SuperLink; the node id Flower created for
    each (node id -> site name): the only source of a node's site identity."""
    registering = {  # in parallel: each `flwr` call pays its own start-up
        site: subprocess.Popen(
            [
                flower_bin("flwr"),
                "supernode",
                "register",
                str(pub),
                CONNECTION,
                "--name",
                site,
                "--format",
                "json",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for site, pub in keys.items()
    }
    nodes: SiteNodes = {}
    for site, reg in registering.items():
        output, _ = reg.communicate(timeout=120)
        node = _node_id(output) if not reg.returncode else None
        if node is None:
            raise FederationError(f"registering {site}'s key failed:\n{output}")
        nodes[node] = site
    return nodes


def _node_id(output: str) -> int | None:
    """The node id in ``flwr supernode register --format json``'s output (None if absent)."""
    try:
        reply = json.loads(output[output.index("{") : output.rindex("}") + 1])
        return int(reply["node-id"]) if reply.get("success") else None
    except (ValueError, KeyError, TypeError):
        return None


def _finished(out: Path) -> bool:
    """The ServerApp has written its final status (completed, or stopped)."""
    run = RunFolder(out)
    if not run.federation_status.is_file():
        return False
    status = read_json(run.federation_status)["status"]
    return status == "stopped" or (status == "completed" and run.results.is_file())
