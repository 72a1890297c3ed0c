"""The DP-SGD gradient: per-unit clipping, one Gaussian noise draw per batch, Poisson sampling.

A privacy *unit* is one slice or all slices of one patient. Each unit's gradient (its slices'
per-sample losses summed) is clipped to norm C with Opacus's exact clip factor, the clipped
gradients are summed, N(0, (sigma*C)^2) noise is added once per coordinate, and the result is
divided by the expected batch size (Poisson sampling: the real size is random and private).
Interchangeable per-unit gradient paths give identical results (speed: ``bench/dp_step.py``):
``"batched"`` (per-sample gradients from one batched pass per chunk of about 4 slices, see
:mod:`privseg.privacy.per_sample`; chunks sharded over threads; the fastest on CPU),
``"loop"`` (one backward per unit, sharded over threads; the leanest), ``"opacus"`` (Opacus's
per-layer hooks) and ``"functorch"`` (Opacus with ``vmap(grad)``); ``"auto"`` picks one per
device (:data:`AUTO_GRAD_PATH`). Paths are looked up in :data:`privseg.core.plugins.GRAD_PATHS`: a
path is a :data:`GradPathFn`.

Everything runs where the model's parameters are (CPU or CUDA); norms, clip factors and noise
are computed in the parameters' dtype (float32 for privseg's models, never lower).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from privseg.core.plugins import GRAD_PATHS
from privseg.privacy.canaries import GradientCanaries
from privseg.privacy.sampling import secure_generator
from privseg.privacy.unit_grads import (
    LossFn,
    PathResult,
    UnitBatch,
    chunks,
    clip_and_sum,
    dense_groups,
    mean_loss,
    real_mask,
    unit_grads,
)

__all__ = ["AUTO_GRAD_PATH", "GRAD_PATHS", "DPGradient", "GradPathFn", "resolve_grad_path"]
#: ``privacy.grad_path = "auto"`` by device type. CPU: measured (bench/dp_step.py, see
#: CHUNK_PIXELS). CUDA: PROVISIONAL, "opacus", the fastest DP path measured on a GPU so far
#: (one H200, U-Net 16 features, batch 32, before "batched" existed; docs/BENCHMARKS.md):
#: Opacus hooks 4.4x / 4.7x / 2.9x the plain step at 64 / 128 / 256 px, fast gradient clipping
#: 4.3x / 4.4x / 2.8x, the loop 48x / 41x / 20x. "batched" on a GPU is unmeasured:
#: bench/gpu_session.sh compares all of them (docs/GPU.md).
AUTO_GRAD_PATH = {"cpu": "batched", "cuda": "opacus"}
#: Pixels per ``batched`` chunk: 4 slices of 64x64 (bench/dp_step.py, batch 32, 2 threads: at
#: 64 px, chunks of 4 keep the peak memory near the fastest non-private step's, 8 were ~3 %
#: faster at 2.4x the memory; from 128 px on, one slice per pass is enough work and single-slice
#: chunks, i.e. the loop, were fastest).
CHUNK_PIXELS = 4 * 64 * 64
#: The same on CUDA, PROVISIONAL until measured (bench/gpu_session.sh times chunks of 4 to
#: 32 slices): a GPU wants large kernels, so the whole batch of 32 in one pass up to 128 px,
#: 16 slices per pass at 256 px.
CUDA_CHUNK_PIXELS = 16 * 256 * 256


def chunk_slices_for(images: torch.Tensor) -> int:
    """Slices per ``batched`` chunk for slices of this size on their device (at least one)."""
    pixels = CUDA_CHUNK_PIXELS if images.device.type == "cuda" else CHUNK_PIXELS
    return max(1, pixels // max(1, math.prod(images.shape[2:])))


def resolve_grad_path(grad_path: str, device: torch.device) -> str:
    """The per-unit gradient path ``grad_path`` names on ``device`` ("auto": by device)."""
    if grad_path != "auto":
        return GRAD_PATHS.check(grad_path)
    return AUTO_GRAD_PATH.get(torch.device(device).type, AUTO_GRAD_PATH["cpu"])


#: One shard's result: sum of its clipped unit gradients, its summed loss, its unit norms.
_Part = tuple[list[torch.Tensor], float, dict[int, float]]


class DPGradient:
    """Computes one DP-SGD gradient into ``p.grad`` of every trainable parameter."""

    def __init__(
        self,
        *,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        grad_path: str = "auto",
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
        if grad_path != "auto":
            GRAD_PATHS.check(grad_path)
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        if chunk_slices is not None and not chunk_slices >= 1:
            raise ValueError(f"chunk_slices = {chunk_slices!r} is invalid: must be >= 1")
        self.grad_path = grad_path  # "auto": resolve_grad_path on the parameters' device
        self.chunk_slices = chunk_slices  # None: chunk_slices_for(images)
        # A given generator draws the noise on its own device (copied to the parameters'): a
        # seeded CPU one makes a simulation reproducible on any device. None: an OS-seeded
        # generator on the parameters' device, made on first use.
        self.generator = generator
        self._own_generators: dict[torch.device, torch.Generator] = {}
        self._validated: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._threads: tuple[int, ThreadPoolExecutor] | None = None
        # privacy.audit_canaries: records added before the noise, scored on each release
        self.canaries: GradientCanaries | None = None

    def __call__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        images: torch.Tensor,
        labels: torch.Tensor,
        groups: Any,
        real: Any = None,
    ) -> dict[str, float]:
        """Leave the clipped, noised, averaged gradient in ``p.grad``; return batch stats.

        ``loss_fn(logits, target)`` must return one loss per slice (never coupling slices).
        ``groups`` gives the unit id of each slice (any ids; slices of a unit share one).
        ``real`` (one bool per slice; None: all True) marks the slices of a padded batch
        (:mod:`privseg.privacy.padding`) that count: the others are computed like real ones
        but excluded exactly (their losses and per-sample gradients are selected out, never
        multiplied by 0), so the gradient is that of the real slices alone, and a unit
        without a real slice adds exactly 0 and is not counted in the stats.
        """
        self._validate(model)
        params = [p for p in model.parameters() if p.requires_grad]
        group_t, k = dense_groups(groups, len(images))
        keep = real_mask(real, len(images))
        path = self.path_on(params[0].device if params else images.device)
        if k == 0:
            summed = [torch.zeros_like(p) for p in params]
            loss, norms = float("nan"), torch.zeros(0)
        else:
            batch = UnitBatch(model, params, loss_fn, images, labels, (group_t, keep), k)
            summed, loss, norms = GRAD_PATHS.get(path)(self, batch)
        if self.canaries is not None:
            summed = self.canaries.add_to(summed)
        std = self.noise_multiplier * self.max_grad_norm
        released = [s + self._noise(std, s) for s in summed]
        if self.canaries is not None:
            self.canaries.observe(released)
        for p, r in zip(params, released, strict=True):
            p.grad = r / self.expected_batch_size
        live = torch.ones(k, dtype=torch.bool)  # units with a real slice
        if keep is not None:
            live = torch.zeros(k, dtype=torch.bool).index_fill_(0, group_t[keep], True)
        units = int(live.sum())
        clipped = float((norms[live] > self.max_grad_norm).double().mean()) if units else 0.0
        return {"loss": loss, "units": units, "clipped_fraction": clipped}

    def path_on(self, device: torch.device) -> str:
        """The per-unit gradient path this object runs for parameters on ``device``."""
        return resolve_grad_path(self.grad_path, device)

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
        """Opacus's ``_generate_noise`` (non-secure branch), in the reference's dtype, drawn
        on the generator's device and moved to the reference's."""
        if std == 0:
            return torch.zeros_like(ref)
        gen = self.generator
        if gen is None:
            gen = self._own_generators.get(ref.device)
            if gen is None:
                gen = self._own_generators[ref.device] = secure_generator(ref.device)
        noise = torch.normal(
            mean=0.0, std=std, size=ref.shape, generator=gen, dtype=ref.dtype, device=gen.device
        )
        return noise.to(ref.device)

    # ---- our per-unit gradient paths ---------------------------------------------------
    def sharded(self, batch: UnitBatch, *, loop: bool) -> PathResult:
        """The loop and batched paths: work items (one unit, or a chunk of whole units; the
        loop's chunks hold one unit) sharded over ``torch.get_num_threads()`` worker threads,
        each single-threaded (on the CPU; a GPU runs the items in order from one thread).

        A pass over one unit or a few slices is too small for intra-op threads to help; the
        ops release the GIL, so threads over items use the cores. Shard ``j`` takes items
        ``j, j+w, ...`` and the partial sums are added in shard order, so the result does not
        depend on thread timing.
        """
        params, images, slices, k = batch.params, batch.images, batch.slices, batch.units
        size = 1 if loop else self.chunk_slices or chunk_slices_for(images)
        items = chunks(slices[0], k, size)
        saved = torch.get_num_threads()
        workers = 1 if params and params[0].device.type != "cpu" else min(saved, len(items))

        def shard(mine: list[list[int]]) -> _Part:
            return self._clipped_sum(batch, mine)

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
        return summed, mean_loss(sum(p[1] for p in parts), slices[1], len(images)), norms

    def _clipped_sum(self, batch: UnitBatch, items: list[list[int]]) -> _Part:
        """For each item (one unit, or a chunk of whole units) its units' gradients, each
        clipped; returns their sum, the summed loss and the unit norms."""
        b = batch
        summed = [torch.zeros_like(p) for p in b.params]
        norms: dict[int, float] = {}
        total = 0.0
        for units in items:
            grads, loss = unit_grads(
                b.model, b.params, b.loss_fn, b.images, b.labels, b.slices, units
            )
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


#: A per-unit gradient path: ``(the DPGradient, the batch) -> PathResult``.
GradPathFn = Callable[[DPGradient, UnitBatch], PathResult]


def batched_path(dp: DPGradient, batch: UnitBatch) -> PathResult:
    """``privacy.grad_path = "batched"``: chunks of whole units, one batched pass each."""
    return dp.sharded(batch, loop=False)


def loop_path(dp: DPGradient, batch: UnitBatch) -> PathResult:
    """``privacy.grad_path = "loop"``: one backward per unit."""
    return dp.sharded(batch, loop=True)
