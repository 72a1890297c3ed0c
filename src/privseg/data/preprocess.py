"""Volumes to model-ready axial slices, and model masks back to image space.

Intensities are normalised with the fixed HU window only: per-patient statistics (mean, std,
percentiles) would leak information about the patient into every slice and break the promise
that a slice depends on that slice alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from privseg.config import DataConfig


def window(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map HU linearly so that ``lo`` -> 0 and ``hi`` -> 1, clipping outside, as float32."""
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def map_labels(label: np.ndarray, keep: Sequence[int] = ()) -> np.ndarray:
    """Binary foreground: every value > 0 when ``keep`` is empty, else only the listed values."""
    fg = label > 0 if not keep else np.isin(label, list(keep))
    return fg.astype(np.uint8)


def _resize(stack: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Resize a [Z, H, W] stack in-plane: antialiased bilinear for images, nearest for masks."""
    if stack.shape[1:] == size:
        return stack
    if len(stack) == 0:  # no slice selected (interpolate cannot take an empty batch)
        return np.zeros((0, *size), dtype=np.uint8 if mode == "nearest" else np.float32)
    if mode == "nearest":  # torch's "nearest-exact": the source pixel under each target centre
        rows, cols = (_nearest_index(n, m) for n, m in zip(stack.shape[1:], size, strict=True))
        return stack[:, rows][:, :, cols]
    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[:, 0].numpy()


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def image_to_model_input(image_hu: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """A CT volume [X, Y, Z] in HU -> windowed axial slices float32 [Z, R, R] in [0, 1]."""
    lo, hi = cfg.hu_window
    slices = window(np.moveaxis(image_hu, -1, 0), lo, hi)
    r = cfg.resolution
    return np.clip(_resize(slices, (r, r), "bilinear"), 0.0, 1.0)


def label_to_model_target(label: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """A label volume [X, Y, Z] -> binary axial masks uint8 [Z, R, R]."""
    masks = map_labels(np.moveaxis(label, -1, 0), cfg.labels)
    return _resize(masks, (cfg.resolution, cfg.resolution), "nearest")


def mask_to_image_space(mask: np.ndarray, shape_xyz: Sequence[int]) -> np.ndarray:
    """A predicted mask [Z, R, R] -> uint8 [X, Y, Z] on the image grid (nearest neighbour)."""
    x, y, z = (int(s) for s in shape_xyz)
    if mask.ndim != 3 or mask.shape[0] != z:
        raise ValueError(f"mask shape {mask.shape} does not match {z} slices of {tuple(shape_xyz)}")
    out = _resize((np.asarray(mask) > 0).astype(np.uint8), (x, y), "nearest")
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


def select_slices(
    foreground: np.ndarray, policy: str, empty_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Indices of the slices to keep, sorted.

    ``foreground`` is a bool per slice. "all" keeps every slice; "foreground" keeps those with
    foreground plus ``round(empty_fraction * n_foreground)`` empty slices drawn with ``rng``.
    """
    if policy == "all":
        return np.arange(len(foreground))
    fg = np.flatnonzero(foreground)
    empty = np.flatnonzero(~foreground)
    n_empty = min(len(empty), int(round(empty_fraction * len(fg))))
    picked = rng.choice(empty, size=n_empty, replace=False) if n_empty else empty[:0]
    return np.sort(np.concatenate([fg, picked]))


def volume_to_slices(
    image_hu: np.ndarray,
    label: np.ndarray,
    cfg: DataConfig,
    *,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One volume [X, Y, Z] -> (images float32 [N, R, R], masks uint8 [N, R, R], z int [N]).

    Slices are chosen on the full-resolution mask, so a small structure that vanishes when
    downsampled still counts as foreground.
    """
    foreground = map_labels(label, cfg.labels).any(axis=(0, 1))
    z = select_slices(foreground, cfg.slice_policy, cfg.empty_fraction, rng)
    images = image_to_model_input(image_hu[:, :, z], cfg)
    masks = label_to_model_target(label[:, :, z], cfg)
    return images, masks, z.astype(np.int32)
