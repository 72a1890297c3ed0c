"""A site's last replies, kept so that a request the server sends again is replayed.

A server that dies after the sites trained round k, but before it saved that round, asks for
round k again when it resumes. Training it again would spend steps the run's noise was not
calibrated for: the site declines and the run stops short. The final test evaluation is the
same: answering it twice would be a second release. So a site keeps its last reply of each
kind (written atomically before it replies) and sends it again when the same request comes
back: the same round id (run id and round), the same config and the same incoming weights.
A replay is post-processing of a release already in the ledger, so it costs no privacy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from privseg.core.io import atomic_torch_save
from privseg.federated import messages as M

log = logging.getLogger(__name__)

FORMAT = "privseg-site-reply/2"
Reply = tuple[dict[str, torch.Tensor], dict[str, float]]
Answer = tuple[dict[str, float], list[dict[str, Any]] | None]


def request_digest(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """A hash of a request: its config (round id included) and its incoming weights.

    What a resume may change (``state.RESUMABLE``: device, threads, timeout, the number of
    rounds and with it the planned steps) does not change what a round computes, so it is
    left out: a server resumed with another round timeout still gets the lost round replayed.
    """
    h = hashlib.sha256()
    for key in sorted(config):
        if key == M.CFG_PLANNED_STEPS:
            continue
        value = _computed(config[key]) if key == M.CFG_TOML else config[key]
        h.update(f"{key}={value!r}\n".encode())
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{list(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _computed(toml: object) -> str:
    """The run's config without the settings a resume may change, canonical."""
    from privseg.federated.state import RESUMABLE, flat

    tree = flat(tomllib.loads(str(toml)))
    return json.dumps({k: v for k, v in tree.items() if k not in RESUMABLE}, sort_keys=True)


def _stored(path: Path, config: Mapping[str, Any], digest: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable: answer as usual (the ledger guards)
        log.warning("ignoring the unreadable stored reply %s: %s", path, exc)
        return None
    if saved.get("format") != FORMAT or saved.get("digest") != digest:
        return None
    log.info("request %s was answered before: replaying the stored reply", M.round_id(config))
    return saved


def _keep(path: Path, config: Mapping[str, Any], digest: str, **payload: Any) -> None:
    record = {"format": FORMAT, "round_id": M.round_id(config), "digest": digest}
    atomic_torch_save({**record, **payload}, path)


def stored_reply(path: Path, config: Mapping[str, Any], digest: str) -> Reply | None:
    """The train reply kept at ``path`` when it answered this very request (else None)."""
    saved = _stored(path, config, digest)
    if saved is None:
        return None
    return dict(saved["state"]), {k: float(v) for k, v in saved["metrics"].items()}


def keep_reply(path: Path, config: Mapping[str, Any], digest: str, reply: Reply) -> None:
    """Keep train ``reply`` to the request ``digest`` (replacing the previous one)."""
    state, metrics = reply
    _keep(
        path,
        config,
        digest,
        state={k: v.detach().cpu() for k, v in state.items()},
        metrics={k: float(v) for k, v in metrics.items()},
    )


def stored_answer(path: Path, config: Mapping[str, Any], digest: str) -> Answer | None:
    """The final test answer (metrics, release list) kept for this very request (else None)."""
    saved = _stored(path, config, digest)
    if saved is None:
        return None
    releases = json.loads(saved["releases"])
    return {k: float(v) for k, v in saved["metrics"].items()}, releases


def keep_answer(path: Path, config: Mapping[str, Any], digest: str, answer: Answer) -> None:
    """Keep the final test ``answer`` to the request ``digest``."""
    metrics, releases = answer
    _keep(
        path,
        config,
        digest,
        metrics={k: float(v) for k, v in metrics.items()},
        releases=json.dumps(releases),
    )
