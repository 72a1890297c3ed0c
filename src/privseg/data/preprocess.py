"""Volumes to model-ready axial slices, and model masks back to image space.

Each case's in-plane geometry is one :class:`PlaneTransform` (a plain resize to
``data.resolution``, or with ``data.spacing`` a resample to that pixel size and a centred crop
or pad), used forward for training and inference and backward to map predictions to the
original grid.

Intensities are normalised with the fixed HU window only: per-patient statistics (mean, std,
percentiles) would leak information about the patient into every slice and break the promise
that a slice depends on that slice alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from privseg.config import DataConfig
from privseg.core.classes import Classes


def window(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map HU linearly so that ``lo`` -> 0 and ``hi`` -> 1, clipping outside, as float32."""
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def map_labels(label: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Label values -> the uint8 class bit set of ``cfg`` (one class: the 0/1 foreground)."""
    return Classes.of(cfg).encode(label)


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


@dataclass(frozen=True)
class PlaneTransform:
    """How one case's axial slices ``[X, Y]`` become model slices ``[R, R]``, and back.

    A slice is resized to ``size`` (antialiased bilinear for images, nearest for masks), then
    the model's R x R window is taken starting at ``start`` in the resized slice, centred: a
    negative start pads (images with 0, the HU window's minimum, i.e. air; masks with 0), a
    positive one crops. Without ``data.spacing`` the slice is resized straight to R x R
    (``size = (R, R)``, ``start = (0, 0)``); with it, ``size`` gives pixels of
    ``data.spacing`` mm (``round(n * voxel_mm / data.spacing)``, so within half a pixel over
    the field of view). :meth:`to_image` undoes the window and the resize exactly (what was
    cropped away comes back as background).
    """

    shape: tuple[int, int]
    size: tuple[int, int]
    start: tuple[int, int]
    resolution: int

    @classmethod
    def of(
        cls, shape_xyz: Sequence[int], spacing_xyz: Sequence[float] | None, cfg: DataConfig
    ) -> PlaneTransform:
        """The transform of a volume of ``shape_xyz`` voxels of ``spacing_xyz`` mm."""
        shape = (int(shape_xyz[0]), int(shape_xyz[1]))
        r = cfg.resolution
        if cfg.spacing is None:
            return cls(shape, (r, r), (0, 0), r)
        if spacing_xyz is None:
            raise ValueError(
                f"data.spacing = {cfg.spacing} mm needs the volume's voxel spacing; pass "
                "PlaneTransform.of(shape, spacing, cfg)"
            )
        size = tuple(
            max(1, round(n * float(mm) / cfg.spacing))
            for n, mm in zip(shape, spacing_xyz[:2], strict=True)
        )
        start = tuple((n - r) // 2 for n in size)
        return cls(shape, size, start, r)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, list[int] | int]:
        return {"size": list(self.size), "start": list(self.start), "resolution": self.resolution}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], shape_xyz: Sequence[int]) -> PlaneTransform:
        """Inverse of :meth:`to_dict` for a volume of ``shape_xyz``."""
        size, start = (tuple(int(v) for v in raw[k]) for k in ("size", "start"))
        if len(size) != 2 or len(start) != 2 or min(size) < 1:
            raise ValueError(f"invalid plane transform {raw!r}")
        shape = (int(shape_xyz[0]), int(shape_xyz[1]))
        return cls(shape, size, start, int(raw["resolution"]))  # type: ignore[arg-type]

    def _window(self) -> tuple[slice, slice, slice, slice]:
        """(model rows, model cols, resized rows, resized cols) where the two overlap."""
        out = []
        for n, s in zip(self.size, self.start, strict=True):
            lo, hi = max(0, -s), min(self.resolution, n - s)
            out.append((slice(lo, max(lo, hi)), slice(lo + s, max(lo, hi) + s)))
        (mx, rx), (my, ry) = out
        return mx, my, rx, ry

    def to_model(self, stack: np.ndarray, mode: str) -> np.ndarray:
        """Slices ``[Z, X, Y]`` -> ``[Z, R, R]`` (``mode``: "bilinear" images, "nearest" masks).

        Resized a chunk of slices at a time, so a fine ``data.spacing`` on a large slice never
        holds the whole resized stack (at most ~2^26 pixels, 256 MB of float32, per chunk).
        """
        r = self.resolution
        dtype = np.uint8 if mode == "nearest" else np.float32
        out = np.zeros((len(stack), r, r), dtype=dtype)
        mx, my, rx, ry = self._window()
        chunk = max(1, 2**26 // (self.size[0] * self.size[1]))
        for i in range(0, len(stack), chunk):
            resized = _resize(stack[i : i + chunk], self.size, mode)
            out[i : i + chunk, mx, my] = resized[:, rx, ry]
        return out

    def to_image(self, mask: np.ndarray) -> np.ndarray:
        """Model masks ``[Z, R, R]`` (0/1 or class bit sets) -> uint8 ``[Z, X, Y]`` on the
        original in-plane grid, values kept."""
        r = self.resolution
        if mask.ndim != 3 or mask.shape[1:] != (r, r):
            raise ValueError(f"mask shape {mask.shape} is not [Z, {r}, {r}]")
        canvas = np.zeros((len(mask), *self.size), dtype=np.uint8)
        mx, my, rx, ry = self._window()
        canvas[:, rx, ry] = np.asarray(mask)[:, mx, my]  # class bit sets survive nearest
        return _resize(canvas, self.shape, "nearest")


def image_to_model_input(
    image_hu: np.ndarray, cfg: DataConfig, plane: PlaneTransform | None = None
) -> np.ndarray:
    """A CT volume [X, Y, Z] in HU -> windowed axial slices float32 [Z, R, R] in [0, 1].

    ``plane`` (:meth:`PlaneTransform.of` the volume) is needed when ``data.spacing`` is set.
    """
    plane = plane or PlaneTransform.of(image_hu.shape, None, cfg)
    lo, hi = cfg.hu_window
    slices = window(np.moveaxis(image_hu, -1, 0), lo, hi)
    return np.clip(plane.to_model(slices, "bilinear"), 0.0, 1.0)


def label_to_model_target(
    label: np.ndarray, cfg: DataConfig, plane: PlaneTransform | None = None
) -> np.ndarray:
    """A label volume [X, Y, Z] -> axial class bit sets uint8 [Z, R, R] (see ``data.classes``)."""
    plane = plane or PlaneTransform.of(label.shape, None, cfg)
    return plane.to_model(map_labels(np.moveaxis(label, -1, 0), cfg), "nearest")


def mask_to_image_space(
    mask: np.ndarray, shape_xyz: Sequence[int], plane: PlaneTransform | None = None
) -> np.ndarray:
    """A predicted mask [Z, R, R] -> uint8 [X, Y, Z] on the image grid (nearest neighbour).

    ``plane`` is the volume's :class:`PlaneTransform` (the cache keeps each case's in its
    ``NativeGrid``); ``None`` is the plain resize used without ``data.spacing``.
    """
    x, y, z = (int(s) for s in shape_xyz)
    if mask.ndim != 3 or mask.shape[0] != z:
        raise ValueError(f"mask shape {mask.shape} does not match {z} slices of {tuple(shape_xyz)}")
    r = mask.shape[1]
    plane = plane or PlaneTransform((x, y), (r, r), (0, 0), r)
    if plane.shape != (x, y):
        raise ValueError(f"plane transform of a {plane.shape} slice, image is {(x, y)}")
    return np.ascontiguousarray(np.moveaxis(plane.to_image(mask), 0, -1))


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
    plane: PlaneTransform | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One volume [X, Y, Z] -> (images float32 [N, R, R], masks uint8 [N, R, R], z int [N]).

    Slices are chosen on the full-resolution mask, so a small structure that vanishes when
    downsampled still counts as foreground.
    """
    foreground = map_labels(label, cfg).any(axis=(0, 1))
    z = select_slices(foreground, cfg.slice_policy, cfg.empty_fraction, rng)
    images = image_to_model_input(image_hu[:, :, z], cfg, plane)
    masks = label_to_model_target(label[:, :, z], cfg, plane)
    return images, masks, z.astype(np.int32)
