"""The two long-lived processes of a deployed site: its SuperNode and its ClientApp worker.

Why not Flower's defaults (Flower 1.42, checked in its source):

- With ``--isolation subprocess`` (the default) the SuperNode starts ``flower-superexec``, which
  launches a fresh ``flwr-clientapp`` process for every message
  (``flwr/supercore/superexec/executor/subprocess_executor.py``); that process handles one
  message and exits (``flwr_exit`` at the end of ``flwr/supernode/runtime/run_clientapp.py``).
  Each message paid ~3 s of ``flwr`` imports plus torch and a rebuilt trainer.
- The SuperNode polls the SuperLink for a new message every 3 s and for the ClientApp's reply
  every 0.5 s, both hard-coded (``time.sleep(3)`` / ``time.sleep(0.5)`` in
  ``flwr/supernode/start_client_internal.py``); no flag or variable sets them.

So ``privseg site`` runs ``flower-supernode --isolation process`` (Flower's mode for a ClientApp
runner outside the SuperNode) through :func:`supernode_main`, which only shortens those two
sleeps, and runs :func:`serve` next to it: it acquires the SuperNode's ClientApp tasks from the
local Runtime API (what ``flower-superexec`` does) and runs each one *in this process* with
Flower's own task I/O functions (``pull_task_input`` / ``push_message`` / ``push_task_output``
of ``flwr.supernode.runtime.run_clientapp``), so torch, the data and the site's trainer stay
loaded between rounds. It runs the installed privseg ClientApp, never code sent by the server,
and refuses a run whose app names another ClientApp.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import sys
import threading
import time
import tomllib
import zipfile
from typing import Any

log = logging.getLogger(__name__)

CLIENTAPP = "privseg.federated.client_app:app"


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

    def interval(self) -> float:
        idle = time.monotonic() - self.idle_since
        return min(self.hi, max(self.lo, self.factor * idle))

    def sleep(self) -> None:
        time.sleep(self.interval())


SUPERNODE_POLL = (0.02, 3.0)  # Flower's SuperNode: fixed 3 s (messages) and 0.5 s (replies)
TASK_POLL = (0.01, 1.0)  # this worker's polls of its SuperNode for a task


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


# ---- the ClientApp worker ----------------------------------------------------------------------
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


def _runtime_client(address: str, token: str | None) -> Any:
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


def _heartbeat(client: Any) -> Any:
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


def run_task(address: str, token: str, app: Any) -> dict[str, float]:
    """Run one ClientApp task in this process, as ``flwr-clientapp`` would.

    Returns seconds spent pulling the input, running the app and pushing the reply, and
    ``ok`` (1.0 when the task completed).
    """
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    client = _runtime_client(address, token)
    heartbeat = _heartbeat(client)
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    times = {"pull": 0.0, "app": 0.0, "push": 0.0}
    t0 = time.perf_counter()
    try:
        message, context, _run, fab = pull_task_input(client)
        named = fab_clientapp(fab.content)
        if named != CLIENTAPP:
            raise PermissionError(f"this site runs only {CLIENTAPP}, the run asks for {named!r}")
        times["pull"] = time.perf_counter() - t0
        reply = app(message=message, context=context)
        times["app"] = time.perf_counter() - t0 - times["pull"]
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - the reason goes back to the server
        log.exception("ClientApp task failed")
        details = f"{type(exc)}:<'{exc}'>"
        if message is not None:
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                reply_to=message,
            )
    t1 = time.perf_counter()
    try:
        if reply is not None and context is not None:
            push_message(client, reply, context)
    except Exception:  # noqa: BLE001
        log.exception("could not push the reply to the SuperNode")
        status = SubStatus.FAILED
    finally:
        heartbeat.stop()
        push_task_output(client=client, context=context, sub_status=status, details=details)
        client.close()
    times["push"] = time.perf_counter() - t1
    times["ok"] = float(status == SubStatus.COMPLETED)
    return times


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _exit_with_parent(parent: int) -> None:
    """Stop when the ``privseg site`` process that started us is gone (even if killed)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def serve(
    runtime_api: str, *, poll: tuple[float, float] = TASK_POLL, max_tasks: int | None = None
) -> None:
    """Acquire and run the SuperNode's ClientApp tasks until terminated (SIGTERM)."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # type: ignore[attr-defined]
    from flwr.supercore.constant import TaskType

    import privseg.training.trainer  # noqa: F401 - torch etc. imported now: round 1 is fast
    from privseg.federated.client_app import app

    fast_object_pulls()
    signal.signal(signal.SIGTERM, _interrupt)
    _exit_with_parent(os.getppid())
    log.info("ClientApp worker polling the SuperNode at %s", runtime_api)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    client, done, backoff = _runtime_client(runtime_api, None), 0, Backoff(*poll)
    try:
        while max_tasks is None or done < max_tasks:
            try:
                res = client.AcquireTask(request)
            except httpx.HTTPError:  # the SuperNode is (re)starting
                time.sleep(0.5)
                continue
            if res.HasField("task") and res.token:
                t = run_task(runtime_api, res.token, app)
                log.info(
                    "task %d %s: input %.2f s, app %.2f s, reply %.2f s",
                    res.task.task_id,
                    "done" if t["ok"] else "FAILED",
                    t["pull"],
                    t["app"],
                    t["push"],
                )
                done += 1
                backoff.reset()
            else:
                backoff.sleep()
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="privseg site worker (started by privseg site)")
    parser.add_argument("--runtime-api", required=True, help="the SuperNode's HOST:PORT")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    serve(args.runtime_api)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "supernode":
        supernode_main(sys.argv[2:])
    else:
        main()
