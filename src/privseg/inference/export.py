"""Export a checkpoint's network as TorchScript or ONNX, for use outside privseg.

A checkpoint needs privseg (and its model code) to load; an exported file needs only
``torch`` (TorchScript) or any ONNX runtime. The file carries what a user must know to feed
it the same slices privseg trains on (HU window, resolution, spacing, labels, orientation),
because a network given differently preprocessed input silently gives wrong masks.

Every export is checked before it is published: the written bytes are loaded back with the
runtime a user would use and must reproduce the checkpoint model's logits within
:data:`TOLERANCE` on a batch of another size than the one traced, so a dynamic batch that did
not survive the export is caught here rather than by the user.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privseg.config import Config
from privseg.core.errors import PrivsegError
from privseg.core.io import atomic_write_bytes
from privseg.core.output import check_output_file

FORMATS = {"torchscript": (".pt",), "onnx": (".onnx",)}
"""Export format -> accepted file suffixes."""
TOLERANCE = 1e-4
"""Largest absolute logit difference accepted between the exported file and the checkpoint."""
ONNX_OPSET = 17
"""17: the oldest opset with everything the models use; the widest range of runtimes runs it."""
METADATA_KEY = "privseg.json"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
_TRACE_BATCH, _CHECK_BATCH = 2, 3  # different sizes: the check proves the batch axis is dynamic


def export_checkpoint(
    checkpoint: Path, out: Path, fmt: str, *, overwrite: bool = False
) -> dict[str, Any]:
    """Write ``checkpoint``'s network to ``out`` as ``fmt`` ("torchscript" or "onnx").

    ``out`` is checked before any work (suffix, existing folder, not the checkpoint, an
    existing file only with ``overwrite``) and written atomically, only once the exported
    bytes reproduce the model. Returns the format, input shape, output channels and the
    measured largest absolute difference of the logits.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if fmt not in FORMATS:
        raise PrivsegError(
            f"export format {fmt!r} is invalid: allowed values are "
            + ", ".join(repr(f) for f in FORMATS)
        )
    if fmt == "onnx":
        _require_onnx()  # a missing extra is refused before the output is touched
    check_output_file(out, inputs=[checkpoint], suffixes=FORMATS[fmt], overwrite=overwrite)

    from privseg.models.checkpoint import load_checkpoint

    model, cfg, _ = load_checkpoint(checkpoint)
    model.eval()
    r = cfg.data.resolution
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(_TRACE_BATCH, 1, r, r, generator=gen)
    check = torch.rand(_CHECK_BATCH, 1, r, r, generator=gen)
    with torch.no_grad():
        expected = model(check).numpy()
    meta = export_metadata(cfg, checkpoint, out_channels=int(expected.shape[1]))
    text = json.dumps(meta, sort_keys=True)

    with tempfile.TemporaryDirectory(prefix="privseg-export-") as tmp:
        staged = Path(tmp) / f"model{FORMATS[fmt][0]}"
        if fmt == "torchscript":
            staged.write_bytes(_torchscript_bytes(model, example, text))
            got, stored = _run_torchscript(staged, check)
        else:
            staged.write_bytes(_onnx_bytes(model, example, meta, text))
            got, stored = _run_onnx(staged, check)
        same_shape = got.shape == expected.shape
        diff = float(np.max(np.abs(got - expected), initial=0.0)) if same_shape else np.inf
        if not diff <= TOLERANCE:  # also refuses NaN
            raise PrivsegError(
                f"the {fmt} export of {checkpoint} does not reproduce the model (output "
                f"{got.shape} vs {expected.shape}, largest logit difference {diff:.3g} > "
                f"{TOLERANCE:g}); nothing was written to {out}"
            )
        if stored != text:
            raise PrivsegError(f"the {fmt} export lost its {METADATA_KEY} metadata; not written")
        # The verified bytes are what gets published: nothing else ever reaches ``out``.
        atomic_write_bytes(out, staged.read_bytes())
    return {
        "format": fmt,
        "out": str(out),
        "input_shape": ["batch", 1, r, r],
        "out_channels": int(expected.shape[1]),
        "max_abs_diff": diff,
    }


def export_metadata(cfg: Config, checkpoint: Path, *, out_channels: int) -> dict[str, Any]:
    """The preprocessing facts stored next to the exported network (JSON-ready)."""
    from privseg import __version__
    from privseg.models.checkpoint import FORMAT

    data = cfg.data
    lo, hi = (float(v) for v in data.hu_window)
    r = data.resolution
    meta: dict[str, Any] = {
        "privseg_version": __version__,
        "checkpoint_format": FORMAT,
        "checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        "model": cfg.model.name,
        "features": cfg.model.features,
        "input": f"float32 [batch, 1, {r}, {r}] in [0, 1], named {INPUT_NAME!r}",
        "output": f"float32 logits [batch, {out_channels}, {r}, {r}], named {OUTPUT_NAME!r}: "
        "one channel per entry of classes, multi-label (classes may overlap): pixel in class "
        "k = sigmoid(logits[:, k]) > 0.5",
        "hu_min": lo,
        "hu_max": hi,
        "resolution": r,
        "spacing": data.spacing,
        "labels": list(data.labels),
        "nan_hu": data.nan_hu,
        "preprocessing": (
            "reorient the CT to RAS+ (nibabel.as_closest_canonical); take axial slices "
            "[x, y] (the last axis is z); map HU linearly so hu_min -> 0 and hu_max -> 1, "
            "clipping to [0, 1]; "
            + (
                f"resample each slice to {data.spacing} mm pixels (antialiased bilinear), "
                f"then centre-crop or zero-pad to {r} x {r}"
                if data.spacing is not None
                else f"resize each slice to {r} x {r} (antialiased bilinear)"
            )
        ),
        "classes": _classes(data),
    }
    return meta


def _classes(data: Any) -> list[dict[str, Any]]:
    """Channel k's class name and the label values it was trained on ([] = every value > 0)."""
    from privseg.core.classes import Classes

    classes = Classes.of(data)
    return [
        {"channel": k, "name": name, "labels": list(values)}
        for k, (name, values) in enumerate(zip(classes.names, classes.values, strict=True))
    ]


def _require_onnx() -> None:
    """ONNX export needs two optional packages; say how to get them."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise PrivsegError(
            f"ONNX export needs {' and '.join(missing)}, which are not installed: "
            "pip install 'privseg[export]'"
        )


def _ignore_export_warnings() -> None:
    """Inside ``warnings.catch_warnings()``: silence warnings that say nothing about this
    export. torch 2.13 marks TorchScript (trace, save, load) and the TorchScript-based ONNX
    exporter deprecated,
    and GroupNorm's batch-size check warns while tracing although it only reads shapes; the
    round-trip check covers what they warn about."""
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings(
        "ignore", message=r"`torch\.jit\.(trace|trace_method|save|load)` is deprecated"
    )
    warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based ONNX")
    warnings.filterwarnings("ignore", message=r"The feature will be removed")
    warnings.filterwarnings("ignore", message=r"Constant folding - Only steps=1")


def _torchscript_bytes(model: nn.Module, example: torch.Tensor, meta: str) -> bytes:
    """Trace in eval mode: the models are plain conv nets without data-dependent branches, so
    the trace is the whole network and keeps a dynamic batch axis."""
    with warnings.catch_warnings(), torch.no_grad():
        _ignore_export_warnings()
        traced = torch.jit.trace(model, example)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={METADATA_KEY: meta})
    return buf.getvalue()


def _run_torchscript(path: Path, x: torch.Tensor) -> tuple[np.ndarray, str]:
    extra = {METADATA_KEY: ""}
    with warnings.catch_warnings():
        _ignore_export_warnings()
        loaded = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    with torch.no_grad():
        got = loaded(x).numpy()
    raw = extra[METADATA_KEY]
    return got, raw.decode() if isinstance(raw, bytes) else raw


def _onnx_bytes(model: nn.Module, example: torch.Tensor, meta: dict[str, Any], text: str) -> bytes:
    """ONNX through the TorchScript-based exporter (``dynamo=False``).

    torch >= 2.9 defaults to the torch.export-based exporter, which needs ``onnxscript`` (one
    more dependency, and its op coverage moves with every release); the TorchScript-based one
    is built into torch, works offline and handles these conv nets exactly. If a torch release
    drops it, the round-trip check in :func:`export_checkpoint` fails loudly rather than
    writing a wrong file.
    """
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        _ignore_export_warnings()
        torch.onnx.export(
            model,
            (example,),
            buf,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load_from_string(buf.getvalue())
    # The whole record as JSON (for programs), plus each fact as its own entry (for viewers
    # such as Netron, which list metadata_props as key/value pairs).
    props = {METADATA_KEY: text}
    props.update({f"privseg.{k}": json.dumps(v) for k, v in meta.items()})
    onnx.helper.set_model_props(proto, props)
    proto.producer_name = "privseg"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _run_onnx(path: Path, x: torch.Tensor) -> tuple[np.ndarray, str]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    stored = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "")
    return np.asarray(got), stored
