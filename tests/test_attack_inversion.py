"""Inverting Gradients on a tiny model: leaks without DP, not with strong DP noise.

The tiny model has a dense "global context" layer on the flattened image, the textbook case
in which the update determines the input (Geiping et al. 2020, Prop. 3.1), so a few hundred
iterations reconstruct it; the real, fully convolutional U-Net is measured separately.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from conftest import R, TinySeg, phantom, plan
from privseg.attack import metrics
from privseg.attack.inversion import (
    ORGAN_PRIOR,
    anchor_scale,
    cosine_loss,
    layer_cosine_loss,
    reconstruct,
    scale_invariant,
    simulate_site_update,
    tensor_norms,
    unrolled_update,
)
from privseg.attack.threat import ServerPayload, ThreatModel
from privseg.config import AttackConfig, Config, ModelConfig
from privseg.core.errors import ConfigError
from privseg.training.losses import DiceBCELoss


def _attack(threat: ThreatModel, iterations: int = 150) -> dict[str, float]:
    torch.manual_seed(0)
    x, y = phantom(12)
    payload = simulate_site_update(
        TinySeg(),
        x[:1],
        y[:1],
        threat,
        loss_fn=DiceBCELoss(),
        generator=torch.Generator().manual_seed(3),
    )
    cfg = AttackConfig(iterations=iterations, restarts=1, lr=0.1, tv_weight=1e-4)
    rec = reconstruct(payload, threat, cfg, mask=y[:1], generator=torch.Generator().manual_seed(2))
    chance = sum(metrics.psnr(x[j], x[0]) for j in range(2, 12)) / 10
    return {
        "psnr": metrics.psnr(rec.images[0], x[0]),
        "prior": metrics.psnr(rec.prior[0], x[0]),
        "chance": chance,
        "ssim": metrics.ssim(rec.images[0], x[0]),
        "match": rec.matching_loss,
    }


def test_t1_without_dp_reconstructs_the_slice() -> None:
    r = _attack(ThreatModel(threat="T1", batch_size=1, resolution=R, lr=0.1))
    assert r["psnr"] > r["chance"] + 10 and r["psnr"] > r["prior"] + 10
    assert r["ssim"] > 0.9 and r["match"] < 0.05  # per-layer cosine, averaged over tensors


def test_strong_dp_noise_leaves_no_better_than_chance() -> None:
    threat = ThreatModel(
        threat="T3", batch_size=1, resolution=R, lr=0.1, max_grad_norm=1.0, noise_multiplier=2.0
    )
    r = _attack(threat, iterations=60)
    assert r["psnr"] < r["chance"] + 1.0


def test_t2_unroll_matches_the_site_update_exactly() -> None:
    """The attacker's differentiable replay of k local steps equals the site's real steps."""
    x, y = phantom(2)
    threat = ThreatModel(threat="T2", batch_size=2, local_steps=3, resolution=R, lr=0.05)
    model = TinySeg()
    payload = simulate_site_update(model, x, y, threat, loss_fn=DiceBCELoss())
    params0 = {
        n: p.detach().clone().requires_grad_(True) for n, p in payload.model.named_parameters()
    }
    replay = unrolled_update(
        payload.model, params0, x, y, DiceBCELoss(), threat, create_graph=False
    )
    for r, (name, u) in zip(replay, payload.update.items(), strict=True):
        assert torch.allclose(r, u, atol=1e-6), name


def test_attacker_signature_takes_only_server_side_inputs() -> None:
    params = inspect.signature(reconstruct).parameters
    # on_iteration only reports progress (done, total): it receives nothing private
    assert list(params) == ["payload", "threat", "cfg", "mask", "generator", "on_iteration"]
    assert params["mask"].kind is inspect.Parameter.KEYWORD_ONLY
    fields = set(ServerPayload.__dataclass_fields__)
    assert fields == {"model", "loss_fn", "update", "num_samples"}
    x, y = phantom(1)
    joint = ThreatModel(threat="T1", resolution=R, mask="joint")
    payload = simulate_site_update(TinySeg(), x, y, joint)
    with pytest.raises(ConfigError):
        reconstruct(payload, joint, AttackConfig(iterations=1), mask=y)
    given = ThreatModel(threat="T1", resolution=R, mask="given")
    with pytest.raises(ConfigError):
        reconstruct(payload, given, AttackConfig(iterations=1))


def test_joint_and_predicted_masks_run_and_return_binary_masks() -> None:
    x, y = phantom(1)
    for mode in ("joint", "predicted"):
        threat = ThreatModel(threat="T1", resolution=R, mask=mode)
        payload = simulate_site_update(TinySeg(), x, y, threat)
        rec = reconstruct(payload, threat, AttackConfig(iterations=3, restarts=2))
        assert rec.masks.shape == x.shape and set(rec.masks.unique().tolist()) <= {0.0, 1.0}
        assert len(rec.restart_losses) == 2
        assert rec.matching_loss == min(rec.restart_losses)


def test_threat_model_is_explicit_and_validated() -> None:
    cfg = Config()
    t = ThreatModel.from_config(cfg, dp=plan(noise_multiplier=1.1, target_epsilon=8.0))
    d = t.to_dict()
    assert d["threat"] == "T3" and d["dp"] and d["epsilon"] == 8.0 and "global weights" in d["sees"]
    assert "sigma=1.1" in t.describe()
    with pytest.raises(ConfigError, match="allowed values"):
        ThreatModel(threat="T4")
    with pytest.raises(ConfigError):
        ThreatModel(threat="T3")  # DP threat without C and sigma
    with pytest.raises(ConfigError):
        ThreatModel(threat="T2", local_steps=1)


def test_layer_cosine_weights_every_tensor_equally() -> None:
    g = torch.Generator().manual_seed(0)
    target = [torch.randn(5, generator=g), 1e-4 * torch.randn(7, generator=g)]
    assert float(layer_cosine_loss(target, target)) < 1e-6
    # a wrong *small* tensor is invisible to the global cosine, not to the per-layer one
    wrong = [target[0], -target[1]]
    assert float(cosine_loss(wrong, target)) < 1e-6
    assert abs(float(layer_cosine_loss(wrong, target)) - 1.0) < 1e-5
    # per-tensor scale does not matter; zero-target tensors are skipped
    scaled = [3.0 * target[0], 0.5 * target[1], torch.ones(2)]
    assert float(layer_cosine_loss(scaled, [*target, torch.zeros(2)])) < 1e-6
    # precomputed target norms (one sync per attack) give the same loss
    norms = tensor_norms(target)
    assert norms == pytest.approx([float(t.norm()) for t in target])
    assert float(layer_cosine_loss(wrong, target, norms)) == float(layer_cosine_loss(wrong, target))


def test_unet_update_is_scale_invariant_and_the_scale_is_anchored_by_the_prior() -> None:
    """Bias-free conv + GroupNorm: ``x -> c x`` leaves the U-Net's update unchanged, so the
    attacker fixes the scale with the public organ-intensity prior; TinySeg (conv bias) is not
    invariant and is left alone."""
    from privseg.models import build_model

    torch.manual_seed(0)
    x, y = phantom(1)
    threat = ThreatModel(threat="T1", resolution=R, lr=0.1)
    unet = build_model(ModelConfig(features=4, groups=2)).eval()
    dummy = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    for model, invariant in ((unet, True), (TinySeg().eval(), False)):
        params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        assert scale_invariant(model, params, DiceBCELoss(), threat, dummy, y) is invariant
    z = 0.3 * x.clone()
    anchor_scale(z, y)
    assert abs(float(z[y > 0.5].mean()) - ORGAN_PRIOR) < 1e-5
    empty = torch.rand(1, 1, R, R)
    anchor_scale(empty, torch.zeros_like(empty))
    assert abs(float(torch.quantile(empty.flatten(), 0.99)) - 1.0) < 1e-4


def test_t1_without_dp_inverts_a_small_monet_regression_guard() -> None:
    """The project's own MoNet architecture (ELU, stride-2 convs; untrained, 8 features, 32 px),
    one slice, mask given: the no-DP attack must clearly beat both baselines. Measured with
    numpy 2.4.6 / scipy 1.17.1: 24.3 dB / SSIM 0.86 / matching loss 0.0006 after 300
    iterations (19.5 dB after 150, too close to the guard) against chance 18.2 dB and prior
    6.8 dB; a regression of the optimiser, the loss or the scale anchoring drops it to the prior
    (where the same model with 4 features still is)."""
    from privseg.models import build_model

    x, y = phantom(12)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="monet", features=8, groups=2)).eval()
    threat = ThreatModel(threat="T1", batch_size=1, resolution=R, lr=0.1)
    payload = simulate_site_update(model, x[:1], y[:1], threat, loss_fn=DiceBCELoss())
    cfg = AttackConfig(iterations=300, restarts=1, lr=0.1, tv_weight=0.1)
    rec = reconstruct(payload, threat, cfg, mask=y[:1], generator=torch.Generator().manual_seed(2))
    chance = sum(metrics.psnr(x[j], x[0]) for j in range(2, 12)) / 10
    psnr = metrics.psnr(rec.images[0], x[0])
    assert psnr > chance + 2.0 and psnr > metrics.psnr(rec.prior[0], x[0]) + 10.0
    assert metrics.ssim(rec.images[0], x[0]) > 0.5 and rec.matching_loss < 0.01
