"""Reconstruction metrics: PSNR/SSIM identities, Hungarian matching, re-identification."""

from __future__ import annotations

import math

import numpy as np
import torch

from privseg.attack import metrics


def _images(n: int = 4, r: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.avg_pool2d(torch.rand(n, 1, r, r, generator=g), 5, 1, 2)
    return base[:, 0]


def test_psnr_and_ssim_of_identical_images() -> None:
    x = _images(1)[0]
    assert metrics.psnr(x, x) == metrics.PSNR_CAP
    assert math.isfinite(metrics.psnr(x, x))
    assert abs(metrics.ssim(x, x) - 1.0) < 1e-5
    assert metrics.ssim(x, 1 - x) < 0.5


def test_psnr_known_value_and_body_mask() -> None:
    a = torch.zeros(16, 16)
    b = torch.full((16, 16), 0.1)
    assert abs(metrics.psnr(a, b) - 20.0) < 1e-4
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:4] = True
    b2 = b.clone()
    b2[:4] = 0.0
    assert metrics.psnr(a, b2, mask=mask) == metrics.PSNR_CAP


def test_ssim_matches_monai_for_2d_single_channel() -> None:
    from monai.metrics import SSIMMetric

    a, b = _images(2)
    ref = float(SSIMMetric(spatial_dims=2, data_range=1.0)(a[None, None], b[None, None]))
    assert abs(metrics.ssim(a, b) - ref) < 1e-3


def test_ms_ssim_skipped_below_160_px() -> None:
    x = _images(1)[0]
    assert metrics.ms_ssim(x, x) is None
    big = _images(1, r=160)[0]
    assert abs(metrics.ms_ssim(big, big) - 1.0) < 1e-4


def test_hungarian_matching_recovers_a_permutation() -> None:
    x = _images(5)
    perm = np.array([3, 0, 4, 1, 2])
    recon = x[perm] + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assigned = metrics.match(recon, x)  # assigned[i] = reconstruction index for target i
    assert (perm[assigned] == np.arange(5)).all()


def test_score_reidentifies_and_reports_baselines() -> None:
    x = _images(20)
    targets = x[:2]
    recon = targets + 0.02
    rows = metrics.score(
        recon,
        targets,
        prior=torch.rand(2, 32, 32),
        chance=[x[5:10], x[10:15]],
        galleries=[(0, torch.cat([x[i : i + 1], x[4:19]])) for i in range(2)],
        matching_loss=0.1,
    )
    assert all(r["reidentified"] for r in rows)
    assert all(r["psnr"] > r["chance_psnr"] > r["prior_psnr"] for r in rows)
    assert rows[0]["gallery_size"] == 16
    summary = metrics.summarise(rows)
    assert summary["reidentification_rate"] == 1.0 and "ms_ssim_note" in summary
