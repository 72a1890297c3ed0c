"""The Flower internals that ``privseg.federated.flower_compat`` relies on are still there.

A Flower upgrade must fail here, loudly, rather than in a deployment: the pinned version, every
module and attribute in ``INTERNALS``, the signatures we call, and the source lines we patch.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

from privseg.federated import flower_compat as fc

FEDERATED = Path(fc.__file__).parent
ROOT = FEDERATED.parents[2]

#: Flower modules outside flower_compat may only be these public ones.
PUBLIC = {
    "flwr",
    "flwr.app",
    "flwr.clientapp",
    "flwr.client.mod",
    "flwr.common",
    "flwr.server",
    "flwr.server.strategy",
    "flwr.server.workflow",
    "flwr.serverapp",
    "flwr.serverapp.strategy",
    "flwr.simulation",
}

#: callable (module, dotted name) -> the parameters we pass, by name or position
SIGNATURES = {
    ("flwr.supercore.inflatable.inflatable_utils", "pull_objects"): [
        "initial_backoff",
        "backoff_cap",
        "max_tries_per_object",
        "max_time",
    ],
    ("flwr.supernode.runtime.run_clientapp", "pull_task_input"): ["client"],
    ("flwr.supernode.runtime.run_clientapp", "push_message"): ["client", "message", "context"],
    ("flwr.supernode.runtime.run_clientapp", "push_task_output"): [
        "client",
        "context",
        "sub_status",
        "details",
    ],
    ("flwr.supercore.runtime", "RuntimeHttpClient.from_server_address"): [
        "server_address",
        "insecure",
        "root_certificates",
        "interceptors",
    ],
    ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor"): ["component_name"],
    ("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor"): ["token"],
    ("flwr.supercore.heartbeat", "HeartbeatSender"): ["heartbeat_fn"],
    ("flwr.supercore.logger", "update_console_handler"): ["timestamps", "colored"],
    ("flwr.compat.common.recorddict_compat", "arrayrecord_to_parameters"): [
        "record",
        "keep_input",
    ],
    ("flwr.compat.common.recorddict_compat", "parameters_to_arrayrecord"): [
        "parameters",
        "keep_input",
    ],
    ("flwr.server.compat.grid_client_proxy", "GridClientProxy"): ["node_id", "grid", "run_id"],
    ("flwr.server.workflow", "SecAggPlusWorkflow.collect_masked_vectors_stage"): [
        "self",
        "grid",
        "context",
        "state",
    ],
}


def _resolve(module: str, name: str) -> object:
    obj: object = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def test_flower_is_the_pinned_version() -> None:
    import flwr

    assert flwr.__version__ == fc.FLOWER_VERSION
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"flwr[simulation]=={fc.FLOWER_VERSION}" in deps


@pytest.mark.parametrize("module", sorted(fc.INTERNALS))
def test_internal_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    missing = [name for name in fc.INTERNALS[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lacks {missing}"


@pytest.mark.parametrize(("module", "name"), sorted(SIGNATURES))
def test_internal_signatures(module: str, name: str) -> None:
    params = inspect.signature(_resolve(module, name)).parameters  # type: ignore[arg-type]
    missing = [p for p in SIGNATURES[module, name] if p not in params]
    assert not missing, f"{module}.{name} lacks the parameters {missing}"


def test_internal_values_and_behaviour() -> None:
    """Constants and source lines the patches depend on."""
    import flwr.supercore.superexec.run_superexec as superexec
    import flwr.supernode.start_client_internal as loop
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
    from flwr.supercore.constant import TaskType

    assert fc.SUPEREXEC_POLL_ENV[0] == superexec._TASK_POLL_INTERVAL_ENV
    source = inspect.getsource(loop)
    assert f"time.sleep({fc._PollingTime.IDLE_SLEEP})" in source  # the idle poll we shorten
    assert "time.sleep(0.5)" in source  # the reply poll
    assert SubStatus.COMPLETED and SubStatus.FAILED and TaskType.CLIENT_APP
    assert ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "legacy_results" in {f.name for f in dataclasses.fields(WorkflowState)}
    from flwr.server.superlink.fleet.vce import vce_api

    # in_process_simulation replaces the module the engine builds its backend from
    assert "from .backend.raybackend import RayBackend" in inspect.getsource(vce_api.start_vce)
    assert vce_api.__name__.rsplit(".", 1)[0] + ".backend.raybackend" == fc.RAY_BACKEND_MODULE


def _flwr_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every ``import flwr...`` / ``from flwr... import`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flwr"):
            found.append((str(node.module), [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("flwr")]
    return found


def test_internals_are_listed_and_used_only_in_flower_compat() -> None:
    for module, names in _flwr_imports(FEDERATED / "flower_compat.py"):
        if module in PUBLIC:
            continue
        assert module in fc.INTERNALS, f"flower_compat imports {module}: list it in INTERNALS"
        unlisted = set(names) - set(fc.INTERNALS[module])
        assert not unlisted, f"flower_compat uses {module}.{unlisted}: list it in INTERNALS"
    for path in sorted((ROOT / "src" / "privseg").rglob("*.py")):
        if path.name == "flower_compat.py":
            continue
        private = [m for m, _ in _flwr_imports(path) if m not in PUBLIC]
        assert not private, f"{path.name} imports {private}: go through flower_compat"


def test_supernode_polling_patch_matches_flower() -> None:
    """The SuperNode's sleeps follow a Backoff; everything else in its `time` is untouched."""
    import flwr.supercore.inflatable.inflatable_utils as utils
    import flwr.superlink.grid.http_grid as http_grid
    import flwr.supernode.start_client_internal as loop

    original_time = loop.time
    try:
        fc.patch_supernode_polling(0.01, 0.05)
        assert isinstance(loop.time, fc._PollingTime)
        t0 = time.monotonic()
        loop.time.sleep(3)  # the SuperNode's idle poll, now 10-50 ms
        assert time.monotonic() - t0 < 1.0
        assert loop.time.monotonic() > 0  # everything else is still `time`
    finally:
        loop.time = original_time
    pulls = {m: m.pull_objects for m in (utils, http_grid, loop)}
    try:
        fc.fast_object_pulls()
        fc.fast_object_pulls()  # idempotent: wraps Flower's own function, once
        assert loop.pull_objects.__wrapped__ is getattr(pulls[utils], "__wrapped__", pulls[utils])
        assert http_grid.pull_objects is utils.pull_objects is loop.pull_objects
    finally:
        for module, fn in pulls.items():
            module.pull_objects = fn


def test_backoff() -> None:
    b = fc.Backoff(0.01, 1.0, 0.1)
    b.idle_since -= 100
    assert b.interval() == 1.0
    b.reset()
    assert b.interval() == 0.01
    assert b.idle() < 1.0


def test_fab_clientapp_reads_our_app() -> None:
    from privseg.federated.app_files import APP_PYPROJECT

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("pyproject.toml", APP_PYPROJECT)
    assert fc.fab_clientapp(buf.getvalue()) == "privseg.federated.client_app:app"
