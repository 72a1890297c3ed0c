"""The randomness DP-SGD hides: Poisson batches of privacy units and the Gaussian noise.

Both are seeded from OS entropy, never from the experiment seed, on any device: the batch
composition and the noise cannot be replayed by whoever knows the config.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch


def secure_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from OS entropy, never from the experiment seed.

    The seed is secret, so the noise cannot be replayed by whoever knows the config. A CUDA
    generator draws on the GPU (Philox) from its own secret seed: no draw on the CPU and no
    copy per step. This is not Opacus's ``secure_mode`` (that needs ``torchcsprng``, which
    cannot be installed here, and also hardens against floating-point attacks on the
    Gaussian sampler).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63))
    return gen


class PoissonUnitSampler:
    """Each step includes each unit independently with probability ``sample_rate``.

    Draws on the CPU with NumPy whatever the training device: it picks slice indices, which
    are read from the (memory-mapped) cache on the CPU before the batch is moved.
    """

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
