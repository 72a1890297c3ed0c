"""Inverting Gradients: reconstruct a site's CT slices from the update the server receives.

Geiping, Bauermeister, Dröge, Moeller, "Inverting Gradients - How easy is it to break privacy
in federated learning?", NeurIPS 2020. Dummy images are optimised so that the update they would
produce matches the observed one in cosine similarity, with a total-variation prior, a [0, 1]
box constraint, Adam on the *sign* of the gradient, a step-decayed learning rate and several
restarts; the winning restart is chosen by the matching loss alone, which the attacker can
compute (never by a distance to the private truth).

Two changes for the project's GroupNorm U-Net / MoNet: the cosine is taken per parameter
tensor and averaged (:func:`layer_cosine_loss`), and, because a bias-free conv followed by
GroupNorm makes the update exactly invariant to ``x -> c x`` (:func:`scale_invariant`), the
intensity scale is fixed by a public prior (:func:`anchor_scale`).

Two sides live here and never share inputs: :func:`simulate_site_update` is the *victim*
(it holds the private slices and returns only a :class:`ServerPayload`), :func:`reconstruct`
is the *attacker* (it takes only the payload, the threat model and its own configuration; the
label mask only in the worst-case ``mask="given"`` mode). What inverts, what resists, with the
numbers: ``docs/ATTACK.md``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from privseg.attack.threat import ServerPayload, ThreatModel
from privseg.config import AttackConfig
from privseg.core.errors import ConfigError

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]
#: The box constraint: [0, 1] is the HU window the model sees.
BOX = (0.0, 1.0)
#: Public prior for scale-invariant models: mean intensity inside the organ mask (liver / soft
#: tissue ~60 HU in the default [-150, 200] HU window) ...
ORGAN_PRIOR = 0.6
#: ... or, for an empty mask, the 99th-percentile intensity (bone saturates the window).
BRIGHT_PRIOR = 1.0
#: Added under square roots of squared norms: d sqrt(s)/ds is infinite at s = 0.
_TINY = 1e-30


@dataclass
class Reconstruction:
    """The attacker's output: images ``[B,1,R,R]`` in [0, 1], masks ``[B,1,R,R]`` in {0, 1}."""

    images: torch.Tensor
    masks: torch.Tensor
    matching_loss: float
    prior: torch.Tensor
    restart_losses: list[float] = field(default_factory=list)


# ---- shared differentiable pieces -------------------------------------------------------
def trainable(model: nn.Module) -> Params:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _gradient(
    model: nn.Module,
    params: Params,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: nn.Module,
    *,
    clip: float | None,
    create_graph: bool,
) -> list[torch.Tensor]:
    """Gradient of the batch-mean loss; with ``clip``, the DP-SGD view: per-sample gradients
    clipped to ``clip`` and averaged over the (expected) batch size, without the noise."""
    values = list(params.values())

    def grad_of(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        loss = loss_fn(functional_call(model, params, (x,)), y).mean()
        gs = torch.autograd.grad(loss, values, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(v) if g is None else g for v, g in zip(values, gs, strict=True)]

    if clip is None:
        return grad_of(images, labels)
    total = [torch.zeros_like(v) for v in values]
    for i in range(images.shape[0]):
        g = grad_of(images[i : i + 1], labels[i : i + 1])
        norm = torch.sqrt(sum((t * t).sum() for t in g) + 1e-12)
        factor = torch.clamp(clip / norm, max=1.0)
        total = [a + factor * t for a, t in zip(total, g, strict=True)]
    return [t / images.shape[0] for t in total]


def unrolled_update(
    model: nn.Module,
    params0: Params,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: nn.Module,
    threat: ThreatModel,
    *,
    create_graph: bool,
) -> list[torch.Tensor]:
    """``w0 - w_k`` after ``threat.local_steps`` SGD steps on the whole batch, as a function of
    the data (``torch.func.functional_call`` keeps the global model untouched)."""
    clip = threat.max_grad_norm if threat.dp and threat.dp_aware else None
    params = dict(params0)
    for _ in range(threat.local_steps):
        grads = _gradient(
            model, params, images, labels, loss_fn, clip=clip, create_graph=create_graph
        )
        params = {n: p - threat.lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
    return [params0[n] - params[n] for n in params0]


def cosine_loss(update: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """``1 - <u, t> / (|u| |t|)`` over all parameter tensors concatenated (Geiping's 'sim')."""
    dot = sum((u * t).sum() for u, t in zip(update, target, strict=True))
    nu = sum((u * u).sum() for u in update)
    nt = sum((t * t).sum() for t in target)
    # the tiny term inside the root keeps the gradient finite when a dummy's update is 0
    return 1.0 - dot / (torch.sqrt(nu + _TINY) * torch.sqrt(nt) + 1e-12)


def layer_cosine_loss(
    update: list[torch.Tensor],
    target: list[torch.Tensor],
    target_norms: list[float] | None = None,
) -> torch.Tensor:
    """Mean over parameter tensors of ``1 - cos(u_l, t_l)`` (tensors with a zero target skipped).

    Weights every layer equally: on the GroupNorm U-Net the update norms span four orders of
    magnitude (decoder head >> encoder), so the global :func:`cosine_loss` barely sees the
    early layers, which hold the spatial information. ``target_norms`` (from
    :func:`tensor_norms`, computed once per attack) saves a device sync per tensor per
    iteration, which on a GPU costs more than the arithmetic.
    """
    norms = target_norms if target_norms is not None else tensor_norms(target)
    terms = []
    for u, t, nt in zip(update, target, norms, strict=True):
        if nt == 0.0:
            continue
        nu = torch.sqrt((u * u).sum() + _TINY)  # finite gradient at u = 0 (a dead layer)
        terms.append(1.0 - (u * t).sum() / (nu * nt + 1e-20))
    if not terms:
        return cosine_loss(update, target)
    return torch.stack(terms).mean()


def tensor_norms(tensors: list[torch.Tensor]) -> list[float]:
    """The L2 norm of each tensor, as Python floats (one device sync for all of them)."""
    if not tensors:
        return []
    return torch.stack([torch.sqrt((t * t).sum()) for t in tensors]).tolist()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV (mean absolute neighbour difference), the image prior of the paper."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


# ---- victim side ------------------------------------------------------------------------
def simulate_site_update(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    threat: ThreatModel,
    *,
    loss_fn: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> ServerPayload:
    """The site: ``threat.local_steps`` SGD steps on its private batch (with the project's real
    DP-SGD step under T3), returning only what the server would receive.

    The site trains in train mode; the attacker replays in eval mode. Both are the same
    function for the project's models unless ``model.dropout > 0`` (GroupNorm has no running
    statistics), in which case the site's dropout masks are a secret the attacker lacks.
    """
    loss_fn = loss_fn if loss_fn is not None else default_loss()
    images, labels = _as_batch(images), _as_batch(labels).float()
    if images.shape[0] != threat.batch_size:
        raise ConfigError(
            f"batch of {images.shape[0]} slices does not match the threat's B = {threat.batch_size}"
        )
    global_model = copy.deepcopy(model).eval()
    local = copy.deepcopy(global_model).train()
    params = trainable(local)
    w0 = {n: p.detach().clone() for n, p in params.items()}
    step = dp_gradient_fn(threat, generator) if threat.dp else None
    for _ in range(threat.local_steps):
        for p in params.values():
            p.grad = None
        if step is None:
            loss_fn(local(images), labels).mean().backward()
        else:
            step(local, loss_fn, images, labels, torch.arange(images.shape[0]))
        with torch.no_grad():
            for p in params.values():
                if p.grad is not None:
                    p -= threat.lr * p.grad
    update = {n: (w0[n] - p.detach()).clone() for n, p in params.items()}
    return ServerPayload(
        model=global_model, loss_fn=loss_fn, update=update, num_samples=images.shape[0]
    )


DPStep = Callable[[nn.Module, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], object]


def dp_gradient_fn(
    threat: ThreatModel,
    generator: torch.Generator | None = None,
    expected_batch_size: int | None = None,
) -> DPStep:
    """The project's own DP-SGD gradient (clip, sum, noise, divide), as the site runs it.

    A seeded ``generator`` makes the *simulated* site reproducible; real sites draw their
    noise from OS entropy.
    """
    from privseg.privacy.dp_sgd import DPGradient

    assert threat.max_grad_norm is not None and threat.noise_multiplier is not None
    return DPGradient(
        max_grad_norm=threat.max_grad_norm,
        noise_multiplier=threat.noise_multiplier,
        expected_batch_size=expected_batch_size or threat.batch_size,
        generator=generator,
    )


def default_loss() -> nn.Module:
    from privseg.training.losses import DiceBCELoss

    return DiceBCELoss()


def _as_batch(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not torch.is_tensor(x) else x.float()
    if t.dim() == 3:
        t = t[:, None]
    return t


# ---- attacker side ----------------------------------------------------------------------
def reconstruct(
    payload: ServerPayload,
    threat: ThreatModel,
    cfg: AttackConfig,
    *,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    on_iteration: Callable[[int, int], None] = lambda done, total: None,
) -> Reconstruction:
    """Invert ``payload.update`` into ``threat.batch_size`` slices (Geiping et al. 2020).

    ``on_iteration(done, total)`` is called after each optimisation step, over all restarts.

    Sees only server-side information. ``mask`` (the true label masks) is accepted only in the
    ``given`` mask mode, the stated worst case; in ``joint`` mode mask logits are optimised
    with the images, in ``predicted`` mode the global model's own prediction on the current
    dummy is used as the label.
    """
    if threat.mask == "given" and mask is None:
        raise ConfigError("mask mode 'given' needs the label masks (the worst-case assumption)")
    if threat.mask != "given" and mask is not None:
        raise ConfigError(f"mask mode {threat.mask!r}: the attacker must not be given the masks")
    model = payload.model.eval()
    params0 = {
        n: p.detach().clone().requires_grad_(True)
        for n, p in model.named_parameters()
        if n in payload.update
    }
    target = [payload.update[n].detach() for n in params0]
    shape = (threat.batch_size, 1, threat.resolution, threat.resolution)
    given = _as_batch(mask).float().to(target[0].device) if mask is not None else None
    best: Reconstruction | None = None
    losses = []
    total = cfg.restarts * cfg.iterations
    for r in range(cfg.restarts):
        tick = lambda i, r=r: on_iteration(r * cfg.iterations + i, total)  # noqa: E731
        rec = _one_restart(
            model, params0, target, payload.loss_fn, threat, cfg, shape, given, generator, tick
        )
        losses.append(rec.matching_loss)
        if best is None or rec.matching_loss < best.matching_loss:
            best = rec
    assert best is not None
    best.restart_losses = losses
    return best


def _labels(
    model: nn.Module,
    params0: Params,
    x: torch.Tensor,
    mode: str,
    given: torch.Tensor | None,
    mask_logits: torch.Tensor | None,
) -> torch.Tensor:
    if mode == "given":
        assert given is not None
        return given
    if mode == "joint":
        assert mask_logits is not None
        return torch.sigmoid(mask_logits)
    with torch.no_grad():
        return (functional_call(model, params0, (x.detach(),)) > 0).float()


def scale_invariant(
    model: nn.Module,
    params0: Params,
    loss_fn: nn.Module,
    threat: ThreatModel,
    x: torch.Tensor,
    labels: torch.Tensor,
) -> bool:
    """Is the update unchanged by ``x -> c x``? (A bias-free first conv followed by GroupNorm.)

    A property of the architecture the server holds, checked numerically on a dummy input."""
    a = unrolled_update(model, params0, x, labels, loss_fn, threat, create_graph=False)
    b = unrolled_update(model, params0, 0.5 * x, labels, loss_fn, threat, create_graph=False)
    num = sum(float(((u - v) ** 2).sum().detach()) for u, v in zip(a, b, strict=True))
    den = sum(float((u * u).sum().detach()) for u in a)
    return den > 0 and num <= 1e-2 * den  # exact up to GroupNorm eps; a conv bias gives O(0.1)


@torch.no_grad()
def anchor_scale(x: torch.Tensor, labels: torch.Tensor) -> None:
    """Rescale each dummy in place so the organ under its mask has the public prior intensity
    :data:`ORGAN_PRIOR` (the 99th percentile :data:`BRIGHT_PRIOR` for an empty mask)."""
    for b in range(x.shape[0]):
        m = labels[b].amax(0, keepdim=True) > 0.5  # any class: the organ (with its lesions)
        if bool(m.any()):
            level, want = x[b][m].mean(), ORGAN_PRIOR
        else:
            level, want = torch.quantile(x[b].flatten(), 0.99), BRIGHT_PRIOR
        if float(level) > 1e-4:
            x[b].mul_(want / level)


def _one_restart(
    model: nn.Module,
    params0: Params,
    target: list[torch.Tensor],
    loss_fn: nn.Module,
    threat: ThreatModel,
    cfg: AttackConfig,
    shape: tuple[int, ...],
    given: torch.Tensor | None,
    generator: torch.Generator | None,
    tick: Callable[[int], None],
) -> Reconstruction:
    device = target[0].device  # the dummies live where the server holds the model
    x = torch.rand(shape, generator=generator).to(device).requires_grad_(True)
    prior = x.detach().clone()
    variables = [x]
    mask_logits = None
    if threat.mask == "joint":  # one mask channel per class (the model's outputs)
        out = _labels(model, params0, x, "predicted", None, None)
        mask_logits = (0.1 * torch.randn(out.shape, generator=generator)).to(device)
        mask_logits.requires_grad_(True)
        variables.append(mask_logits)
    labels0 = _labels(model, params0, x, threat.mask, given, mask_logits).detach()
    anchored = scale_invariant(model, params0, loss_fn, threat, x.detach(), labels0)
    norms = tensor_norms(target)
    opt = torch.optim.Adam(variables, lr=cfg.lr)
    n = cfg.iterations
    milestones = sorted({max(1, int(n * f)) for f in (3 / 8, 5 / 8, 7 / 8)})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    for i in range(n):
        tick(i)
        labels = _labels(model, params0, x, threat.mask, given, mask_logits)
        update = unrolled_update(model, params0, x, labels, loss_fn, threat, create_graph=True)
        loss = layer_cosine_loss(update, target, norms) + cfg.tv_weight * total_variation(x)
        grads = torch.autograd.grad(loss, variables)
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            log.warning("inversion: non-finite gradient, restart stopped early")
            break  # keep the last finite iterate rather than poison it with NaN
        for v, g in zip(variables, grads, strict=True):
            v.grad = g.sign()  # signed gradients: robust to the wildly scaled 2nd-order gradient
        opt.step()
        sched.step()
        with torch.no_grad():
            if anchored:  # free: the update does not depend on the scale
                anchor_scale(x, labels.detach())
            x.clamp_(*BOX)
    labels = _labels(model, params0, x, threat.mask, given, mask_logits)
    update = unrolled_update(
        model, params0, x.detach(), labels.detach(), loss_fn, threat, create_graph=False
    )
    match = float(layer_cosine_loss(update, target, norms).detach())
    masks = (labels.detach() > 0.5).float()
    return Reconstruction(images=x.detach().clone(), masks=masks, matching_loss=match, prior=prior)
