"""The ``"opacus"`` and ``"functorch"`` grad paths: per-slice gradients from Opacus.

Opacus's ``GradSampleModule`` wraps the caller's model for one pass only: its hooks and
per-sample attributes are removed afterwards, so the model is left as it was (same parameter
tensors, same ``p.grad``). Each unit is clipped as in every path (``unit_grads.clip_and_sum``);
the noise is added in :mod:`privseg.privacy.dp_sgd`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from privseg.privacy.unit_grads import (
    PathResult,
    UnitBatch,
    clip_and_sum,
    mean_loss,
    only_real,
    per_unit,
)

if TYPE_CHECKING:
    from privseg.privacy.dp_sgd import DPGradient


def hooks_path(dp: DPGradient, batch: UnitBatch) -> PathResult:
    """``privacy.grad_path = "opacus"``: Opacus's per-layer hooks."""
    return _opacus_path(dp, batch, functorch=False)


def functorch_path(dp: DPGradient, batch: UnitBatch) -> PathResult:
    """``privacy.grad_path = "functorch"``: Opacus with ``vmap(grad)`` for every layer."""
    return _opacus_path(dp, batch, functorch=True)


def _opacus_path(dp: DPGradient, batch: UnitBatch, *, functorch: bool) -> PathResult:
    """Per-slice gradients from Opacus, summed per unit and clipped."""
    groups, keep = batch.slices
    per_slice, losses = opacus_per_sample(
        batch.model, batch.params, batch.loss_fn, batch.images, batch.labels, functorch=functorch
    )
    per_slice, losses = only_real(keep, per_slice, losses)
    summed, norms = clip_and_sum(per_unit(per_slice, groups, batch.units), dp.max_grad_norm)
    loss = mean_loss(float(losses.sum()), keep, len(batch.images))
    return summed, loss, norms.detach().double().cpu()


def opacus_per_sample(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    functorch: bool,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(one ``[n, *p.shape]`` gradient per parameter in ``params``, the slice losses ``[n]``,
    detached) from one batched pass with Opacus hooks (``functorch``: ``vmap(grad)`` for every
    layer)."""
    from opacus import GradSampleModule

    if not model.training:
        name = "functorch" if functorch else "opacus"
        raise ValueError(
            f"grad_path {name!r} needs model.train(): Opacus only capture activations "
            "in training mode"
        )
    saved = [p.grad for p in params]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=functorch)
    try:
        per_sample = loss_fn(gsm(images), labels)
        with warnings.catch_warnings():
            # images never require grad, so Opacus's full backward hooks always say so
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            per_sample.sum().backward()
        per_slice = [
            p.new_zeros((len(images), *p.shape))
            if getattr(p, "grad_sample", None) is None
            else p.grad_sample
            for p in params
        ]
    finally:
        gsm.remove_hooks()
        _strip_opacus_attrs(model)
        for p, g in zip(params, saved, strict=True):
            p.grad = g
    return per_slice, per_sample.detach()


def _strip_opacus_attrs(model: nn.Module) -> None:
    for p in model.parameters():
        for name in ("grad_sample", "_current_grad_sample", "_forward_counter"):
            if hasattr(p, name):
                delattr(p, name)
    for m in model.modules():
        for name in (
            "activations",
            "max_batch_len",
            "autograd_grad_sample_hooks",
            "ft_compute_sample_grad",
        ):
            if name in m.__dict__:
                delattr(m, name)
