"""Scoring of reconstructions, kept apart from the attack (breaching's ``analysis`` split).

Images are compared on the [0, 1] HU-window scale the model sees. PSNR is capped at
:data:`PSNR_CAP` so identical images give a finite, JSON-safe number. SSIM uses the usual
11-pixel Gaussian window (sigma 1.5, K1 0.01, K2 0.03); MS-SSIM is computed only when the image
is at least :data:`MS_SSIM_MIN_SIZE` pixels wide (five scales of that window need it) and is
reported as ``None`` otherwise, with the reason in :data:`MS_SSIM_NOTE`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from privseg.evaluation.metrics import dice

PSNR_CAP = 100.0
BODY_THRESHOLD = 0.05
MS_SSIM_MIN_SIZE = 160
MS_SSIM_NOTE = (
    f"MS-SSIM skipped: images under {MS_SSIM_MIN_SIZE} px cannot hold five scales of an "
    "11-px window"
)


def _t(x: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not torch.is_tensor(x) else x
    t = t.detach().float().cpu()
    while t.dim() > 2 and t.shape[0] == 1:
        t = t[0]
    return t


def psnr(a: Any, b: Any, *, mask: Any = None, data_range: float = 1.0) -> float:
    """PSNR in dB (inside ``mask`` if given), capped at ``PSNR_CAP`` for identical images."""
    a, b = _t(a), _t(b)
    diff = (a - b) ** 2
    if mask is not None:
        m = _t(mask).bool()
        if not m.any():
            return math.nan
        diff = diff[m]
    mse = float(diff.mean())
    if mse <= 0:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * math.log10(data_range**2 / mse))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def _ssim_parts(
    a: torch.Tensor, b: torch.Tensor, data_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    side = min(a.shape[-2:])
    w = _gaussian_window(size=min(11, side if side % 2 else side - 1))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    saa = F.conv2d(a * a, w) - mu_a**2
    sbb = F.conv2d(b * b, w) - mu_b**2
    sab = F.conv2d(a * b, w) - mu_a * mu_b
    cs = (2 * sab + c2) / (saa + sbb + c2)
    lum = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    return lum * cs, cs


def ssim(a: Any, b: Any, *, data_range: float = 1.0) -> float:
    """Mean SSIM of two 2D images (Wang et al. 2004), Gaussian window, valid region."""
    a4, b4 = _t(a)[None, None], _t(b)[None, None]
    full, _ = _ssim_parts(a4, b4, data_range)
    return float(full.mean())


def ms_ssim(a: Any, b: Any, *, data_range: float = 1.0) -> float | None:
    """Multi-scale SSIM (Wang et al. 2003, five standard weights); None below 160 px."""
    a4, b4 = _t(a)[None, None], _t(b)[None, None]
    if min(a4.shape[-2:]) < MS_SSIM_MIN_SIZE:
        return None
    weights = torch.tensor([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])
    vals = []
    for i in range(len(weights)):
        full, cs = _ssim_parts(a4, b4, data_range)
        vals.append((full if i == len(weights) - 1 else cs).mean().clamp(min=1e-6))
        a4, b4 = F.avg_pool2d(a4, 2), F.avg_pool2d(b4, 2)
    return float(torch.prod(torch.stack(vals) ** weights))


def match(recon: Any, target: Any) -> np.ndarray:
    """``perm[i]`` = index of the reconstruction assigned to target ``i``: the assignment that
    maximises total PSNR (Hungarian algorithm), since a batch update has no sample order."""
    r, t = _stack(recon), _stack(target)
    if len(r) != len(t):
        raise ValueError(f"{len(r)} reconstructions for {len(t)} targets")
    if len(t) == 1:
        return np.zeros(1, dtype=np.int64)
    cost = np.array([[-psnr(r[j], t[i]) for j in range(len(r))] for i in range(len(t))])
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(t), dtype=np.int64)
    perm[rows] = cols
    return perm


def _stack(x: Any) -> torch.Tensor:
    t = _t(x)
    if t.dim() == 4:
        t = t[:, 0]
    if t.dim() == 2:
        t = t[None]
    return t


def image_metrics(recon: Any, target: Any) -> dict[str, float | None]:
    """PSNR, PSNR inside the body (target > ``BODY_THRESHOLD``), SSIM, MS-SSIM of one pair."""
    r, t = _t(recon), _t(target)
    return {
        "psnr": psnr(r, t),
        "psnr_body": psnr(r, t, mask=t > BODY_THRESHOLD),
        "ssim": ssim(r, t),
        "ms_ssim": ms_ssim(r, t),
    }


def reidentified(recon: Any, true_index: int, gallery: Any, *, by: str = "ssim") -> bool:
    """Is the gallery slice most similar to ``recon`` the true one (``gallery[true_index]``)?"""
    g = _stack(gallery)
    fn = ssim if by == "ssim" else psnr
    scores = [fn(recon, g[i]) for i in range(len(g))]
    return int(np.nanargmax(scores)) == true_index


def score(
    recon_images: Any,
    targets: Any,
    *,
    prior: Any,
    chance: list[Any],
    galleries: list[tuple[int, Any]],
    recon_masks: Any = None,
    target_masks: Any = None,
    matching_loss: float | None = None,
) -> list[dict[str, Any]]:
    """Per-target metrics after Hungarian matching, with the prior and chance baselines.

    ``chance[i]``: slices of *other* patients for target ``i`` (averaged); ``galleries[i]`` =
    ``(true_index, slices)``, the site's slices among which target ``i`` must be re-identified.
    """
    r, t, p = _stack(recon_images), _stack(targets), _stack(prior)
    perm = match(r, t)
    rows = []
    for i in range(len(t)):
        j = int(perm[i])
        row: dict[str, Any] = {"target": i, "matched_reconstruction": j}
        row.update(image_metrics(r[j], t[i]))
        pri = image_metrics(p[j], t[i])
        row["prior_psnr"], row["prior_ssim"] = pri["psnr"], pri["ssim"]
        ch = [image_metrics(c, t[i]) for c in _stack(chance[i])]
        row["chance_psnr"] = float(np.mean([c["psnr"] for c in ch]))
        row["chance_ssim"] = float(np.mean([c["ssim"] for c in ch]))
        true_idx, gal = galleries[i]
        row["reidentified"] = reidentified(r[j], true_idx, gal, by="ssim")
        row["reidentified_psnr"] = reidentified(r[j], true_idx, gal, by="psnr")
        row["gallery_size"] = len(_stack(gal))
        if recon_masks is not None and target_masks is not None:
            rm, tm = _stack(recon_masks), _stack(target_masks)
            row["mask_dice"] = dice(rm[j].numpy() > 0.5, tm[i].numpy() > 0.5)
        row["matching_loss"] = matching_loss
        rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over targets and the re-identification rate."""

    def med(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None and not _nan(r[key])]
        return float(np.median(vals)) if vals else None

    out = {
        f"{k}_median": med(k)
        for k in (
            "psnr",
            "psnr_body",
            "ssim",
            "ms_ssim",
            "prior_psnr",
            "prior_ssim",
            "chance_psnr",
            "chance_ssim",
            "mask_dice",
            "matching_loss",
        )
    }
    out["reidentification_rate"] = float(np.mean([r["reidentified"] for r in rows]))
    out["reidentification_rate_psnr"] = float(np.mean([r["reidentified_psnr"] for r in rows]))
    if out["ms_ssim_median"] is None:
        out["ms_ssim_note"] = MS_SSIM_NOTE
    return out


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)
