"""The files Flower reads: the Flower App that ``privseg server`` submits, its run config and
the ``$FLWR_HOME`` connection config."""

from __future__ import annotations

import json
from pathlib import Path

from privseg.config import Config
from privseg.core.io import atomic_write_text
from privseg.federated import messages as M
from privseg.federated.identity import SiteNodes, dumps_site_nodes

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
"""


def run_config_toml(
    cfg_toml: str, run_id: str, out: str, resume: bool, expected_sites: int, site_nodes: str
) -> str:
    """The ServerApp's run config as TOML lines (the App's defaults: all empty)."""
    values = {
        M.CFG_TOML: toml_str(cfg_toml),
        M.CFG_RUN_ID: toml_str(run_id),
        M.RUN_OUT_DIR: toml_str(out),
        M.RUN_RESUME: "true" if resume else "false",
        M.RUN_EXPECTED_SITES: str(int(expected_sites)),
        M.RUN_SITE_NODES: toml_str(site_nodes),
    }
    return "".join(f"{k} = {v}\n" for k, v in values.items())


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
    defaults = run_config_toml("", "", "", False, 0, "")
    atomic_write_text(folder / "pyproject.toml", APP_PYPROJECT + defaults)
    run_config = folder.parent / "run-config.toml"
    nodes = dumps_site_nodes(site_nodes) if site_nodes else ""
    atomic_write_text(
        run_config,
        run_config_toml(cfg.to_toml(), run_id, str(out.resolve()), resume, expected_sites, nodes),
    )
    return run_config
