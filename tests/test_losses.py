"""DiceBCELoss: one value per sample, never coupling the samples of a batch (DP-SGD needs it)."""

from __future__ import annotations

import math

import pytest
import torch

from privseg.training.losses import DiceBCELoss


def batch(b: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, 1, 8, 8, generator=g)
    target = (torch.rand(b, 1, 8, 8, generator=g) > 0.6).float()
    return logits, target


def test_returns_one_loss_per_sample() -> None:
    logits, target = batch()
    loss = DiceBCELoss()(logits, target)
    assert loss.shape == (4,)
    assert torch.isfinite(loss).all()


def test_sample_loss_does_not_change_when_other_samples_change() -> None:
    loss_fn = DiceBCELoss()
    logits, target = batch()
    other_logits, other_target = batch(seed=1)
    logits2, target2 = logits.clone(), target.clone()
    logits2[1:], target2[1:] = other_logits[1:], other_target[1:]
    assert torch.equal(loss_fn(logits, target)[0], loss_fn(logits2, target2)[0])
    assert not torch.equal(loss_fn(logits, target)[1], loss_fn(logits2, target2)[1])


def test_gradient_of_one_sample_loss_is_zero_on_other_samples() -> None:
    logits, target = batch()
    logits.requires_grad_(True)
    (grad,) = torch.autograd.grad(DiceBCELoss()(logits, target)[0], logits)
    assert grad[0].abs().sum() > 0
    assert torch.count_nonzero(grad[1:]) == 0


def test_perfect_prediction_gives_a_low_loss_even_on_empty_slices() -> None:
    _, target = batch()
    target[0] = 0.0  # an empty slice
    loss = DiceBCELoss()((2 * target - 1) * 30.0, target)
    assert loss.max() < 1e-3
    wrong = DiceBCELoss()((1 - 2 * target) * 30.0, target)
    assert wrong.min() > 1.0


def test_value_matches_hand_computation() -> None:
    logits = torch.zeros(1, 1, 1, 2)  # p = 0.5 on both pixels
    target = torch.tensor([[[[1.0, 0.0]]]])
    # Dice = (2 * 0.5 + 1) / (1 + 1 + 1) = 2/3; BCE = ln 2 per pixel.
    loss = DiceBCELoss(dice_weight=2.0, bce_weight=0.5, smooth=1.0)(logits, target)
    assert loss.item() == pytest.approx(2.0 * (1 - 2 / 3) + 0.5 * math.log(2), rel=1e-6)


def test_accepts_integer_targets_and_rejects_bad_arguments() -> None:
    logits, target = batch()
    assert torch.allclose(
        DiceBCELoss()(logits, target.to(torch.uint8)), DiceBCELoss()(logits, target)
    )
    with pytest.raises(ValueError, match="same shape"):
        DiceBCELoss()(logits, target[:, :, :4])
    with pytest.raises(ValueError, match="dice_weight"):
        DiceBCELoss(dice_weight=-1.0)
    with pytest.raises(ValueError, match="smooth"):
        DiceBCELoss(smooth=0.0)
