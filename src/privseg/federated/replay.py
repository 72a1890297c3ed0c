"""A site's last train reply, kept so that a round the server asks for again is replayed.

A server that dies after the sites trained round k, but before it saved that round, asks for
round k again when it resumes. Training it again would spend steps the run's noise was not
calibrated for: the site declines and the run stops short. So a site keeps its last reply
(written atomically before it replies) and sends it again when the same request comes back:
the same round id (run id and round), the same config and the same incoming weights. The
weights are post-processing of a release already in the ledger, so a replay costs no privacy.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from privseg.federated import messages as M
from privseg.io import atomic_torch_save

log = logging.getLogger(__name__)

FORMAT = "privseg-site-reply/1"
Reply = tuple[dict[str, torch.Tensor], dict[str, float]]


def request_digest(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """A hash of a train request: its config (round id included) and its incoming weights."""
    h = hashlib.sha256()
    for key in sorted(config):
        h.update(f"{key}={config[key]!r}\n".encode())
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{list(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def stored_reply(path: Path, config: Mapping[str, Any], digest: str) -> Reply | None:
    """The reply kept at ``path`` when it answered this very request (None otherwise)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable: train as usual (the ledger guards)
        log.warning("ignoring the unreadable stored reply %s: %s", path, exc)
        return None
    if saved.get("format") != FORMAT or saved.get("digest") != digest:
        return None
    log.info("round %s was trained before: replaying the stored reply", M.round_id(config))
    return dict(saved["state"]), {k: float(v) for k, v in saved["metrics"].items()}


def keep_reply(path: Path, config: Mapping[str, Any], digest: str, reply: Reply) -> None:
    """Keep ``reply`` to the request ``digest`` (replacing the previous one) before it is sent."""
    state, metrics = reply
    atomic_torch_save(
        {
            "format": FORMAT,
            "round_id": M.round_id(config),
            "digest": digest,
            "state": {k: v.detach().cpu() for k, v in state.items()},
            "metrics": {k: float(v) for k, v in metrics.items()},
        },
        path,
    )
