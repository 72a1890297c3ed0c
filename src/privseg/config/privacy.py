"""The ``[privacy]`` section: DP-SGD at each site, its budget and what a DP site answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from privseg.config.typed import rule
from privseg.core.errors import ConfigError
from privseg.core.plugins import ACCOUNTANTS, GRAD_PATHS

PrivacyUnit = Literal["slice", "patient"]
#: Fewest canaries worth adding: 10 perfect guesses reject epsilon 1.2 at most (ln(10 / 3)).
MIN_CANARIES = 10


DEFAULT_EPSILON = 8.0
"""``privacy.target_epsilon`` unless set; the attack's DP setting when a run has no target."""


@dataclass
class PrivacyConfig:
    """DP-SGD at each site. The noise is ``noise_multiplier``, or calibrated for
    ``target_epsilon`` (this run's epsilon taken alone); with both, the larger noise wins."""

    enabled: bool = False
    unit: PrivacyUnit = field(
        default="slice",
        metadata=rule(help="what one DP 'record' is: one slice (as the paper) or one patient"),
    )
    max_grad_norm: float = field(default=1.0, metadata=rule(gt=0.0, le=1e6))
    noise_multiplier: float | None = field(default=None, metadata=rule(ge=0.0, le=1e4))
    target_epsilon: float | None = field(default=DEFAULT_EPSILON, metadata=rule(gt=0.0, le=1e4))
    delta: float = field(default=1e-5, metadata=rule(gt=0.0, lt=1.0))
    accountant: str = field(
        default="prv",
        metadata=rule(one_of=ACCOUNTANTS, help="privseg.core.plugins.ACCOUNTANTS (Opacus's)"),
    )
    budget_epsilon: float | None = field(
        default=None,
        metadata=rule(gt=0.0, le=1e4, help="site budget over all runs; None = no budget"),
    )
    grad_path: str = field(
        default="auto",
        metadata=rule(
            one_of=GRAD_PATHS,
            also=("auto",),
            help="per-sample gradient implementation (privseg.core.plugins.GRAD_PATHS); auto = the "
            "measured fastest on the device (privseg.privacy.dp_sgd.AUTO_GRAD_PATH)",
        ),
    )
    ledger_dir: str | None = field(
        default=None,
        metadata=rule(
            help="the ledger store's folder (one store keys every patient by content); None = "
            "$PRIVSEG_LEDGER_DIR or the per-user default (privseg.privacy.stores)"
        ),
    )
    allow_nonprivate: bool = field(
        default=False,
        metadata=rule(
            help="with privacy.enabled = false, train even on patients that hold a budget; "
            "every non-private run is recorded in the ledger as epsilon infinite either way"
        ),
    )
    eval_noise: float | None = field(
        default=None,
        metadata=rule(
            ge=0.1,  # below it one answer costs epsilon > 90 and the PRV accountant fails
            le=1e4,
            help="a DP site answers a server's evaluation query with its Dice sums noised by "
            "this multiple of their sensitivity, and records it (Gaussian, per patient); None "
            "= it refuses every evaluation query",
        ),
    )
    eval_queries: int = field(
        default=1,
        metadata=rule(ge=0, le=10_000, help="evaluation queries a DP site answers per run"),
    )
    #: Constant-shape DP steps (privseg.privacy.padding): every step computes on the same
    #: padded batch, the Poisson batch's units plus dummy units (excluded exactly from the
    #: gradient), so a step's duration does not reveal the private batch size. The padded
    #: size is the batch size exceeded with probability <= 1e-9 over the run (about 3x the
    #: expected batch at batch size 16; with patient units each unit is padded to the
    #: largest patient's slices too), so a step costs about that much more compute
    #: (docs/BENCHMARKS.md). false: unpadded steps, faster, whose time leaks the batch size.
    #: None: on at a deployed site (``privseg site`` writes it into the site's floor, where a
    #: server in another hospital times the replies), off where the server is this very
    #: process (simulation, central, local: no step time leaves the machine).
    constant_time: bool | None = field(
        default=None,
        metadata=rule(
            help="pad every DP step to one fixed batch shape so step time does not reveal "
            "the Poisson batch size (about 3x the compute: docs/BENCHMARKS.md); None = on "
            "at a deployed site, off in simulation, central and local runs"
        ),
    )

    audit_canaries: int = field(
        default=0,
        metadata=rule(
            ge=0,
            le=100_000,
            help="m gradient canaries added to each DP site's DP-SGD for the one-run audit "
            "(`privseg audit RUN --whole-run`, docs/AUDIT.md); 0 = off",
        ),
    )

    def check(self) -> None:
        if self.enabled:
            self.noise_source()
        if self.audit_canaries and not self.enabled:
            raise ConfigError(
                f"privacy.audit_canaries = {self.audit_canaries} needs privacy.enabled = true: "
                "canaries audit DP-SGD; set privacy.audit_canaries = 0 without DP"
            )
        if 0 < self.audit_canaries < MIN_CANARIES:
            raise ConfigError(
                f"privacy.audit_canaries = {self.audit_canaries} is invalid: use 0 (off) or at "
                f"least {MIN_CANARIES} (fewer cannot bound epsilon above ~1.2; docs/AUDIT.md)"
            )

    def noise_source(self) -> tuple[float | None, float | None]:
        """``(noise_multiplier, None)`` when the noise is given, else ``(None, target_epsilon)``;
        the one place that refuses a DP setting with neither."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier, None
        if self.target_epsilon is None:
            raise ConfigError(
                "privacy.noise_multiplier and privacy.target_epsilon are both unset: "
                "set one of them when privacy.enabled = true"
            )
        return None, self.target_epsilon
