"""Checkpoints: round trip with config and extras; each failure is a CheckpointError naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from privseg.config import Config
from privseg.core.errors import CheckpointError
from privseg.models import build_model
from privseg.models.checkpoint import FORMAT, load_checkpoint, save_checkpoint


def tiny_cfg(name: str = "monet") -> Config:
    return Config.from_dict(
        {
            "seed": 7,
            "model": {"name": name, "features": 4, "groups": 2},
            "data": {"resolution": 32, "labels": [1, 2], "hu_window": [-100.0, 250.0]},
        }
    )


def test_round_trip_restores_weights_config_and_extras(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = save_checkpoint(
        tmp_path / "run" / "checkpoint.pt",
        model.state_dict(),
        cfg,
        mode="central",
        epsilon=np.float64(3.5),
        rounds=[1, 2],
    )
    raw = torch.load(path, weights_only=True)  # safe loading works on what we write
    assert raw["format"] == FORMAT
    assert raw["model"] == {"name": "monet", "features": 4, "groups": 2, "dropout": 0.0}
    assert raw["data"] == {"resolution": 32, "hu_window": [-100.0, 250.0], "labels": [1, 2]}

    loaded, cfg2, extra = load_checkpoint(path)
    assert cfg2.to_dict() == cfg.to_dict()
    assert extra == {"mode": "central", "epsilon": 3.5, "rounds": [1, 2]}
    assert not loaded.training
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))
    assert not list(tmp_path.joinpath("run").glob(".*tmp"))  # no temporary left behind


def test_opacus_prefix_is_removed(tmp_path: Path) -> None:
    cfg = tiny_cfg("unet")
    state = {f"_module.{k}": v for k, v in build_model(cfg.model).state_dict().items()}
    model, _, _ = load_checkpoint(save_checkpoint(tmp_path / "c.pt", state, cfg))
    assert set(model.state_dict()) == {k[len("_module.") :] for k in state}


def test_unsafe_extra_is_refused_at_save_time(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    with pytest.raises(TypeError, match="extra when"):
        save_checkpoint(tmp_path / "c.pt", build_model(cfg.model).state_dict(), cfg, when=object())
    assert not (tmp_path / "c.pt").exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("content", ["garbage", "list", "no_format"])
def test_not_a_checkpoint(tmp_path: Path, content: str) -> None:
    path = tmp_path / "x.pt"
    if content == "garbage":
        path.write_bytes(b"this is not a zip file")
    elif content == "list":
        torch.save([1, 2, 3], path)
    else:
        torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"x\.pt is not a privseg checkpoint"):
        load_checkpoint(path)


def test_wrong_format(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    path = save_checkpoint(tmp_path / "c.pt", build_model(cfg.model).state_dict(), cfg)
    raw = torch.load(path, weights_only=True)
    raw["format"] = "privseg-checkpoint/99"
    torch.save(raw, path)
    with pytest.raises(
        CheckpointError, match=r"c\.pt has checkpoint format 'privseg-checkpoint/99'"
    ):
        load_checkpoint(path)


def test_state_dict_of_another_model(tmp_path: Path) -> None:
    cfg = tiny_cfg("monet")
    unet_state = build_model(tiny_cfg("unet").model).state_dict()
    path = save_checkpoint(tmp_path / "c.pt", unet_state, cfg)
    with pytest.raises(CheckpointError, match=r"c\.pt does not match model 'monet'"):
        load_checkpoint(path)
