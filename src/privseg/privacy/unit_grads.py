"""Each privacy unit's gradient: slices grouped into units, units packed into chunks, dummy
slices of a padded batch selected out, per-unit gradients, Opacus's clip factor and the sum.

:class:`~privseg.privacy.dp_sgd.DPGradient` runs these on each shard of work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from privseg.privacy.per_sample import per_sample_grads

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dense_groups(groups: Any, n: int) -> tuple[torch.Tensor, int]:
    """Any unit ids per slice -> contiguous ids 0..k-1 (as a LongTensor) and k."""
    g = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must have one unit id per slice ({n}), got shape {g.shape}")
    if n == 0:
        return torch.zeros(0, dtype=torch.long), 0
    ids, inv = np.unique(g, return_inverse=True)
    return torch.as_tensor(inv.reshape(-1), dtype=torch.long), len(ids)


def chunks(groups: torch.Tensor, k: int, size: int) -> list[list[int]]:
    """Units 0..k-1 packed in order into chunks of at most ``size`` slices (a unit with more
    slices is a chunk of its own): a unit never spans two chunks, so it is clipped whole."""
    chunks: list[list[int]] = []
    filled = size
    for u, n in enumerate(torch.bincount(groups, minlength=k).tolist()):
        if filled + n > size:
            chunks.append([])
            filled = 0
        chunks[-1].append(u)
        filled += n
    return chunks


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus's ``clip_and_accumulate`` factor, verbatim: min(1, C / (norm + 1e-6))."""
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


def per_unit(per_slice: Sequence[torch.Tensor], unit: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Per-slice gradients ``[n, *shape]`` summed into per-unit ones ``[k, *shape]``
    (``unit``: each slice's unit index 0..k-1); slice losses never couple, so this is each
    unit's gradient."""
    return [g.new_zeros((k, *g.shape[1:])).index_add_(0, unit.to(g.device), g) for g in per_slice]


def clip_and_sum(
    grads: Sequence[torch.Tensor], max_grad_norm: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-unit gradients ``[k, *shape]`` (one tensor per parameter) -> the sum over units of
    each unit's gradient clipped to ``max_grad_norm`` (norm over all parameters), and the
    unit norms."""
    k = len(grads[0])
    norms = torch.stack([g.reshape(k, -1).norm(2, dim=1) for g in grads]).norm(2, dim=0)
    factors = clip_factors(norms, max_grad_norm)
    return [torch.tensordot(factors.to(g.dtype), g, dims=1) for g in grads], norms


Slices = tuple[torch.Tensor, "torch.Tensor | None"]
"""Each slice's unit 0..k-1 (on the CPU) and its real-slice mask (None: all real)."""


@dataclass(frozen=True)
class UnitBatch:
    """One DP step's batch as a gradient path (:data:`privseg.core.plugins.GRAD_PATHS`) gets it."""

    model: nn.Module
    params: Sequence[torch.Tensor]  # the trainable parameters, in model order
    loss_fn: LossFn  # one loss per slice
    images: torch.Tensor  # [n, 1, R, R]
    labels: torch.Tensor
    slices: Slices
    units: int  # k: units 0..k-1 (k > 0)


PathResult = tuple[list[torch.Tensor], float, torch.Tensor]
"""What a gradient path returns: per parameter the sum over units of each unit's gradient
clipped to ``max_grad_norm``, the mean loss over the real slices, the k unit norms (float64,
CPU)."""


def real_mask(real: Any, n: int) -> torch.Tensor | None:
    """``real`` as a CPU bool tensor of ``n`` (None stays None: every slice real)."""
    if real is None:
        return None
    keep = torch.as_tensor(np.asarray(real.cpu() if isinstance(real, torch.Tensor) else real))
    if keep.shape != (n,) or keep.dtype != torch.bool:
        raise ValueError(f"real must be one bool per slice ({n}), got {keep.dtype} {keep.shape}")
    return keep


def only_real(
    keep: torch.Tensor | None, per_slice: Sequence[torch.Tensor], losses: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-slice gradients and losses with a dummy slice's rows replaced by exact zeros, by
    selection (``torch.where``): no dummy value, even inf or NaN, reaches a per-unit sum, and
    the backward of the selected losses sends each dummy slice's output a gradient of exactly
    0 (in the loop's pass over one patient, a dummy slice then adds 0 x its activations to
    the parameter gradient: exactly 0 for finite activations, which real slices as dummies
    give wherever the real slices' own gradient is finite)."""
    if keep is None:
        return list(per_slice), losses
    k = keep.to(losses.device)
    picked = [torch.where(k.view(-1, *[1] * (g.dim() - 1)), g, 0.0) for g in per_slice]
    return picked, torch.where(k, losses, 0.0)


def mean_loss(total: float, keep: torch.Tensor | None, n: int) -> float:
    """The mean loss over the real slices (NaN when there is none)."""
    count = n if keep is None else int(keep.sum())
    return total / count if count else float("nan")


def unit_grads(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    loss_fn: LossFn,
    images: torch.Tensor,
    labels: torch.Tensor,
    slices: Slices,
    units: list[int],
) -> tuple[list[torch.Tensor], float]:
    """Each unit's gradient (its slices' losses summed), as ``[len(units), *p.shape]`` per
    parameter, and the units' summed loss.

    One unit: its ordinary gradient, one backward (the loop). Several: per-slice gradients
    from one batched pass, summed per unit (slice losses never couple). Dummy slices
    (``slices[1]`` False) are computed and then selected out.
    """
    groups, keep = slices
    unit_t = torch.as_tensor(units, dtype=torch.long, device=groups.device)
    match = groups[:, None] == unit_t[None, :]
    sel = torch.nonzero(match.any(1)).flatten()
    x, y = images[sel.to(images.device)], labels[sel.to(images.device)]
    mine = None if keep is None else keep[sel]
    if len(units) == 1:
        losses = only_real(mine, [], loss_fn(model(x), y))[1]
        grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
        one = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        if mine is not None and one:  # a slot of dummy slices only: exactly 0, selected
            live = mine.any().to(one[0].device)
            one = [torch.where(live, g, 0.0) for g in one]
        return [g[None] for g in one], float(losses.detach().sum())
    per_slice, losses = only_real(mine, *per_sample_grads(model, loss_fn, x, y, params))
    local = match[sel].long().argmax(1)  # each slice's unit, as an index in ``units``
    if torch.equal(local, torch.arange(len(units))):  # one slice per unit, in order
        return per_slice, float(losses.sum())
    return per_unit(per_slice, local, len(units)), float(losses.sum())
