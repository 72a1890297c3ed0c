"""PNG figures for run folders, attack folders and study reports.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, never through
``pyplot``: no global backend switch, no figure registry to leak, safe inside training processes.
Every ``plot_*`` PNG is written atomically at :data:`DPI`, with an SVG of the same stem next
to it; :func:`reconstruction_grid_png`
returns its bytes (110 dpi) for the attack runner to write.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from privseg.core.io import atomic_write_bytes
from privseg.core.results import SETTINGS
from privseg.report.format import fmt

DPI = 150
STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
SETTING_COLOURS = dict(zip(SETTINGS, ("#1f77b4", "#2ca02c", "#ff7f0e", "#d62728"), strict=True))
DP_COLOUR, PLAIN_COLOUR = "#d62728", "#4c72b0"


@contextlib.contextmanager
def _style() -> Iterator[None]:
    with matplotlib.rc_context(STYLE):
        yield


def _save(fig: Figure, path: str | Path) -> Path:
    """Render to PNG and to SVG (same stem, text kept as text) in memory, then write each
    atomically (a crash never leaves half a file). Returns the PNG's path."""
    FigureCanvasAgg(fig)
    path = Path(path)
    for kind, target in (("png", path), ("svg", path.with_suffix(".svg"))):
        buf = io.BytesIO()
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "privseg"}):
            fig.savefig(buf, format=kind, dpi=DPI, bbox_inches="tight", metadata=_METADATA[kind])
        atomic_write_bytes(target, buf.getvalue())
    return path


_METADATA: dict[str, dict[str, Any]] = {"png": {}, "svg": {"Date": None}}
"""No creation date in the SVG, so the same figure gives the same file."""


def _num(v: Any) -> float:
    """None and non-numbers become NaN, which matplotlib draws as a gap."""
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _x_key(history: Sequence[dict[str, Any]]) -> str:
    return "round" if history and "round" in history[0] else "epoch"


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_learning_curve(
    history: Sequence[dict[str, Any]], path: str | Path, title: str = ""
) -> Path:
    """Validation Dice (overall and per site) and training loss of one run, per round/epoch."""
    with _style():
        fig = Figure(figsize=(6.4, 4.0))
        ax = fig.add_subplot()
        if not history:
            _empty(ax, "no training history")
        else:
            key = _x_key(history)
            x = [_num(h.get(key)) for h in history]
            sites = sorted({s for h in history for s in (h.get("val_dice_sites") or {})})
            for site in sites if len(sites) > 1 else []:
                ax.plot(
                    x,
                    [_num((h.get("val_dice_sites") or {}).get(site)) for h in history],
                    lw=1,
                    ls="--",
                    alpha=0.7,
                    label=f"val Dice {site}",
                )
            ax.plot(
                x,
                [_num(h.get("val_dice")) for h in history],
                lw=2,
                marker="o",
                ms=4,
                color="black",
                label="val Dice (mean)",
            )
            ax.set_xlabel(key)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("validation Dice")
            ax.set_ylim(0, 1)
            loss = [_num(h.get("train_loss")) for h in history]
            if any(math.isfinite(v) for v in loss):
                ax2 = ax.twinx()
                ax2.plot(x, loss, color="grey", lw=1.5, ls=":", label="train loss")
                ax2.set_ylabel("train loss", color="grey")
                ax2.spines["right"].set_visible(True)
                ax2.grid(False)
                lines = ax.get_legend_handles_labels()
                lines2 = ax2.get_legend_handles_labels()
                ax.legend(
                    lines[0] + lines2[0],
                    lines[1] + lines2[1],
                    loc="upper center",
                    bbox_to_anchor=(0.5, -0.16),
                    ncols=3,
                    frameon=False,
                )  # below the axes: rising Dice and falling loss leave no free corner
            else:
                ax.legend(loc="lower right")
        ax.set_title(title)
        return _save(fig, path)


def plot_learning_curves(runs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Validation Dice of every setting; epoch-based and round-based runs in separate panels."""
    panels: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("history"):
            panels.setdefault(_x_key(r["history"]), []).append(r)
    order = [k for k in ("epoch", "round") if k in panels]
    with _style():
        fig = Figure(figsize=(5.2 * max(1, len(order)), 4.0))
        if not order:
            _empty(fig.add_subplot(), "no training history")
        for i, key in enumerate(order, 1):
            ax = fig.add_subplot(1, len(order), i)
            dp_runs = [r for r in panels[key] if r.get("dp")]
            for r in panels[key]:
                colour = SETTING_COLOURS.get(str(r.get("setting")))
                alpha = 1.0
                if r.get("dp") and len(dp_runs) > 1:  # lighter red for smaller epsilon
                    alpha = 0.4 + 0.6 * dp_runs.index(r) / (len(dp_runs) - 1)
                h = r["history"]
                ax.plot(
                    [_num(e.get(key)) for e in h],
                    [_num(e.get("val_dice")) for e in h],
                    marker="o",
                    ms=3,
                    lw=1.8,
                    color=colour,
                    alpha=alpha,
                    label=str(r.get("label") or r.get("setting")),
                )
            ax.set_xlabel(key)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("validation Dice")
            ax.set_ylim(0, 1)
            ax.set_title(f"per {key}")
            ax.legend(loc="lower right")
        return _save(fig, path)


def plot_privacy_utility(
    points: Sequence[tuple[float, float, float, str]],
    references: Sequence[tuple[str, float]],
    path: str | Path,
) -> Path:
    """Dice against epsilon (log x) for DP runs, with non-private references as horizontal lines.

    ``points``: (epsilon, dice mean, dice sd, label); ``references``: (label, dice).
    """
    with _style():
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        pts = sorted(p for p in points if math.isfinite(_num(p[0])) and _num(p[0]) > 0)
        if pts:
            xs, ys, sds = [p[0] for p in pts], [_num(p[1]) for p in pts], [_num(p[2]) for p in pts]
            ax.errorbar(
                xs,
                ys,
                yerr=[0 if math.isnan(s) else s for s in sds],
                marker="o",
                color=DP_COLOUR,
                capsize=4,
                lw=2,
                label="Federated DP",
            )
            for x, y in zip(xs, ys, strict=True):
                if math.isfinite(y):
                    ax.annotate(
                        f"{y:.3f}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9
                    )
            ax.set_xscale("log")
            ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
            ax.set_xticks(xs, [f"{x:.3g}" for x in xs])  # label the epsilons actually run
            ax.xaxis.set_minor_formatter(NullFormatter())
        styles = ["-", "--", ":", "-."]
        for i, (label, dice) in enumerate(references):
            if math.isfinite(_num(dice)):
                ax.axhline(
                    dice,
                    ls=styles[i % len(styles)],
                    lw=1.5,
                    color=f"C{i}",
                    label=f"{label} ({dice:.3f})",
                )
        ax.set_xlabel("ε (spent, log scale)")
        ax.set_ylabel("test Dice (mean over patients)")
        ax.set_ylim(0, 1)
        ax.set_title("Privacy–utility trade-off")
        ax.legend(loc="best")
        return _save(fig, path)


def plot_dp_cost(
    rows: Sequence[tuple[str, float, bool]], path: str | Path, unit: str = "round"
) -> Path:
    """Bar chart of seconds per round (or epoch); DP bars red, non-private blue."""
    with _style():
        fig = Figure(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.4))
        ax = fig.add_subplot()
        labels = [r[0] for r in rows]
        values = [_num(r[1]) for r in rows]
        bars = ax.bar(
            range(len(rows)),
            [0 if math.isnan(v) else v for v in values],
            color=[DP_COLOUR if r[2] else PLAIN_COLOUR for r in rows],
        )
        for b, v in zip(bars, values, strict=True):
            ax.annotate(
                fmt(v, ".2f"),
                (b.get_x() + b.get_width() / 2, b.get_height()),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=9,
            )
        ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right")
        ax.set_ylabel(f"seconds per {unit}")
        ax.set_title("Training-time cost of DP")
        ax.margins(y=0.12)
        ax.grid(axis="x", visible=False)
        return _save(fig, path)


def reconstruction_grid_png(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], result: dict[str, Any]
) -> bytes:
    """Originals (top row) over their matched reconstructions (bottom row), as PNG bytes.

    At most 8 pairs; titled with the attack's setting (``result`` is the attack's result dict)
    and each reconstruction's PSNR / SSIM, so the image stands on its own next to the report.
    """
    pairs = pairs[:8]
    cols = max(1, len(pairs))
    fig = Figure(figsize=(max(4.5, 1.9 * cols), 4.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, cols, squeeze=False)
    for c, (orig, rec) in enumerate(pairs):
        for r, img in enumerate((orig, rec)):
            axes[r][c].imshow(img, cmap="gray", vmin=0.0, vmax=1.0)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[0][c].set_title(f"target {c}", fontsize=8)
        row = result["targets"][c] if c < len(result["targets"]) else {}
        if row:
            axes[1][c].set_title(f"{row['psnr']:.1f} dB / {row['ssim']:.2f}", fontsize=8)
    axes[0][0].set_ylabel("original")
    axes[1][0].set_ylabel("reconstruction")
    eps = result.get("epsilon")
    setting = "no DP" if not result["dp"] else f"DP-SGD ε={eps:g}" if eps else "DP-SGD"
    fig.suptitle(
        f"{result['threat']} B={result['batch_size']} mask={result['mask_mode']}, {setting}\n"
        f"PSNR median {result['psnr_median']:.1f} dB "
        f"(chance {result['chance_psnr_median']:.1f}, prior {result['prior_psnr_median']:.1f})",
        fontsize=9,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
