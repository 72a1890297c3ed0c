"""Every use of Flower internals (private modules, attributes, monkeypatches), in one place.

Flower 1.42 is pinned (``FLOWER_VERSION``); ``INTERNALS`` lists what this module reaches into,
and ``tests/test_flower_compat.py`` checks it against the installed flwr, so an upgrade fails
there first. Flower is imported inside the functions: a SuperNode restart stays cheap.

Why the patches (Flower 1.42, checked in its source):

- The SuperNode polls the SuperLink for a new message every 3 s and for the ClientApp's reply
  every 0.5 s, both hard-coded (``time.sleep(3)`` / ``time.sleep(0.5)`` in
  ``flwr/supernode/start_client_internal.py``); no flag or variable sets them.
  :func:`supernode_main` runs ``flower-supernode`` with those sleeps following a
  :class:`Backoff`.
- A message becomes visible before its objects are uploaded; :func:`fast_object_pulls`
  retries them sooner (see there).
- The site worker (:mod:`privseg.federated.worker`) runs ClientApp tasks in its own process
  with Flower's task I/O functions (``flwr.supernode.runtime.run_clientapp``), wrapped here.
- Flower's simulation engine always builds a Ray backend; :func:`in_process_simulation` runs
  it without Ray (where Ray is not installed, e.g. a GPU machine whose image lacks it).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import tomllib
import types
import zipfile
from collections.abc import Iterator
from typing import Any

FLOWER_VERSION = "1.42.0"

#: module -> the names this module uses from it (checked by tests/test_flower_compat.py)
INTERNALS: dict[str, tuple[str, ...]] = {
    "flwr.supercore.inflatable.inflatable_utils": ("pull_objects",),
    "flwr.superlink.grid.http_grid": ("pull_objects",),
    "flwr.supernode.start_client_internal": ("pull_objects", "time"),
    "flwr.supercore.superexec.run_superexec": ("_TASK_POLL_INTERVAL_ENV",),
    "flwr.supercore.logger": ("update_console_handler",),
    "flwr.supernode.cli": ("flower_supernode",),
    "flwr.supercore.interceptors": (
        "RuntimeTokenHttpInterceptor",
        "RuntimeVersionHttpInterceptor",
    ),
    "flwr.supercore.runtime": ("RuntimeHttpClient",),
    "flwr.supercore.heartbeat": ("HeartbeatSender",),
    "flwr.proto.runtime_pb2": ("SendTaskHeartbeatRequest", "AcquireTaskRequest"),
    "flwr.supercore.constant": ("TaskType",),
    "flwr.common.constant": ("ErrorCode", "SubStatus"),
    "flwr.supernode.runtime.run_clientapp": (
        "pull_task_input",
        "push_message",
        "push_task_output",
    ),
    "flwr.common.secure_aggregation.secaggplus_constants": ("RECORD_KEY_CONFIGS",),
    "flwr.compat.common.recorddict_compat": (
        "arrayrecord_to_parameters",
        "parameters_to_arrayrecord",
    ),
    "flwr.server.compat.grid_client_proxy": ("GridClientProxy",),
    "flwr.server.workflow.constant": ("MAIN_CONFIGS_RECORD", "MAIN_PARAMS_RECORD", "Key"),
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow": ("WorkflowState",),
    "flwr.server.superlink.fleet.vce.vce_api": ("start_vce",),
    "flwr.server.superlink.fleet.vce.backend.backend": ("Backend",),
    "flwr.clientapp.client_app": ("ClientAppException", "LoadClientAppError"),
}
#: The module Flower's simulation engine imports its backend from (``vce_api.start_vce``:
#: ``from .backend.raybackend import RayBackend``, whatever backend name it is given).
RAY_BACKEND_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"

#: Flower's SuperExec polls for a task every second by default (a private variable sets it)
SUPEREXEC_POLL_ENV = ("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")


class Backoff:
    """Poll intervals that grow with the time spent idle: ``factor`` x idle, in [lo, hi].

    Right after activity the next message is usually near (the server's next phase), so we
    poll often; a federation that idles polls rarely. The latency this adds is at most about
    ``factor`` of the time spent waiting, plus ``lo``.
    """

    def __init__(self, lo: float, hi: float, factor: float = 0.1) -> None:
        self.lo, self.hi, self.factor = lo, hi, factor
        self.idle_since = time.monotonic()

    def reset(self) -> None:
        self.idle_since = time.monotonic()

    def idle(self) -> float:
        """Seconds since the last activity (or since this was made)."""
        return time.monotonic() - self.idle_since

    def interval(self) -> float:
        return min(self.hi, max(self.lo, self.factor * self.idle()))

    def sleep(self) -> None:
        time.sleep(self.interval())


SUPERNODE_POLL = (0.02, 3.0)  # Flower's SuperNode: fixed 3 s (messages) and 0.5 s (replies)


# ---- object transfer ---------------------------------------------------------------------------
OBJECT_PULL_BACKOFF = (0.01, 0.1)  # Flower: 1 s doubling to 10 s (flwr/supercore/constant.py)


def fast_object_pulls(initial: float = OBJECT_PULL_BACKOFF[0], cap: float = OBJECT_PULL_BACKOFF[1]):
    """Retry a message's not-yet-uploaded objects after 10 ms (doubling to 0.1 s), not 1-10 s.

    A message becomes visible before its objects are all uploaded, so a fast reader hits
    ``ObjectUnavailableError`` and Flower's ``pull_objects`` then backs off 1, 2, 4, 8 s; we saw
    4-17 s per task from that alone. Wraps ``pull_objects`` where Flower 1.42 looks it up
    (idempotent); the time limit (``max_time``, 2 h) is unchanged.
    """
    import flwr.supercore.inflatable.inflatable_utils as utils
    import flwr.superlink.grid.http_grid as http_grid
    import flwr.supernode.start_client_internal as node_loop

    original = getattr(utils.pull_objects, "__wrapped__", utils.pull_objects)

    def pull_objects(*args: Any, **kwargs: Any) -> Any:
        kwargs["initial_backoff"] = min(kwargs.get("initial_backoff", initial), initial)
        kwargs["backoff_cap"] = min(kwargs.get("backoff_cap", cap), cap)
        kwargs["max_tries_per_object"] = None  # bounded by max_time instead
        return original(*args, **kwargs)

    pull_objects.__wrapped__ = original  # type: ignore[attr-defined]
    for module in (utils, http_grid, node_loop):
        module.pull_objects = pull_objects  # type: ignore[attr-defined]


# ---- the SuperNode -----------------------------------------------------------------------------
class _PollingTime:
    """``time`` for Flower's SuperNode loop: its sleeps follow a :class:`Backoff`.

    ``sleep(3)`` is the SuperNode's "no message" poll; any other sleep means a task is in
    flight (waiting for the ClientApp's reply), i.e. activity.
    """

    IDLE_SLEEP = 3

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff

    def sleep(self, seconds: float) -> None:
        if seconds != self.IDLE_SLEEP:
            self.backoff.reset()
        time.sleep(min(seconds, self.backoff.interval()))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def patch_supernode_polling(lo: float = SUPERNODE_POLL[0], hi: float = SUPERNODE_POLL[1]) -> None:
    """Replace the SuperNode's fixed 3 s / 0.5 s polling sleeps by a :class:`Backoff`.

    Depends on ``flwr.supernode.start_client_internal`` calling ``time.sleep`` through its
    module-level ``time`` import (Flower 1.42, pinned); raises when that changes.
    """
    import flwr.supernode.start_client_internal as loop

    if not isinstance(getattr(loop, "time", None), type(time) | _PollingTime):
        raise RuntimeError("flwr.supernode.start_client_internal no longer imports `time`")
    loop.time = _PollingTime(Backoff(lo, hi))  # type: ignore[assignment]


def supernode_main(argv: list[str] | None = None) -> None:
    """``flower-supernode`` with faster polling (same arguments)."""
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli import flower_supernode

    patch_supernode_polling()
    fast_object_pulls()
    update_console_handler(timestamps=True, colored=False)  # the site's log shows when
    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()  # returns only once the SuperLink is gone for good (after retries)
    # Its Runtime API thread (not a daemon) would keep the process alive for ever (Flower 1.42),
    # and `privseg site` waits for this process to end.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


# ---- ClientApp tasks through the SuperNode's Runtime API ---------------------------------------
class RuntimeUnavailable(ConnectionError):
    """The SuperNode's Runtime API did not answer (the SuperNode is (re)starting)."""


def fab_clientapp(fab_content: bytes) -> str:
    """The ``clientapp`` component named in a FAB's ``pyproject.toml`` ('' if none)."""
    with zipfile.ZipFile(io.BytesIO(fab_content)) as zf:
        project = tomllib.loads(zf.read("pyproject.toml").decode())
    return str(
        project.get("tool", {})
        .get("flwr", {})
        .get("app", {})
        .get("components", {})
        .get("clientapp", "")
    )


def runtime_client(address: str, token: str | None) -> Any:
    """A client of the SuperNode's Runtime API, as ``flwr-clientapp`` makes it."""
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, interceptors=interceptors
    )


def task_heartbeat(client: Any) -> Any:
    """Flower's task heartbeat, without the SIGINT it sends itself when the task has ended."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # type: ignore[attr-defined]
    from flwr.supercore.heartbeat import HeartbeatSender

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.HTTPError:
            return False
        return True

    return HeartbeatSender(beat)


def acquire_task(client: Any) -> tuple[int, str] | None:
    """A ClientApp task's (id, token), or None when there is none.

    Raises RuntimeUnavailable when the Runtime API does not answer.
    """
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # type: ignore[attr-defined]
    from flwr.supercore.constant import TaskType

    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    try:
        res = client.AcquireTask(request)
    except httpx.HTTPError as exc:
        raise RuntimeUnavailable(str(exc)) from exc
    return (res.task.task_id, res.token) if res.HasField("task") and res.token else None


def pull_task(client: Any) -> tuple[Any, Any, bytes]:
    """The task's message, context and FAB content."""
    from flwr.supernode.runtime.run_clientapp import pull_task_input

    message, context, _run, fab = pull_task_input(client)
    return message, context, fab.content


def error_reply(message: Any, details: str) -> Any:
    """The reply to ``message`` when the ClientApp raised."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message
    )


def push_reply(client: Any, reply: Any, context: Any) -> None:
    from flwr.supernode.runtime.run_clientapp import push_message

    push_message(client, reply, context)


def finish_task(client: Any, context: Any, *, ok: bool, details: str) -> None:
    """Report the task completed (``ok``) or failed, with ``details``."""
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime.run_clientapp import push_task_output

    status = SubStatus.COMPLETED if ok else SubStatus.FAILED
    push_task_output(client=client, context=context, sub_status=status, details=details)


# ---- SecAgg+ on Flower's legacy path -----------------------------------------------------------
def is_secaggplus_stage(msg: Any) -> bool:
    """Whether a message carries SecAgg+'s stage config (what ``secaggplus_mod`` reads)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return RECORD_KEY_CONFIGS in msg.content.config_records


def arrayrecord_to_parameters(arrays: Any) -> Any:
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters as convert

    return convert(arrays, keep_input=True)


def parameters_to_arrayrecord(params: Any) -> Any:
    from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord as convert

    return convert(params, keep_input=False)


def grid_client_proxy(node_id: int, grid: Any) -> Any:
    """A legacy client proxy that reaches ``node_id`` through ``grid`` (run id 0)."""
    from flwr.server.compat.grid_client_proxy import GridClientProxy

    return GridClientProxy(node_id, grid, 0)


def legacy_context(strategy: Any, server_round: int, start_time: float, arrays: Any) -> Any:
    """A one-round LegacyContext holding ``strategy``, the round number and the weights, as a
    legacy workflow expects them at the start of round ``server_round``."""
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {Key.CURRENT_ROUND: server_round, Key.START_TIME: start_time}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = arrays
    return context


def legacy_results(state: Any) -> list[tuple[Any, Any]]:
    """The (proxy, FitRes) pairs SecAggPlusWorkflow has collected in its ``WorkflowState``."""
    return list(state.legacy_results)


# ---- simulation without Ray ----------------------------------------------------------------------
@contextlib.contextmanager
def in_process_simulation() -> Iterator[str]:
    """Flower's simulation engine with every ClientApp message run in this process, one at a
    time (as our single Ray actor does), no Ray needed; yields the backend name to pass to
    ``run_simulation`` (not "ray": Flower exits when "ray" is asked for and Ray is missing).

    While open, :data:`RAY_BACKEND_MODULE` is a stand-in whose ``RayBackend`` runs messages in
    the engine's worker thread; the real module (if imported) is put back afterwards.
    """
    from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
    from flwr.server.superlink.fleet.vce.backend.backend import Backend

    class InProcessBackend(Backend):
        def __init__(self, backend_config: Any) -> None:
            self.app_fn: Any = None

        def build(self, app_fn: Any) -> None:
            self.app_fn = app_fn

        @property
        def num_workers(self) -> int:
            return 1

        def is_worker_idle(self) -> bool:
            return True

        def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
            try:  # errors reach the server as a ClientApp error reply, as with Ray
                return self.app_fn()(message=message, context=context), context
            except LoadClientAppError:
                raise
            except Exception as exc:
                raise ClientAppException(str(exc)) from exc

        def terminate(self) -> None:
            pass

    stand_in = types.ModuleType(RAY_BACKEND_MODULE)
    stand_in.RayBackend = InProcessBackend  # type: ignore[attr-defined]
    saved = sys.modules.get(RAY_BACKEND_MODULE)
    sys.modules[RAY_BACKEND_MODULE] = stand_in
    try:
        yield "in-process"
    finally:
        if saved is None:
            sys.modules.pop(RAY_BACKEND_MODULE, None)
        else:
            sys.modules[RAY_BACKEND_MODULE] = saved
