"""The server's saved state: the global model, round, history and optimizer state of the last
completed round (for resume), and the status file that ``privseg server`` watches."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from privseg.config import Config
from privseg.core.errors import CheckpointError
from privseg.core.io import atomic_torch_save, write_json
from privseg.core.run_folder import RunFolder
from privseg.federated import messages as M
from privseg.federated.strategy import SiteAggregation, strategy_state


def initial_state(cfg: Config) -> dict[str, torch.Tensor]:
    """The round-0 global model (``train.init``'s, else seeded: simulation and deployment
    start alike)."""
    from privseg.models.init import starting_model

    model = starting_model(cfg, cfg.data.n_classes)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def state_dict(arrays: ArrayRecord, layout: str) -> dict[str, torch.Tensor]:
    """The packed global weights as a plain torch state_dict (tensors with their own storage)."""
    return {k: v.clone() for k, v in M.unpack_torch(arrays, layout).items()}


def save_state(
    out_dir: Path,
    *,
    cfg: Config,
    rnd: int,
    arrays: ArrayRecord,
    layout: str,
    history: list[dict[str, Any]],
    strategy: SiteAggregation,
    run_id: str,
) -> None:
    """Global model + round + history + server-optimizer state, atomically.

    ``arrays`` and the optimizer's moments are packed (``M.pack``); the file holds them as
    named torch state dicts.
    """
    opt = {
        name: {k: torch.from_numpy(np.array(v)) for k, v in M.unpack(d, layout).items()}
        for name, d in strategy_state(strategy).items()
    }
    atomic_torch_save(
        {
            "format": "privseg-federated-state/1",
            "round": rnd,
            "run_id": run_id,
            "config": cfg.to_toml(),
            "state_dict": state_dict(arrays, layout),
            "history": history,
            "strategy": opt,
        },
        RunFolder(out_dir).federated_state,
    )
    write_json(RunFolder(out_dir).history, history)


def load_state(out_dir: Path, cfg: Config) -> dict[str, Any] | None:
    """The last completed round's state, or None when there is none to resume."""
    path = RunFolder(out_dir).federated_state
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"{path} is unreadable ({exc}); delete it to start over") from exc
    old = flat(Config.from_dict(tomllib.loads(saved["config"])).to_dict())
    new = flat(cfg.to_dict())
    changed = sorted(
        k for k in old.keys() | new.keys() if k not in RESUMABLE and old.get(k) != new.get(k)
    )
    if changed:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise CheckpointError(
            f"{path} was written by a run with another config ({shown}): a resume continues "
            "the same run; use a new --out folder"
        )
    return saved


RESUMABLE = frozenset(
    {"train.device", "train.threads", "train.chunk_slices", "privacy.grad_path",
     "federated.round_timeout", "federated.rounds", "federated.min_sites"}
)  # fmt: skip
"""Settings a resume may change: where and how fast it computes, and how many rounds with how
few sites (a DP site declines steps past what its noise was calibrated for), never what one
round computes."""


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "classes":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def saved_round(out_dir: Path) -> int:
    """The last completed round saved in ``out_dir`` (0 when none)."""
    state = RunFolder(out_dir).federated_state
    return int(torch.load(state, weights_only=True)["round"]) if state.is_file() else 0


def write_status(out_dir: Path, status: str, rnd: int, message: str) -> None:
    write_json(
        RunFolder(out_dir).federation_status, {"status": status, "round": rnd, "message": message}
    )
