"""A PNG a radiologist can glance at: a few axial slices with the predicted outline per class."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from privseg.core.io import atomic_write_bytes

#: One outline colour per class (tab10), in class order.
COLOURS = ("#ff7f0e", "#d62728", "#2ca02c", "#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def preview_slices(mask: np.ndarray, n: int) -> list[int]:
    """``n`` axial slice indices spread over the predicted foreground (or the whole volume)."""
    z = np.flatnonzero(mask.any(axis=(0, 1)))
    lo, hi = (int(z[0]), int(z[-1])) if len(z) else (0, mask.shape[2] - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, n + 2)[1:-1]}) or [lo]


def _radiological(volume: np.ndarray, z: int) -> np.ndarray:
    """Axial slice ``z`` of a canonical RAS volume, for ``imshow(origin="lower")``: the
    patient's right on the viewer's left, anterior up."""
    return volume[::-1, :, z].T


def preview_png(
    path: Path,
    hu: np.ndarray,
    mask: np.ndarray,
    hu_window: Sequence[float],
    classes: Sequence[str],
    zooms: Sequence[float],
    n: int = 4,
) -> None:
    """Write ``path``: ``n`` slices of canonical ``hu`` [X, Y, Z] in the training HU window,
    radiological view (patient's right on the left, anterior up), each class outlined."""
    slices = preview_slices(mask, n)
    fig = Figure(figsize=(2.6 * len(slices), 3.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(slices), squeeze=False)[0]
    aspect = float(zooms[1]) / float(zooms[0])
    for ax, z in zip(axes, slices, strict=True):
        ax.imshow(
            _radiological(hu, z),
            cmap="gray",
            vmin=hu_window[0],
            vmax=hu_window[1],
            origin="lower",
            aspect=aspect,
        )
        for k, name in enumerate(classes):
            channel = _radiological((mask >> k) & 1, z).astype(float)
            if channel.any():
                ax.contour(
                    channel,
                    levels=[0.5],
                    colors=[COLOURS[k % len(COLOURS)]],
                    linewidths=1.0,
                    origin="lower",
                )
            if ax is axes[0]:
                ax.plot([], [], color=COLOURS[k % len(COLOURS)], label=name)
        ax.set_title(f"slice {z}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes):
        axes[0].legend(loc="lower left", fontsize=7, frameon=False, labelcolor="white")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
