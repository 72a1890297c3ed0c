"""A deployed site's ClientApp worker: runs the SuperNode's tasks in one long-lived process.

With ``--isolation subprocess`` (Flower 1.42's default) the SuperNode starts
``flower-superexec``, which launches a fresh ``flwr-clientapp`` process for every message
(``flwr/supercore/superexec/executor/subprocess_executor.py``); that process handles one
message and exits (``flwr_exit`` at the end of ``flwr/supernode/runtime/run_clientapp.py``).
Each message paid ~3 s of ``flwr`` imports plus torch and a rebuilt trainer.

So ``privseg site`` runs the SuperNode with ``--isolation process`` (``python -m
privseg.federated.worker supernode``: :func:`~privseg.federated.flower_compat.supernode_main`,
faster polling) and :func:`serve` next to it: it acquires the SuperNode's ClientApp tasks from
the local Runtime API (what ``flower-superexec`` does) and runs each one *in this process* with
Flower's own task I/O (through :mod:`privseg.federated.flower_compat`), so torch, the data and
the site's trainer stay loaded between rounds. It runs the installed privseg ClientApp, never
code sent by the server, and refuses a run whose app names another ClientApp.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import Any

from privseg.federated import flower_compat as fc
from privseg.federated.processes import exit_with_parent

log = logging.getLogger(__name__)

CLIENTAPP = "privseg.federated.client_app:app"
TASK_POLL = (0.01, 1.0)  # this worker's polls of its SuperNode for a task


def run_task(address: str, token: str, app: Any) -> dict[str, float]:
    """Run one ClientApp task in this process, as ``flwr-clientapp`` would.

    Returns seconds spent pulling the input, running the app and pushing the reply, and
    ``ok`` (1.0 when the task completed).
    """
    client = fc.runtime_client(address, token)
    heartbeat = fc.task_heartbeat(client)
    heartbeat.start()
    message = context = reply = None
    ok, details = False, "ClientApp task failed due to unknown reason"
    times = {"pull": 0.0, "app": 0.0, "push": 0.0}
    t0 = time.perf_counter()
    try:
        message, context, fab = fc.pull_task(client)
        named = fc.fab_clientapp(fab)
        if named != CLIENTAPP:
            raise PermissionError(f"this site runs only {CLIENTAPP}, the run asks for {named!r}")
        times["pull"] = time.perf_counter() - t0
        reply = app(message=message, context=context)
        times["app"] = time.perf_counter() - t0 - times["pull"]
        ok, details = True, ""
    except Exception as exc:  # noqa: BLE001 - the reason goes back to the server
        log.exception("ClientApp task failed")
        details = f"{type(exc)}:<'{exc}'>"
        if message is not None:
            reply = fc.error_reply(message, details)
    t1 = time.perf_counter()
    try:
        if reply is not None and context is not None:
            fc.push_reply(client, reply, context)
    except Exception:  # noqa: BLE001
        log.exception("could not push the reply to the SuperNode")
        ok = False
    finally:
        heartbeat.stop()
        fc.finish_task(client, context, ok=ok, details=details)
        client.close()
    times["push"] = time.perf_counter() - t1
    times["ok"] = float(ok)
    return times


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(
    runtime_api: str, *, poll: tuple[float, float] = TASK_POLL, max_tasks: int | None = None
) -> None:
    """Acquire and run the SuperNode's ClientApp tasks until terminated (SIGTERM)."""
    import privseg.training.trainer  # noqa: F401 - torch etc. imported now: round 1 is fast
    from privseg.federated.client_app import app

    fc.fast_object_pulls()
    signal.signal(signal.SIGTERM, _interrupt)
    exit_with_parent(os.getppid())  # `privseg site` is gone, even if killed: stop
    log.info("ClientApp worker polling the SuperNode at %s", runtime_api)
    client, done, backoff = fc.runtime_client(runtime_api, None), 0, fc.Backoff(*poll)
    try:
        while max_tasks is None or done < max_tasks:
            try:
                task = fc.acquire_task(client)
            except fc.RuntimeUnavailable:  # the SuperNode is (re)starting
                time.sleep(0.5)
                continue
            if task is not None:
                task_id, token = task
                t = run_task(runtime_api, token, app)
                log.info(
                    "task %d %s: input %.2f s, app %.2f s, reply %.2f s",
                    task_id,
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
        exit_with_parent(os.getppid())  # the SuperNode never outlives `privseg site`
        fc.supernode_main(sys.argv[2:])
    else:
        main()
