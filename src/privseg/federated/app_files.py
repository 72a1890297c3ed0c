"""The files Flower reads: the Flower App that ``privseg server`` submits, its run config and
the ``$FLWR_HOME`` connection config."""

from __future__ import annotations

import json
from pathlib import Path

from privseg.config import Config
from privseg.federated.identity import SiteNodes, dumps_site_nodes
from privseg.io import atomic_write_text

CONNECTION = "privseg"
APP_PYPROJECT = """\
# The Flower App that `privseg server` submits with `flwr run`. It holds no code: both
# components live in the installed privseg package, which the server and every site need.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "privseg-federation"
version = "1.0.0"
description = "privseg: DP-SGD CT segmentation across hospitals"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "privseg"

[tool.flwr.app.components]
serverapp = "privseg.federated.server_app:app"
clientapp = "privseg.federated.client_app:app"

[tool.flwr.app.config]
privseg-config = ""
run-id = ""
out-dir = ""
resume = false
expected-sites = 0
site-nodes = ""
"""


def toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_flower_home(home: Path, address: str, ca: Path | None) -> None:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection named ``privseg``."""
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f"address = {toml_str(address)}",
    ]
    lines.append(f"root-certificates = {toml_str(str(ca))}" if ca else "insecure = true")
    atomic_write_text(home / "config.toml", "\n".join(lines) + "\n")


def write_app(
    folder: Path,
    cfg: Config,
    *,
    run_id: str,
    out: Path,
    resume: bool,
    expected_sites: int = 0,
    site_nodes: SiteNodes | None = None,
) -> Path:
    """The Flower App folder and its run-config file; returns the run-config path.

    ``site_nodes``: node id -> site, from the server's key registrations (the ServerApp checks
    every reply's site against it).
    """
    atomic_write_text(folder / "pyproject.toml", APP_PYPROJECT)
    run_config = folder.parent / "run-config.toml"
    atomic_write_text(
        run_config,
        "".join(
            [
                f"privseg-config = {toml_str(cfg.to_toml())}\n",
                f"run-id = {toml_str(run_id)}\n",
                f"out-dir = {toml_str(str(out.resolve()))}\n",
                f"resume = {'true' if resume else 'false'}\n",
                f"expected-sites = {int(expected_sites)}\n",
                f"site-nodes = {toml_str(dumps_site_nodes(site_nodes) if site_nodes else '')}\n",
            ]
        ),
    )
    return run_config
