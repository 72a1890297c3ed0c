"""Segmentation metrics on boolean numpy masks (3D per patient volume, as MSD reports them)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape.

    Both empty = 1.0 (a correct "nothing here"); exactly one empty = 0.0.
    """
    pred, target = _as_bool(pred, target)
    total = int(pred.sum()) + int(target.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, target).sum()) / total


def _as_bool(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must have the same shape")
    return pred, target


def _surface(mask: np.ndarray) -> np.ndarray:
    # Border voxels: in the mask, with a face-neighbour outside it (the image edge counts as
    # outside, so a mask touching the edge still has a closed surface).
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box plus one voxel (clipped to the image).

    Exact: every surface voxel of both masks lies inside, the margin keeps each surface as it
    was (an image edge stays an edge), and distances between voxels inside do not change. On a
    native CT grid (512 x 512 x hundreds of slices) this saves most of the distance transforms.
    """
    where = np.argwhere(pred | target)
    lo = np.maximum(where.min(axis=0) - 1, 0)
    hi = np.minimum(where.max(axis=0) + 2, pred.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return pred[box], target[box]


def surface_distances(
    pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, float]:
    """Symmetric surface distances in the units of ``spacing`` (one value per array axis).

    ``hd95``: the larger of the two directed 95th-percentile surface distances (MONAI's
    ``compute_hausdorff_distance(percentile=95)``). ``assd``: mean over the pooled distances of
    both surfaces to the other (MONAI's ``compute_average_surface_distance(symmetric=True)``).
    NaN when either mask is empty: a distance to nothing is undefined, and a number such as
    the image diagonal would make averages depend on image size. Callers use ``nanmean``.
    """
    pred, target = _as_bool(pred, target)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} needs one value per axis of {pred.shape}")
    if not pred.any() or not target.any():
        return {"hd95": math.nan, "assd": math.nan}
    pred, target = _crop(pred, target)
    sp, st = _surface(pred), _surface(target)
    # Distance of every voxel to the nearest surface voxel of the other mask.
    to_target = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    d_pt, d_tp = to_target[sp], to_pred[st]
    hd95 = max(float(np.percentile(d_pt, 95)), float(np.percentile(d_tp, 95)))
    assd = float((d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size))
    return {"hd95": hd95, "assd": assd}
