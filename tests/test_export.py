"""`privseg export`: the exported network gives the checkpoint model's logits, carries its
preprocessing, and the output file follows privseg's rules (never clobbered, never the input)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import privseg.inference.export as export_mod
from privseg.cli.app import app
from privseg.config import Config, DataConfig
from privseg.core.errors import PrivsegError
from privseg.inference.export import METADATA_KEY, export_checkpoint
from privseg.models import build_model
from privseg.models.checkpoint import load_checkpoint, save_checkpoint

runner = CliRunner()
# torch 2.13 deprecates TorchScript; the tests load the file the way a user of torch would.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated")


@pytest.fixture(scope="module", params=["unet", "monet"])
def checkpoint(request, tmp_path_factory):
    cfg = Config().replace(
        **{
            "data.resolution": 32,
            "data.hu_window": [-100.0, 300.0],
            "data.spacing": 1.5,
            "data.labels": [1],
            "model.name": request.param,
            "model.features": 8,
        }
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(path, build_model(cfg.model).state_dict(), cfg)
    return path


def _batch(n: int = 5) -> torch.Tensor:
    """Another batch size than the export traces with (2) or checks with (3)."""
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(7))


def _expected(checkpoint, x: torch.Tensor) -> np.ndarray:
    model, _, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        return model(x).numpy()


def _check_metadata(meta: dict) -> None:
    assert meta["hu_min"] == -100.0 and meta["hu_max"] == 300.0
    assert meta["resolution"] == 32 and meta["spacing"] == 1.5 and meta["labels"] == [1]
    assert meta["checkpoint_format"] == "privseg-checkpoint/1"
    assert meta["classes"] == [{"channel": 0, "name": "foreground", "labels": [1]}]


def test_torchscript_matches_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "model.pt"
    info = export_checkpoint(checkpoint, out, "torchscript")
    assert info["format"] == "torchscript" and info["input_shape"] == ["batch", 1, 32, 32]
    assert info["out_channels"] == 1 and info["max_abs_diff"] <= 1e-4
    assert out.stat().st_mode & 0o777 == 0o600
    extra = {METADATA_KEY: ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    x = _batch()
    with torch.no_grad():
        got = loaded(x).numpy()
    expected = _expected(checkpoint, x)
    assert got.shape == expected.shape == (5, 1, 32, 32)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    _check_metadata(json.loads(extra[METADATA_KEY]))


def test_onnx_matches_checkpoint(checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = tmp_path / "model.onnx"
    result = runner.invoke(
        app, ["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "model.onnx" in result.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = _batch()
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    expected = _expected(checkpoint, x)
    assert got.shape == expected.shape == (5, 1, 32, 32)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    props = session.get_modelmeta().custom_metadata_map
    _check_metadata(json.loads(props[METADATA_KEY]))
    assert json.loads(props["privseg.hu_min"]) == -100.0


def _cli(*args: str):
    return runner.invoke(app, ["export", *args])


def test_existing_out_needs_overwrite(checkpoint, tmp_path):
    out = tmp_path / "model.pt"
    out.write_bytes(b"somebody else's file")
    args = ["--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(out)]
    result = _cli(*args)
    assert result.exit_code == 2
    assert "--overwrite" in result.output and "Traceback" not in result.output
    assert out.read_bytes() == b"somebody else's file"
    result = _cli(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "input float32 [batch, 1, " in result.output  # not read as rich markup
    torch.jit.load(str(out))


def test_out_may_not_be_the_checkpoint(checkpoint):
    before = checkpoint.read_bytes()
    result = _cli(
        "--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(checkpoint),
        "--overwrite",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "input" in result.output and "Traceback" not in result.output
    assert checkpoint.read_bytes() == before


def test_unknown_format_and_wrong_suffix(checkpoint, tmp_path):
    result = _cli("--checkpoint", str(checkpoint), "--format", "tflite", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "'tflite'" in result.output and "torchscript" in result.output
    with pytest.raises(PrivsegError, match=r"\.onnx"):
        export_checkpoint(checkpoint, tmp_path / "model.pt", "onnx")
    assert not list(tmp_path.iterdir())


def test_missing_onnx_says_how_to_install(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(PrivsegError, match=r"pip install 'privseg\[export\]'"):
        export_checkpoint(checkpoint, tmp_path / "model.onnx", "onnx")
    assert not list(tmp_path.iterdir())


def test_export_that_differs_is_not_written(checkpoint, tmp_path, monkeypatch):
    run = export_mod._run_torchscript

    def off_by_a_bit(path, x):
        got, meta = run(path, x)
        return got + 1e-3, meta

    monkeypatch.setattr(export_mod, "_run_torchscript", off_by_a_bit)
    out = tmp_path / "model.pt"
    out.write_bytes(b"previous export")
    with pytest.raises(PrivsegError, match="does not reproduce"):
        export_checkpoint(checkpoint, out, "torchscript", overwrite=True)
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.skipif(
    "classes" not in DataConfig.__dataclass_fields__, reason="needs multi-class data.classes"
)
def test_multi_class_export_names_its_channels(tmp_path):
    classes = {"liver": [1, 2], "tumour": [2]}
    cfg = Config().replace(**{"data.resolution": 32, "data.classes": classes, "model.features": 8})
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, build_model(cfg.model, 2).state_dict(), cfg)
    out = tmp_path / "model.pt"
    info = export_checkpoint(path, out, "torchscript")
    assert info["out_channels"] == 2 and info["max_abs_diff"] <= 1e-4
    extra = {METADATA_KEY: ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    x = _batch(4)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), _expected(path, x), atol=1e-4, rtol=0)
    meta = json.loads(extra[METADATA_KEY])
    assert [(c["channel"], c["name"], c["labels"]) for c in meta["classes"]] == [
        (0, "liver", [1, 2]),
        (1, "tumour", [2]),
    ]
