"""Constant-shape DP steps: every step computes on the same padded batch, whatever its size.

The Poisson batch size is private, but an unpadded step's duration grows with it (issue 22
measured Pearson r = 0.88 between batch size and step time on the loop path at 128²; see
bench/dp_timing.py), and whoever times a site's replies sees the durations. So with
``privacy.constant_time`` every step computes on ``units_cap`` unit *slots* of
``unit_slices`` slices each:

- ``units_cap`` (:func:`batch_cap`) is the smallest ``b`` with
  ``steps * P[Binomial(n_units, q) > b] <= OVERFLOW_PROBABILITY``: over the whole run, a batch
  larger than the padded one happens with probability at most 1e-9 (union bound). Such a batch
  is still computed in full, never truncated (the accounting assumes every sampled unit
  counts); it takes longer, and the site logs it locally.
- ``unit_slices`` is the most slices any unit has (1 for ``privacy.unit = "slice"``; for
  patients, the largest patient's slice count): slot ``s`` holds unit ``s``'s slices, then
  dummy slices; slots past the real units hold only dummy slices. A patient stays one group.
- Dummy slices are slices of the split drawn uniformly at random (the same reads and the same
  arithmetic as real ones), marked ``real = False``.
  :class:`~privseg.privacy.dp_sgd.DPGradient` excludes them exactly: their losses are left
  out of every sum (the backward sends them a zero gradient) and their per-sample gradients
  are zeroed by selection, never by multiplication, before the per-unit sums; a slot without
  a real slice has gradient exactly 0 and is not counted. In the loop's pass over one patient
  a dummy slice adds 0 x its activations (exactly 0: the dummies are real, finite slices).
  The released gradient is the unpadded step's function of the real units; only rounding
  may differ (float sums in another order).

Cost: the step always does the work of ``units_cap * unit_slices`` slices instead of the
Poisson batch (mean ``q * n_units`` units); numbers in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

#: The probability, over a whole run, that some Poisson batch is larger than the padded one
#: (and so takes longer). A union bound over the run's steps.
OVERFLOW_PROBABILITY = 1e-9


def batch_cap(
    n_units: int, sample_rate: float, steps: int, overflow: float = OVERFLOW_PROBABILITY
) -> int:
    """The smallest ``b`` with ``steps * P[Binomial(n_units, sample_rate) > b] <= overflow``."""
    from scipy.stats import binom

    if n_units < 1 or steps < 1 or not 0 < sample_rate <= 1 or not 0 < overflow < 1:
        raise ValueError(
            f"batch_cap needs n_units >= 1, steps >= 1, 0 < q <= 1, 0 < overflow < 1; got "
            f"n_units={n_units}, steps={steps}, q={sample_rate}, overflow={overflow}"
        )
    tail = binom.sf(np.arange(n_units + 1), n_units, sample_rate)  # P[X > b], b = 0..n
    ok = np.flatnonzero(tail * steps <= overflow)  # tail[n] = 0: never empty
    return int(ok[0])


class Batch(NamedTuple):
    """One DP step's slices: ``idx`` (slice indices into the split), ``groups`` (each slice's
    unit slot 0..k-1) and ``real`` (False for a dummy slice, which never enters the gradient)."""

    idx: np.ndarray
    groups: np.ndarray
    real: np.ndarray


class ConstantShapeBatches:
    """Pads Poisson batches (slice indices, unit group 0..k-1 per slice) to ``units_cap`` slots
    of ``unit_slices`` slices each; see the module docstring. ``units``: the unit id of each
    slice of the split (as :class:`~privseg.privacy.sampling.PoissonUnitSampler` takes them)."""

    def __init__(
        self,
        units: np.ndarray,
        *,
        sample_rate: float,
        steps: int,
        rng: np.random.Generator,
        overflow: float = OVERFLOW_PROBABILITY,
    ) -> None:
        _, unit_of_slice = np.unique(np.asarray(units), return_inverse=True)
        counts = np.bincount(unit_of_slice.reshape(-1))
        self.n_slices = len(unit_of_slice)
        self.n_units = len(counts)
        self.unit_slices = int(counts.max())
        self.units_cap = batch_cap(self.n_units, sample_rate, steps, overflow)
        self.overflow = overflow
        self.rng = rng
        self.overflows = 0  # batches that were larger than the cap (computed in full)

    @property
    def slices(self) -> int:
        """Slices per padded step."""
        return self.units_cap * self.unit_slices

    def pad(self, idx: np.ndarray, groups: np.ndarray) -> Batch:
        """The padded batch: slot ``s`` holds unit ``s``'s slices first, then dummies."""
        idx, groups = np.asarray(idx, dtype=np.int64), np.asarray(groups, dtype=np.int64)
        k = int(groups.max()) + 1 if len(groups) else 0
        slots = self.units_cap
        if k > slots:
            self.overflows += 1
            log.warning(
                "DP step: Poisson batch of %d units is larger than the padded %d (probability "
                "<= %g over the run): computed in full, so this step takes longer",
                k,
                slots,
                self.overflow,
            )
            slots = k
        m = self.unit_slices
        order = np.argsort(groups, kind="stable")
        idx, groups = idx[order], groups[order]
        rank = np.arange(len(groups)) - np.searchsorted(groups, groups)  # position in its unit
        pos = groups * m + rank
        out_idx = self.rng.integers(0, self.n_slices, size=slots * m, dtype=np.int64)
        real = np.zeros(slots * m, dtype=bool)
        out_idx[pos] = idx
        real[pos] = True
        return Batch(out_idx, np.repeat(np.arange(slots, dtype=np.int64), m), real)
