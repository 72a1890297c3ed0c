"""The run's final test: the last global model evaluated at every site on its test split.

The answers are kept (``final_test.json``, with the digest of the model they answer about)
before the sites are told they may leave: a server that dies in between resumes from them; one
that dies before keeping them asks again, and each site replays its kept answer (no second
release). Too few answers are never kept: the run stops, resumable.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from privseg.core.errors import FederationError
from privseg.core.io import read_json, write_json
from privseg.core.run_folder import RunFolder
from privseg.federated import messages as M
from privseg.federated.exchange import connected, send_and_receive, wait_for_sites

log = logging.getLogger(__name__)

DONE_WAIT = 30.0  # s the server waits for the sites to acknowledge that they may leave


def final_test(
    grid: Grid,
    s: Any,
    strategy: Any,
    arrays: ArrayRecord,
    base: dict[str, Any],
    *,
    run_id: str,
    wait: float,
) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, Any]]]]:
    """The last global model on every site's test split, evaluated at the site.

    The answers are kept (``final_test.json``) before the sites are told they may leave: a
    server that dies in between resumes from them; one that dies before keeping them asks
    again, and each site replays its kept answer (no second release).
    """
    fed = s.cfg.federated
    send = functools.partial(send_and_receive, poll=s.poll)
    path = RunFolder(s.out_dir).final_test
    model = _model_digest(arrays)  # the answers belong to this model, not the run's earlier one
    kept = _kept_final_test(path, run_id, model) if s.resume else None
    if kept is None:
        strategy.identity.keep_connected(wait_for_sites(grid, fed.min_sites, wait))
        request = ConfigRecord({**base, M.CFG_SPLIT: "test", M.CFG_FINAL: 1})
        evaluate = strategy.configure_evaluate(fed.rounds + 1, arrays, request, grid)
        strategy.aggregate_evaluate(fed.rounds + 1, send(grid, evaluate, timeout=fed.round_timeout))
        answered = sorted(strategy.last_evaluate)
        if len(answered) < fed.min_sites:  # never kept (nor completed): a resume asks again
            raise FederationError(
                f"final test: {len(answered)} site(s) answered ({', '.join(answered) or 'none'}),"
                f" fewer than federated.min_sites = {fed.min_sites}; the trained model is saved "
                f"in {RunFolder(s.out_dir).federated_state}: resume to ask again"
            )
        kept = {
            "run_id": run_id,
            "model": model,
            "test": dict(strategy.last_evaluate),
            "releases": dict(strategy.last_releases),
        }
        write_json(path, kept)
        nodes = list(grid.get_node_ids())
    else:
        log.info("the sites' final test answers were kept before the server stopped")
        nodes = connected(grid, len(kept["test"]), wait)  # those not told yet come back
    done = ConfigRecord({M.CFG_RUN_ID: run_id})
    messages = [
        Message(RecordDict({M.CONFIG: done}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    send(grid, messages, timeout=min(fed.round_timeout, DONE_WAIT))
    return kept["test"], kept["releases"]


def _kept_final_test(path: Path, run_id: str, model: str) -> dict[str, Any] | None:
    """The final test answers this run kept for this very model (None: not kept, another
    run's, or an earlier model's: a resume that trained more rounds asks again)."""
    try:
        kept = read_json(path)
    except (OSError, ValueError):
        return None
    ok = isinstance(kept, dict) and (kept.get("run_id"), kept.get("model")) == (run_id, model)
    return kept if ok and isinstance(kept.get("test"), dict) else None


def _model_digest(arrays: ArrayRecord) -> str:
    h = hashlib.sha256()
    for key, array in arrays.items():
        data = np.ascontiguousarray(array.numpy())
        h.update(f"{key}:{data.dtype.str}:{list(data.shape)}\n".encode())
        h.update(data.tobytes())
    return h.hexdigest()
