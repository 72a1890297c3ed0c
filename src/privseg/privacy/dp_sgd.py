"""The DP-SGD gradient: per-unit clipping, one Gaussian noise draw per batch, Poisson sampling.

A privacy *unit* is one slice or all slices of one patient. Each unit's gradient (its slices'
per-sample losses summed) is clipped to norm C with Opacus's exact clip factor, the clipped
gradients are summed, N(0, (sigma*C)^2) noise is added once per coordinate, and the result is
divided by the expected batch size (Poisson sampling: the real size is random and private).
Interchangeable per-unit gradient paths give identical results (speed: ``bench/dp_step.py``):
``"batched"`` (per-sample gradients from one batched pass per chunk of about 4 slices, see
:mod:`privseg.privacy.per_sample`; chunks sharded over threads; the fastest on CPU),
``"loop"`` (one backward per unit, sharded over threads; the leanest), ``"opacus"`` (Opacus's
per-layer hooks) and ``"functorch"`` (Opacus with ``vmap(grad)``).
"""

from __future__ import annotations

import math
import secrets
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from privseg.privacy.per_sample import per_sample_grads

GRAD_PATHS = ("batched", "loop", "opacus", "functorch")
#: Pixels per ``batched`` chunk: 4 slices of 64x64 (bench/dp_step.py, batch 32, 2 threads: at
#: 64 px, chunks of 4 keep the peak memory near the fastest non-private step's, 8 were ~3 %
#: faster at 2.4x the memory; from 128 px on, one slice per pass is enough work and single-slice
#: chunks, i.e. the loop, were fastest).
CHUNK_PIXELS = 4 * 64 * 64


def chunk_slices_for(images: torch.Tensor) -> int:
    """Slices per ``batched`` chunk for slices of this size (at least one)."""
    return max(1, CHUNK_PIXELS // max(1, math.prod(images.shape[2:])))


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: One shard's result: sum of its clipped unit gradients, its summed loss, its unit norms.
_Part = tuple[list[torch.Tensor], float, dict[int, float]]


def secure_generator() -> torch.Generator:
    """A CPU torch generator seeded from OS entropy, never from the experiment seed.

    The seed is secret, so the noise cannot be replayed by whoever knows the config. This is
    not Opacus's ``secure_mode`` (that needs ``torchcsprng``, which cannot be installed here,
    and also hardens against floating-point attacks on the Gaussian sampler).
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(secrets.randbits(63))
    return gen


class PoissonUnitSampler:
    """Each step includes each unit independently with probability ``sample_rate``."""

    def __init__(
        self, units: np.ndarray, *, sample_rate: float, rng: np.random.Generator | None = None
    ) -> None:
        units = np.asarray(units)
        if units.ndim != 1:
            raise ValueError(f"units must be a 1-D array of unit ids per slice, got {units.shape}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate = {sample_rate!r} is invalid: must be in (0, 1]")
        self.unit_ids, self._unit_of_slice = np.unique(units, return_inverse=True)
        self.n_units = len(self.unit_ids)
        self.sample_rate = float(sample_rate)
        # OS entropy: the batch composition is part of what DP hides.
        self.rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """(slice indices of the selected units, group id 0..k-1 of each such slice)."""
        chosen = self.rng.random(self.n_units) < self.sample_rate
        idx = np.flatnonzero(chosen[self._unit_of_slice])
        relabel = np.cumsum(chosen) - 1
        return idx.astype(np.int64), relabel[self._unit_of_slice[idx]].astype(np.int64)


def _dense_groups(groups: Any, n: int) -> tuple[torch.Tensor, int]:
    """Any unit ids per slice -> contiguous ids 0..k-1 (as a LongTensor) and k."""
    g = groups.detach().cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must have one unit id per slice ({n}), got shape {g.shape}")
    if n == 0:
        return torch.zeros(0, dtype=torch.long), 0
    ids, inv = np.unique(g, return_inverse=True)
    return torch.as_tensor(inv.reshape(-1), dtype=torch.long), len(ids)


def _chunks(groups: torch.Tensor, k: int, size: int) -> list[list[int]]:
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


class DPGradient:
    """Computes one DP-SGD gradient into ``p.grad`` of every trainable parameter."""

    def __init__(
        self,
        *,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        grad_path: str = "batched",
        chunk_slices: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm = {max_grad_norm!r} is invalid: must be > 0")
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier = {noise_multiplier!r} is invalid: must be >= 0")
        if not expected_batch_size > 0:
            raise ValueError(
                f"expected_batch_size = {expected_batch_size!r} is invalid: must be > 0"
            )
        if grad_path not in GRAD_PATHS:
            raise ValueError(f"grad_path = {grad_path!r} is invalid: allowed {GRAD_PATHS}")
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        if chunk_slices is not None and not chunk_slices >= 1:
            raise ValueError(f"chunk_slices = {chunk_slices!r} is invalid: must be >= 1")
        self.grad_path = grad_path
        self.chunk_slices = chunk_slices  # None: chunk_slices_for(images)
        self.generator = generator if generator is not None else secure_generator()
        self._validated: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._threads: tuple[int, ThreadPoolExecutor] | None = None

    def __call__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        images: torch.Tensor,
        labels: torch.Tensor,
        groups: Any,
    ) -> dict[str, float]:
        """Leave the clipped, noised, averaged gradient in ``p.grad``; return batch stats.

        ``loss_fn(logits, target)`` must return one loss per slice (never coupling slices).
        ``groups`` gives the unit id of each slice (any ids; slices of a unit share one).
        """
        self._validate(model)
        params = [p for p in model.parameters() if p.requires_grad]
        group_t, k = _dense_groups(groups, len(images))
        if k == 0:
            summed = [torch.zeros_like(p) for p in params]
            loss, norms = float("nan"), torch.zeros(0)
        elif self.grad_path in ("loop", "batched"):
            summed, loss, norms = self._sharded(model, params, loss_fn, images, labels, group_t, k)
        else:  # both Opacus paths: hooks, or vmap(grad) for every layer
            summed, loss, norms = self._opacus(model, params, loss_fn, images, labels, group_t, k)
        std = self.noise_multiplier * self.max_grad_norm
        for p, s in zip(params, summed, strict=True):
            p.grad = (s + self._noise(std, s)) / self.expected_batch_size
        clipped = float((norms > self.max_grad_norm).double().mean()) if k else 0.0
        return {"loss": loss, "units": k, "clipped_fraction": clipped}

    def _validate(self, model: nn.Module) -> None:
        """Refuse layers that couple samples (BatchNorm...): clipping would not bound a unit."""
        if model in self._validated:
            return
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"model is not DP-SGD ready: {'; '.join(str(e) for e in errors[:3])}")
        self._validated.add(model)

    def _noise(self, std: float, ref: torch.Tensor) -> torch.Tensor:
        """Opacus's ``_generate_noise`` (non-secure branch), in the reference's dtype."""
        if std == 0:
            return torch.zeros_like(ref)
        noise = torch.normal(
            mean=0.0,
            std=std,
            size=ref.shape,
            generator=self.generator,
            dtype=ref.dtype,
            device=self.generator.device,
        )
        return noise.to(ref.device)

    # ---- per-unit gradient paths -------------------------------------------------------
    def _sharded(
        self,
        model: nn.Module,
        params: Sequence[torch.Tensor],
        loss_fn: LossFn,
        images: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
        k: int,
    ) -> tuple[list[torch.Tensor], float, torch.Tensor]:
        """The loop and batched paths: work items (one unit, or a chunk of whole units; the
        loop's chunks hold one unit) sharded over ``torch.get_num_threads()`` worker threads,
        each single-threaded.

        A pass over one unit or a few slices is too small for intra-op threads to help; the
        ops release the GIL, so threads over items use the cores. Shard ``j`` takes items
        ``j, j+w, ...`` and the partial sums are added in shard order, so the result does not
        depend on thread timing.
        """
        size = 1 if self.grad_path == "loop" else self.chunk_slices or chunk_slices_for(images)
        items = _chunks(groups, k, size)
        saved = torch.get_num_threads()
        workers = min(saved, len(items))

        def shard(mine: list[list[int]]) -> _Part:
            return self._clipped_sum(model, params, loss_fn, images, labels, groups, mine)

        if workers == 1:
            parts = [shard(items)]
        else:

            def single_threaded(mine: list[list[int]]) -> _Part:
                torch.set_num_threads(1)
                return shard(mine)

            shards = [items[j::workers] for j in range(workers)]
            try:
                parts = list(self._pool(workers).map(single_threaded, shards))
            finally:
                torch.set_num_threads(saved)
        summed = [torch.stack(ts).sum(0) for ts in zip(*(p[0] for p in parts), strict=True)]
        norms = torch.empty(k, dtype=torch.float64)
        for _, _, unit_norms in parts:
            for u, n in unit_norms.items():
                norms[u] = n
        return summed, sum(p[1] for p in parts) / len(images), norms

    def _clipped_sum(
        self,
        model: nn.Module,
        params: Sequence[torch.Tensor],
        loss_fn: LossFn,
        images: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
        items: list[list[int]],
    ) -> _Part:
        """For each item (one unit, or a chunk of whole units) its units' gradients, each
        clipped; returns their sum, the summed loss and the unit norms."""
        summed = [torch.zeros_like(p) for p in params]
        norms: dict[int, float] = {}
        total = 0.0
        for units in items:
            grads, loss = _unit_grads(model, params, loss_fn, images, labels, groups, units)
            total += loss
            clipped, unit_norms = clip_and_sum(grads, self.max_grad_norm)
            for s, c in zip(summed, clipped, strict=True):
                s.add_(c)
            for u, n in zip(units, unit_norms.double().cpu().tolist(), strict=True):
                norms[u] = n
        return summed, total, norms

    def _pool(self, workers: int) -> ThreadPoolExecutor:
        """A pool kept for the life of this object (threads are cheap to keep, slow to start)."""
        if self._threads is None or self._threads[0] != workers:
            if self._threads is not None:
                self._threads[1].shutdown(wait=False)
            self._threads = (workers, ThreadPoolExecutor(workers, thread_name_prefix="dp-unit"))
        return self._threads[1]

    def _opacus(
        self,
        model: nn.Module,
        params: Sequence[torch.Tensor],
        loss_fn: LossFn,
        images: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor,
        k: int,
    ) -> tuple[list[torch.Tensor], float, torch.Tensor]:
        """One batched pass with Opacus hooks, wrapped for this call only: the hooks and
        per-sample attributes are removed afterwards, so the caller's model is left as it was
        (same parameter tensors; ``p.grad`` is overwritten by the caller)."""
        from opacus import GradSampleModule

        if not model.training:
            raise ValueError(
                f"grad_path {self.grad_path!r} needs model.train(): Opacus only "
                "capture activations in training mode"
            )
        saved = [p.grad for p in params]
        gsm = GradSampleModule(
            model,
            batch_first=True,
            loss_reduction="sum",
            force_functorch=self.grad_path == "functorch",
        )
        try:
            per_sample = loss_fn(gsm(images), labels)
            loss = float(per_sample.detach().mean())
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
        summed, norms = clip_and_sum(per_unit(per_slice, groups, k), self.max_grad_norm)
        return summed, loss, norms.detach().double().cpu()


def _unit_grads(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    loss_fn: LossFn,
    images: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    units: list[int],
) -> tuple[list[torch.Tensor], float]:
    """Each unit's gradient (its slices' losses summed), as ``[len(units), *p.shape]`` per
    parameter, and the units' summed loss.

    One unit: its ordinary gradient, one backward (the loop). Several: per-slice gradients
    from one batched pass, summed per unit (slice losses never couple).
    """
    unit_t = torch.as_tensor(units, dtype=torch.long, device=groups.device)
    match = groups[:, None] == unit_t[None, :]
    sel = torch.nonzero(match.any(1)).flatten()
    x, y = images[sel.to(images.device)], labels[sel.to(images.device)]
    if len(units) == 1:
        losses = loss_fn(model(x), y)
        grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
        one = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        return [g[None] for g in one], float(losses.detach().sum())
    per_slice, losses = per_sample_grads(model, loss_fn, x, y, params)
    local = match[sel].long().argmax(1)  # each slice's unit, as an index in ``units``
    if torch.equal(local, torch.arange(len(units))):  # one slice per unit, in order
        return per_slice, float(losses.sum())
    return per_unit(per_slice, local, len(units)), float(losses.sum())


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
