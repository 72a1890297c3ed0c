"""The threat model of the gradient-inversion attack, and what the server actually receives.

Every attack result carries its :class:`ThreatModel` (printed and serialised), because a
reconstruction number means nothing without saying what the attacker was allowed to see
(breaching's convention, Geiping et al. 2020). :class:`ServerPayload` is that view: global
weights + architecture (the model), the loss, the site's weight update and the sample count.
Nothing in it is private; the site's images and masks never enter it.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from privseg.config import AttackConfig, Config
from privseg.core.errors import ConfigError
from privseg.privacy.plan import DPPlan

THREATS = {
    "T1": "one local SGD step on a batch of B slices; the update / lr is the averaged gradient",
    "T2": "k local SGD steps on the batch (FedAvg-style); the attacker replays them "
    "differentiably and matches the weight difference",
    "T3": "T1 (k = 1) or T2 (k > 1) with the site's real DP-SGD (per-sample clipping to C, "
    "Gaussian noise sigma * C); the attacker knows C and sigma",
}
MASK_MODES = {
    "given": "the attacker knows the label masks (worst case)",
    "joint": "masks optimised jointly with the images (logits through a sigmoid)",
    "predicted": "masks are the global model's prediction on the current dummy images",
}
SEES = (
    "global weights",
    "architecture",
    "loss function",
    "the site's weight update",
    "local learning rate",
    "number of local steps",
    "batch size",
    "number of samples",
)


def _choice(name: str, value: str, allowed: dict[str, str]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{name} = {value!r} is invalid{hint}: allowed values are "
            + ", ".join(repr(a) for a in allowed)
        )


@dataclass(frozen=True)
class ThreatModel:
    """What an honest-but-curious server knows when it attacks one site's update.

    The local optimiser is plain SGD (the FedAvg setting of Geiping et al.); the update the
    server receives is ``w_global - w_local``. ``dp`` is True exactly for T3.
    """

    threat: str = "T1"
    batch_size: int = 1
    local_steps: int = 1
    lr: float = 0.1
    mask: str = "given"
    resolution: int = 64
    architecture: str = "unet"
    loss: str = "DiceBCELoss (per-sample, batch mean)"
    num_samples: int = 1
    max_grad_norm: float | None = None
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    dp_aware: bool = True
    local_optimizer: str = "sgd"
    sees: tuple[str, ...] = field(default=SEES)

    def __post_init__(self) -> None:
        _choice("attack.threat", self.threat, THREATS)
        _choice("attack.mask", self.mask, MASK_MODES)
        if not 1 <= self.batch_size <= 32:
            raise ConfigError(f"attack.batch_size = {self.batch_size} is invalid: allowed 1..32")
        if self.local_steps < 1:
            raise ConfigError(f"local steps = {self.local_steps} is invalid: must be >= 1")
        if self.threat == "T1" and self.local_steps != 1:
            raise ConfigError("threat T1 is one local step: local_steps must be 1 (use T2)")
        if self.threat == "T2" and self.local_steps < 2:
            raise ConfigError("threat T2 replays several local steps: local_steps must be >= 2")
        if not self.lr > 0:
            raise ConfigError(f"local lr = {self.lr} is invalid: must be > 0")
        if self.dp:
            if self.max_grad_norm is None or not self.max_grad_norm > 0:
                raise ConfigError("threat T3 needs a positive clip norm (privacy.max_grad_norm)")
            if self.noise_multiplier is None or self.noise_multiplier < 0:
                raise ConfigError("threat T3 needs a noise multiplier >= 0")

    @property
    def dp(self) -> bool:
        return self.threat == "T3"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sees"] = list(self.sees)
        d["dp"] = self.dp
        d["description"] = THREATS[self.threat]
        d["mask_description"] = MASK_MODES[self.mask]
        return d

    def describe(self) -> str:
        """One paragraph for logs and the CLI."""
        dp = (
            f"; DP-SGD clip C={self.max_grad_norm:g}, noise sigma={self.noise_multiplier:.4g}"
            + (f" (epsilon={self.epsilon:g}, delta={self.delta:g})" if self.epsilon else "")
            if self.dp
            else "; no DP"
        )
        return (
            f"{self.threat}: {THREATS[self.threat]}. B={self.batch_size}, k={self.local_steps}, "
            f"lr={self.lr:g}, {self.resolution}px {self.architecture}, mask {self.mask} "
            f"({MASK_MODES[self.mask]}){dp}. The server sees: {', '.join(self.sees)}."
        )

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        *,
        dp: DPPlan | None = None,
        local_steps: int | None = None,
        num_samples: int | None = None,
    ) -> ThreatModel:
        """The threat of ``cfg.attack`` against a site trained with ``cfg`` (lr, local steps).

        ``dp`` (the site's DP-SGD plan) turns the threat into T3. T3 takes one local step
        unless ``local_steps`` says otherwise (T3 = T1 or T2 under DP-SGD).
        """
        a: AttackConfig = cfg.attack
        threat = "T3" if dp is not None else a.threat
        if threat == "T3" and dp is None:
            raise ConfigError("threat T3 needs the DP setting (noise multiplier, clip norm)")
        if local_steps is None:
            multi = a.threat == "T2"  # T2, or T3 built on T2 (dp given with attack.threat T2)
            local_steps = max(2, cfg.federated.local_steps) if multi else 1
        return cls(
            threat=threat,
            batch_size=a.batch_size,
            local_steps=local_steps,
            lr=cfg.train.lr,
            mask=a.mask,
            resolution=cfg.data.resolution,
            architecture=cfg.model.name,
            num_samples=num_samples if num_samples is not None else a.batch_size,
            **({} if dp is None else dp_fields(dp)),
        )


def dp_fields(plan: DPPlan) -> dict[str, Any]:
    """The threat model's DP fields from a site's plan (the same names as :class:`DPPlan`)."""
    return {
        "max_grad_norm": plan.max_grad_norm,
        "noise_multiplier": plan.noise_multiplier,
        "epsilon": plan.stated_epsilon(),
        "delta": plan.delta,
        "sample_rate": plan.sample_rate,
        "steps": plan.steps,
    }


@dataclass
class ServerPayload:
    """Exactly what the server receives from (or already holds about) one site's round.

    ``model`` carries the global weights and the architecture; ``update`` is
    ``w_global - w_local`` per trainable parameter, in ``model.named_parameters()`` order.
    """

    model: nn.Module
    loss_fn: nn.Module
    update: dict[str, torch.Tensor]
    num_samples: int

    def __post_init__(self) -> None:
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if list(self.update) != names:
            raise ValueError("update must hold one tensor per trainable parameter, in order")
