"""Gradient canaries in a site's real DP-SGD for the one-run audit (``privacy.audit_canaries``).

Each of m canaries is a fixed random unit direction in parameter space (drawn from a secret
seed) scaled to the clip norm C: a record whose clipped gradient is the direction itself
(Andrew et al., ICLR 2024; Steinke et al.'s white-box canaries). Each is included with
probability 1/2 (from the same seed); an included canary is Poisson-sampled every step with the
run's sample rate q, independently of the data, and its C * direction is added to the sum of
clipped gradients *before* the Gaussian noise, by :class:`~privseg.privacy.dp_sgd.DPGradient`
itself. So the canaries are records of the same mechanism: the accountant's (epsilon, delta)
per record covers each of them unchanged (q, sigma, steps and delta are per record and do not
depend on n). What changes: n becomes n + the included canaries (about m/2), while the step
still divides by the planned expected batch n*q, so with canaries the average gradient is
scaled by about (n + m/2)/n; the data's own privacy is untouched (the canaries use no data).

Before training only the seed's sha256 (the commitment) leaves the site; the seed, which
rebuilds every direction and inclusion bit, is revealed after training for the audit.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: What a canary is, as audit_run.json names it.
KIND = "gradient: random unit direction x clip norm (white-box)"


def commitment(seed: int) -> str:
    """The sha256 of the seed (decimal text): written before training, checked at the audit."""
    return hashlib.sha256(str(seed).encode()).hexdigest()


def inclusion(seed: int, count: int) -> np.ndarray:
    """Which of ``count`` canaries are in (probability 1/2 each), from the secret seed."""
    return np.random.default_rng([seed, 0]).random(count) < 0.5


def direction(seed: int, index: int, dim: int) -> torch.Tensor:
    """Canary ``index``'s unit direction in a flat parameter vector of ``dim`` (float32, CPU)."""
    gen = torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:7], "big")
    )
    u = torch.randn(dim, generator=gen, dtype=torch.float32)
    return u / u.norm()


def cosine_scores(seed: int, count: int, update: torch.Tensor) -> np.ndarray:
    """Each canary's cosine with a flat update vector (the white-box score of one release)."""
    flat = update.detach().reshape(-1).to("cpu", torch.float32)
    norm = float(flat.norm())
    if norm == 0:
        return np.zeros(count)
    return np.array([float(direction(seed, i, len(flat)) @ flat) / norm for i in range(count)])


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Parameter tensors (any devices) as one flat float32 CPU vector, in order."""
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])


class GradientCanaries:
    """The canaries of one site's DP-SGD: added before the noise, scored on every step.

    Set as ``DPGradient.canaries``; each step calls :meth:`add_to` on the clipped sum and
    :meth:`observe` on the noised sum (the step's release). ``step_scores`` keeps, per canary,
    the max over steps of its cosine with the released gradient (the score of an adversary who
    sees every step); the inclusion bits and directions stay inside this object.
    """

    def __init__(
        self,
        *,
        count: int,
        dim: int,
        max_grad_norm: float,
        sample_rate: float,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        if not count >= 1:
            raise ValueError(f"count = {count!r} is invalid: must be >= 1")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate = {sample_rate!r} is invalid: must be in (0, 1]")
        self.count = int(count)
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self.commitment = commitment(self.seed)
        self.max_grad_norm = float(max_grad_norm)
        self.sample_rate = float(sample_rate)
        self.included = inclusion(self.seed, self.count)
        # one row per canary: m x dim floats (a U-Net of 2M parameters and m = 200: 1.6 GB)
        self.directions = torch.stack([direction(self.seed, i, dim) for i in range(self.count)])
        # the per-step Poisson draw is secret like the data's (OS entropy, not the seed)
        self.rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self.step_scores = np.full(self.count, -np.inf)
        self.steps = 0

    def add_to(self, summed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The clipped-gradient sum with the sampled included canaries added (C x direction)."""
        sampled = self.included & (self.rng.random(self.count) < self.sample_rate)
        if not sampled.any():
            return list(summed)
        extra = self.directions[torch.from_numpy(sampled)].sum(0) * self.max_grad_norm
        out, start = [], 0
        for s in summed:
            part = extra[start : start + s.numel()].view_as(s).to(s.device, s.dtype)
            out.append(s + part)
            start += s.numel()
        return out

    def observe(self, released: Sequence[torch.Tensor]) -> None:
        """Score every canary against one step's released (noised) gradient sum."""
        flat = flatten(released)
        norm = float(flat.norm())
        cos = (self.directions @ flat / norm).double().numpy() if norm > 0 else np.zeros(self.count)
        self.step_scores = np.maximum(self.step_scores, cos)
        self.steps += 1

    def commit(self) -> dict[str, object]:
        """What the site writes before training: the design and the seed's hash, no secret."""
        return {"kind": KIND, "count": self.count, "commitment": self.commitment}

    def reveal(self) -> dict[str, object]:
        """What the site hands the auditor after training: the seed and the step scores."""
        return {
            "kind": KIND,
            "count": self.count,
            "commitment": self.commitment,
            "seed": self.seed,
            "steps": self.steps,
            "step_scores": self.step_scores.tolist(),
        }


def attach_canaries(
    gradient: Any, model: torch.nn.Module, *, count: int, sample_rate: float
) -> GradientCanaries:
    """``count`` canaries (fresh secret seed) on ``model``'s trainable parameters, added by
    ``gradient`` (a :class:`~privseg.privacy.dp_sgd.DPGradient`) from its next step on."""
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gradient.canaries = GradientCanaries(
        count=count, dim=dim, max_grad_norm=gradient.max_grad_norm, sample_rate=sample_rate
    )
    return gradient.canaries
