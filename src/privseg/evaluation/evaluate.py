"""Score a model on a slice split: predict every slice, stack per patient, 3D Dice and HD95.

A split that knows its cases' original grids and labels (a cache's test split) is scored
there: each stacked prediction is mapped back to the case's grid through the case's own
plane transform (``NativeGrid.to_native``, i.e.
:func:`~privseg.data.preprocess.mask_to_image_space`) and compared with the original label,
distances in mm. Other splits (validation) are scored on the model grid, in its voxels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from privseg.core.classes import FOREGROUND, probabilities_to_bits
from privseg.core.errors import DataError
from privseg.core.results import MODEL_GRID_UNITS, NATIVE_UNITS, nanmean
from privseg.evaluation.metrics import dice, surface_distances

#: Per-patient scores; with several classes, a patient's are the means over its classes.
METRICS = ("dice", "hd95", "assd")


class VolumeSource(Protocol):
    """What evaluation needs of a SliceSplit: ``(patient_id, images [Z,R,R], labels [Z,R,R])``."""

    def volumes(self) -> Any: ...


def _native_grids(split: VolumeSource) -> dict[str, Any]:
    """The split's cases with a label on their original grid (``SliceSplit.native``)."""
    grids = getattr(split, "native", None) or {}
    return {pid: g for pid, g in grids.items() if getattr(g, "label_path", None) is not None}


def _on_native_grid(
    patient_id: str, pred: np.ndarray, grid: Any
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(prediction, label, spacing in mm) on the case's original grid ``[X, Y, Z]``."""
    if len(pred) != grid.shape[2]:
        raise DataError(
            f"case {patient_id}: the split holds {len(pred)} of its {grid.shape[2]} slices; "
            "scoring on the original grid needs every slice (re-prepare the cache)"
        )
    return grid.to_native(pred), grid.label(), tuple(grid.spacing)


@torch.no_grad()
def predict_volume(
    model: nn.Module, images: np.ndarray, *, batch_size: int = 64, threshold: float = 0.5
) -> np.ndarray:
    """Class bit sets uint8 ``[Z, R, R]`` (bit k: class k's sigmoid > ``threshold``) for image
    slices ``[Z, R, R]``; with one class, the 0/1 mask. The model is already in eval mode."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    out = np.zeros(images.shape, dtype=np.uint8)
    for start in range(0, len(images), batch_size):
        chunk = np.asarray(images[start : start + batch_size], dtype=np.float32)
        x = torch.from_numpy(chunk)[:, None].to(device)
        prob = torch.sigmoid(model(x).float())
        out[start : start + len(chunk)] = probabilities_to_bits(prob, threshold)
    return out


def _score(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    return {"dice": dice(pred, target), **surface_distances(pred, target, spacing=spacing)}


def _summary(patients: list[dict[str, Any]]) -> dict[str, float]:
    scores = [p["dice"] for p in patients]
    n = len(scores)
    return {
        "dice": float(np.mean(scores)) if n else math.nan,
        "dice_sd": float(np.std(scores, ddof=1)) if n > 1 else (0.0 if n else math.nan),
        "hd95": nanmean([p["hd95"] for p in patients]),
        "assd": nanmean([p["assd"] for p in patients]),
    }


def evaluate_split(
    model: nn.Module,
    split: VolumeSource,
    *,
    classes: Sequence[str] = (FOREGROUND,),
    batch_size: int = 64,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Per-patient 3D Dice / HD95 / ASSD of ``model`` on ``split`` (a SliceSplit).

    Runs under ``torch.no_grad`` in eval mode and restores every submodule's previous
    train/eval flag, so it can be called in the middle of training. A slice is foreground where
    ``sigmoid(logit) > threshold``.

    When every case of the split has a label on its original grid (``split.native``, a cache's
    test split), Dice, HD95 and ASSD are computed there and distances are in mm
    (``hd95_units`` = :data:`~privseg.core.results.NATIVE_UNITS`); otherwise on the model grid in
    its voxels (:data:`~privseg.core.results.MODEL_GRID_UNITS`, spacing 1 per pixel and slice).

    Returns ``dice`` (mean over patient volumes), ``dice_sd`` (sample SD; 0.0 for one patient),
    ``hd95`` and ``assd`` (nanmean over patients; a patient with an empty prediction or label has
    NaN there), ``hd95_units`` / ``assd_units``, ``slice_dice`` (mean 2D Dice over model-grid
    slices whose label is non-empty), ``patients`` ([{"id", "dice", "hd95", "assd"}]) and
    ``n_patients``. An empty split gives NaN metrics and ``n_patients = 0``.

    With several ``classes`` (the model's channels, ``data.classes``), each is scored on its own
    and each patient holds its own ``classes``; a patient's top-level Dice, HD95 and ASSD are
    the means over its classes. ``classes`` ``{name: {dice, dice_sd, hd95, assd}}`` is always
    there (one "foreground" class by default).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size} is invalid: must be >= 1")
    grids = _native_grids(split)
    many = len(classes) > 1
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    patients: list[dict[str, Any]] = []
    slice_scores: list[float] = []
    native = bool(grids)
    try:
        for patient_id, images, labels in split.volumes():
            pred = predict_volume(model, images, batch_size=batch_size, threshold=threshold)
            target = np.asarray(labels)
            slice_scores += [dice(p, t) for p, t in zip(pred, target, strict=True) if t.any()]
            spacing: tuple[float, ...] = (1.0,) * target.ndim
            if native:
                if patient_id not in grids:
                    raise DataError(f"case {patient_id} has no label on its original grid")
                pred, target, spacing = _on_native_grid(patient_id, pred, grids[patient_id])
            per_class = {
                name: _score((pred >> k) & 1 > 0, (target >> k) & 1 > 0, spacing)
                for k, name in enumerate(classes)
            }
            mean = {m: nanmean([s[m] for s in per_class.values()]) for m in METRICS}
            patients.append(
                {"id": str(patient_id), **mean, **({"classes": per_class} if many else {})}
            )
    finally:
        for m, was_training in modes:
            m.train(was_training)
    per_class = {
        name: _summary([p["classes"][name] if many else p for p in patients]) for name in classes
    }
    return {
        **_summary(patients),
        "classes": per_class,
        "hd95_units": NATIVE_UNITS if native else MODEL_GRID_UNITS,
        "assd_units": NATIVE_UNITS if native else MODEL_GRID_UNITS,
        "slice_dice": float(np.mean(slice_scores)) if slice_scores else math.nan,
        "patients": patients,
        "n_patients": len(patients),
    }
