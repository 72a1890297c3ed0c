"""Metrics (Dice, HD95/ASSD against MONAI) and evaluate_split on a fake split and fake models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
)
from torch import nn

from privseg.config import DataConfig
from privseg.core.results import MODEL_GRID_UNITS, NATIVE_UNITS
from privseg.data.cache import NativeGrid
from privseg.data.preprocess import label_to_model_target, mask_to_image_space
from privseg.evaluation import dice, evaluate_split, surface_distances


def cube(shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


# ---- dice ------------------------------------------------------------------------------------
def test_dice_edge_cases_and_a_known_overlap() -> None:
    empty = np.zeros((2, 4, 4), dtype=bool)
    full = np.ones((2, 4, 4), dtype=bool)
    assert dice(empty, empty) == 1.0
    assert dice(full, empty) == 0.0 and dice(empty, full) == 0.0
    a = cube((1, 4, 4), (0, 0, 0), (1, 2, 4))  # 8 voxels
    b = cube((1, 4, 4), (0, 1, 0), (1, 3, 4))  # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same shape"):
        dice(a, full)


# ---- surface distances -----------------------------------------------------------------------
def monai_distances(pred: np.ndarray, target: np.ndarray, spacing: tuple) -> tuple[float, float]:
    p = torch.from_numpy(pred)[None, None].float()
    t = torch.from_numpy(target)[None, None].float()
    hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)
    asd = compute_average_surface_distance(
        p, t, include_background=True, symmetric=True, spacing=spacing
    )
    return float(hd), float(asd)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.8, 0.8)])
def test_surface_distances_agree_with_monai(spacing: tuple) -> None:
    pred = cube((10, 16, 16), (2, 3, 3), (7, 10, 9))
    target = cube((10, 16, 16), (3, 5, 4), (9, 12, 12))
    ours = surface_distances(pred, target, spacing=spacing)
    hd, asd = monai_distances(pred, target, spacing)
    assert ours["hd95"] == pytest.approx(hd, rel=1e-5)
    assert ours["assd"] == pytest.approx(asd, rel=1e-5)
    assert ours["hd95"] > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surface_distances_agree_with_monai_on_random_anisotropic_masks(seed: int) -> None:
    """Blobs that touch the image edge or not: the bounding-box crop must not change a thing."""
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    shape, spacing = (30, 24, 9), (0.74, 0.74, 3.0)
    pred, target = (ndimage.gaussian_filter(rng.random(shape), 2) > 0.52 for _ in range(2))
    ours = surface_distances(pred, target, spacing=spacing)
    hd, asd = monai_distances(pred, target, spacing)
    assert ours["hd95"] == pytest.approx(hd, rel=1e-6)
    assert ours["assd"] == pytest.approx(asd, rel=1e-6)
    as_batch = (torch.from_numpy(m)[None, None] for m in (pred, target))
    assert dice(pred, target) == pytest.approx(float(compute_dice(*as_batch)))


def test_surface_distances_of_a_shift_and_of_identical_masks() -> None:
    a = cube((4, 20, 20), (0, 5, 5), (4, 10, 10))
    shifted = np.roll(a, 3, axis=2)
    assert surface_distances(a, shifted)["hd95"] == pytest.approx(3.0)
    assert surface_distances(a, a) == {"hd95": 0.0, "assd": 0.0}


def test_surface_distances_are_nan_when_a_mask_is_empty() -> None:
    a = cube((2, 8, 8), (0, 2, 2), (2, 5, 5))
    empty = np.zeros_like(a)
    for p, t in [(a, empty), (empty, a), (empty, empty)]:
        d = surface_distances(p, t)
        assert math.isnan(d["hd95"]) and math.isnan(d["assd"])


# ---- evaluate_split --------------------------------------------------------------------------
class FakeSplit:
    """Two patients of 5 slices; the image is the label, slightly blurred into [0, 1]."""

    def __init__(self, n_patients: int = 2) -> None:
        rng = np.random.default_rng(0)
        self._vols = []
        for i in range(n_patients):
            labels = np.zeros((5, 16, 16), dtype=np.uint8)
            labels[1:4, 4 + i : 10, 5:11] = 1  # slices 0 and 4 are empty
            images = (labels * 0.8 + rng.uniform(0, 0.1, labels.shape)).astype(np.float16)
            self._vols.append((f"case_{i}", images, labels))

    def volumes(self):  # noqa: ANN201
        yield from self._vols


class Oracle(nn.Module):
    """Predicts the ground truth (thresholds the image); records how it was called."""

    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(40.0 * sign))
        self.calls: list[tuple[bool, bool, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled(), x.shape[0]))
        assert x.dtype == torch.float32 and x.shape[1] == 1
        return self.scale * (x - 0.5)


class Zeros(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, -10.0)


def test_perfect_model_scores_one_and_mode_is_restored() -> None:
    model = Oracle().train()
    res = evaluate_split(model, FakeSplit(), batch_size=3)
    assert res["dice"] == 1.0 and res["slice_dice"] == 1.0
    assert res["dice_sd"] == 0.0 and res["hd95"] == 0.0
    assert res["n_patients"] == 2
    assert [p["id"] for p in res["patients"]] == ["case_0", "case_1"]
    assert all(p["dice"] == 1.0 for p in res["patients"])
    # eval mode, no autograd, chunks of <= 3 slices; then the train flag is back
    assert {c[:2] for c in model.calls} == {(False, False)}
    assert [c[2] for c in model.calls] == [3, 2, 3, 2]
    assert model.training
    model.eval()
    evaluate_split(model, FakeSplit())
    assert not model.training


def test_all_background_model_scores_zero_with_nan_distances() -> None:
    res = evaluate_split(Zeros(), FakeSplit())
    assert res["dice"] == 0.0 and res["slice_dice"] == 0.0
    assert math.isnan(res["hd95"]) and math.isnan(res["patients"][0]["hd95"])


def test_inverted_model_scores_zero_dice_but_finite_distances() -> None:
    res = evaluate_split(Oracle(sign=-1.0), FakeSplit())
    assert res["dice"] == 0.0
    assert 0 < res["hd95"] < 16 and 0 < res["assd"] < res["hd95"]


def test_empty_split_does_not_crash() -> None:
    res = evaluate_split(Oracle(), FakeSplit(n_patients=0))
    assert res["n_patients"] == 0 and res["patients"] == []
    assert math.isnan(res["dice"]) and math.isnan(res["hd95"]) and math.isnan(res["slice_dice"])


# ---- scoring on the original grid ----------------------------------------------------------
class NativeSplit:
    """One case on an anisotropic grid (X, Y, Z) = (40, 28, 7), spacing (0.7, 0.9, 2.5) mm; the
    model-grid images are its resized label, so the Oracle predicts the resized label."""

    SHAPE, SPACING = (40, 28, 7), (0.7, 0.9, 2.5)

    def __init__(self, folder: Path) -> None:
        label = np.zeros(self.SHAPE, dtype=np.uint8)
        label[9:31, 5:19, 1:6] = 1
        label[12:15, 19:22, 2:4] = 1  # a thin spur the 16 x 16 model grid distorts
        self.native_label = label.astype(bool)
        np.savez_compressed(folder / "0.npz", label=label)
        self.labels = label_to_model_target(label, DataConfig(resolution=16))  # [Z, 16, 16]
        self.images = (self.labels * 0.8 + 0.05).astype(np.float16)
        self.native = {"case_0": NativeGrid(self.SHAPE, self.SPACING, folder / "0.npz")}

    def volumes(self):  # noqa: ANN201
        yield "case_0", self.images, self.labels


def test_metrics_on_the_native_grid_in_mm_agree_with_monai(tmp_path: Path) -> None:
    split = NativeSplit(tmp_path)
    res = evaluate_split(Oracle(), split)
    assert res["hd95_units"] == res["assd_units"] == NATIVE_UNITS == "mm"
    # what predict would write: the model-grid mask mapped back to the case's grid
    pred = mask_to_image_space(split.labels, split.SHAPE) > 0
    hd, asd = monai_distances(pred, split.native_label, split.SPACING)
    patient = res["patients"][0]
    assert patient["hd95"] == pytest.approx(hd, rel=1e-6) and hd > 0
    assert patient["assd"] == pytest.approx(asd, rel=1e-6)
    assert patient["dice"] == pytest.approx(dice(pred, split.native_label))
    assert 0.5 < patient["dice"] < 1.0
    assert res["slice_dice"] == 1.0  # slice Dice stays on the model grid
    # the same split without its native grid is scored on the model grid, and says so
    split.native = {}
    plain = evaluate_split(Oracle(), split)
    assert plain["hd95_units"] == MODEL_GRID_UNITS and plain["dice"] == 1.0
    assert plain["hd95"] == 0.0


def test_native_scoring_needs_every_slice(tmp_path: Path) -> None:
    split = NativeSplit(tmp_path)
    split.images, split.labels = split.images[:5], split.labels[:5]
    with pytest.raises(Exception, match="every slice"):
        evaluate_split(Oracle(), split)
