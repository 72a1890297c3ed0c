"""The sections of the config (``[data]``, ``[model]``, ...): one dataclass each, every field
with its rule; :class:`privseg.config.Config` assembles them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from privseg.config.privacy import PrivacyConfig, PrivacyUnit
from privseg.config.typed import rule
from privseg.core.errors import ConfigError
from privseg.core.plugins import AGGREGATIONS, MODELS, STRATEGIES

__all__ = ["PrivacyConfig", "PrivacyUnit"]  # the [privacy] section

Partition = Literal["auto", "mapping", "iid", "non-iid"]
SlicePolicy = Literal["all", "foreground"]
LrSchedule = Literal["cosine", "constant"]
Threat = Literal["T1", "T2", "T3"]
MaskMode = Literal["given", "joint", "predicted"]
AttackRound = Literal["last", "first"]
StudyCompute = Literal["equal", "as_configured"]
StudySetting = Literal["central", "local", "federated", "federated_dp", "attack"]
#: What ``train.device`` may name (``privseg.core.device.resolve_device`` turns it into a device).
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(?::\d+)?")
#: ``data.classes`` holds at most 8 classes: masks carry them as uint8 bit sets.
MAX_CLASSES = 8
DEVICE_VALUES = "'auto', 'cpu', 'cuda' or 'cuda:N' (N = 0, 1, ...)"


@dataclass
class DataConfig:
    """How MSD volumes become per-site 2D slice caches."""

    resolution: int = field(
        default=64,
        metadata=rule(
            ge=16,
            le=1024,
            multiple_of=8,
            help="in-plane size in pixels (multiple of the model stride, 8)",
        ),
    )
    spacing: float | None = field(
        default=None,
        metadata=rule(
            ge=0.1,
            le=50.0,
            help=(
                "in-plane pixel size in mm: resample each slice to it, then centre-crop or pad "
                "to data.resolution; None = resize the whole slice to data.resolution"
            ),
        ),
    )
    hu_window: list[float] = field(
        default_factory=lambda: [-150.0, 200.0],
        metadata=rule(help="HU window [low, high] mapped to [0, 1]"),
    )
    labels: list[int] = field(
        default_factory=list, metadata=rule(help="label values kept as foreground; [] = all > 0")
    )
    classes: dict[str, list[int]] = field(
        default_factory=dict,
        metadata=rule(
            help=(
                "segmentation classes as label values, e.g. {liver = [1, 2], tumour = [2]} "
                "(may overlap: one sigmoid channel each); {} = one class, data.labels"
            )
        ),
    )
    slice_policy: SlicePolicy = field(
        default="foreground", metadata=rule(help="all slices, or foreground + some empty")
    )
    empty_fraction: float = field(
        default=0.25,
        metadata=rule(
            ge=0.0, le=10.0, help="empty slices kept per foreground slice (policy foreground)"
        ),
    )
    val_fraction: float = field(default=0.2, metadata=rule(ge=0.0, lt=1.0))
    test_fraction: float = field(default=0.2, metadata=rule(gt=0.0, lt=1.0))
    sites: int = field(default=3, metadata=rule(ge=1, le=64))
    partition: Partition = field(
        default="auto", metadata=rule(help="auto: the task's site map if it has one, else iid")
    )
    site_map: str = field(default="", metadata=rule(help="JSON/CSV patient->site file"))
    site_name: str = field(
        default="",
        metadata=rule(help="name of the only site when data.sites = 1; '' = site-0"),
    )
    max_voxels: int = field(
        default=2**28,
        metadata=rule(
            ge=1,
            le=2**31,
            help=(
                "largest volume read (voxels, checked from the header before reading); prepare "
                "needs about 10 bytes per voxel (2^28 = 512 x 512 x 1024: about 2.7 GB)"
            ),
        ),
    )
    nan_hu: float | None = field(
        default=None,
        metadata=rule(
            ge=-1e5, le=1e5, help="HU written over NaN image voxels; None = NaN is an error"
        ),
    )

    def check(self) -> None:
        if self.site_name:
            from privseg.core.errors import DataError
            from privseg.core.output import check_site_name

            try:
                check_site_name(self.site_name, "data.site_name")
            except DataError as exc:
                raise ConfigError(str(exc)) from None
            if self.sites != 1:
                raise ConfigError(
                    f"data.site_name = {self.site_name!r} is invalid with data.sites = "
                    f"{self.sites}: a site can only name itself when it prepares one site"
                )
        lo, hi = (self.hu_window + [math.nan, math.nan])[:2]
        if len(self.hu_window) != 2 or not lo < hi:
            raise ConfigError(
                f"data.hu_window = {self.hu_window!r} is invalid: "
                "expected [low, high] with low < high"
            )
        if any(v <= 0 for v in self.labels):
            raise ConfigError(f"data.labels = {self.labels!r} is invalid: label values must be > 0")
        self._check_classes()
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction = "
                f"{self.val_fraction + self.test_fraction:g} is invalid: must be < 1 "
                "so that some patients are left for training"
            )

    @property
    def n_classes(self) -> int:
        """Output channels of the network: one per class, one for the merged foreground."""
        return len(self.classes) or 1

    def _check_classes(self) -> None:
        if not self.classes:
            return
        why = None
        if self.labels:
            why = "set data.labels = [] (each class names its own label values)"
        elif len(self.classes) > MAX_CLASSES:
            why = f"at most {MAX_CLASSES} classes"
        for name, values in self.classes.items():
            if not name[:1].isalpha() or not name.replace("_", "").replace("-", "").isalnum():
                why = f"class name {name!r} must start with a letter and hold only a-z, 0-9, _, -"
            elif not values or any(v <= 0 for v in values):
                why = f"class {name!r} needs one or more label values > 0"
        if why:
            raise ConfigError(f"data.classes = {self.classes!r} is invalid: {why}")


@dataclass
class ModelConfig:
    """Which DP-ready 2D network to train."""

    name: str = field(
        default="unet",
        metadata=rule(one_of=MODELS, help="the network (core.plugins.MODELS)"),
    )
    features: int = field(
        default=16, metadata=rule(ge=4, le=256, multiple_of=4, help="channels of the first level")
    )
    groups: int = field(default=4, metadata=rule(ge=1, le=64, help="GroupNorm groups"))
    dropout: float = field(default=0.0, metadata=rule(ge=0.0, lt=1.0))

    def check(self) -> None:
        """The model's own rule, from its registration: GroupNorm groups divide every width."""
        for m in MODELS.info(self.name).get("widths", (1,)):
            if (self.features * m) % self.groups:
                raise ConfigError(
                    f"model.groups = {self.groups} is invalid: must divide every channel count "
                    f"of {self.name} (model.features = {self.features} -> {self.features * m} "
                    "channels)"
                )


@dataclass
class TrainConfig:
    """The local optimisation used by central, local-only and federated training."""

    epochs: int = field(
        default=6,
        metadata=rule(
            ge=1,
            le=10_000,
            help="passes over the data (central and local modes); with `steps`, validations",
        ),
    )
    steps: int = field(
        default=0,
        metadata=rule(
            ge=0,
            le=10_000_000,
            help="optimizer steps (central and local modes); 0 = `epochs` passes over the data",
        ),
    )
    batch_size: int = field(
        default=16,
        metadata=rule(ge=1, le=4096, help="(expected) batch size; with DP the Poisson mean"),
    )
    chunk_slices: int = field(
        default=32,
        metadata=rule(
            ge=1, le=4096, help="slices per forward pass; a larger batch accumulates gradients"
        ),
    )
    # 5e-3 and 24 rounds x 4 local steps: chosen by bench/federated_sweep.py (docs/BENCHMARKS.md)
    lr: float = field(default=5e-3, metadata=rule(gt=0.0, le=10.0))
    lr_schedule: LrSchedule = "cosine"
    lr_final: float = field(
        default=0.05,
        metadata=rule(gt=0.0, le=1.0, help="the cosine schedule's last lr, as a fraction of lr"),
    )
    weight_decay: float = field(default=0.0, metadata=rule(ge=0.0, le=1.0))
    threads: int = field(default=0, metadata=rule(ge=0, le=512, help="torch threads; 0 = all"))
    init: str | None = field(
        default=None,
        metadata=rule(
            help="checkpoint every mode starts from (from `privseg pretrain`, or trained with "
            "DP; one trained on private data without DP is refused); its sha256 and what it "
            "was trained on are recorded; None = the seeded initial model"
        ),
    )
    device: str = field(
        default="auto",
        metadata=rule(
            help="where models, batches, the DP step and evaluation run: auto (the first CUDA "
            "GPU when torch sees one, else the CPU), cpu, cuda or cuda:N"
        ),
    )

    def check(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(
                f"train.device = {self.device!r} is invalid: allowed values are {DEVICE_VALUES}"
            )


@dataclass
class FederatedConfig:
    """Flower federation: rounds, local work per round, aggregation."""

    rounds: int = field(default=24, metadata=rule(ge=1, le=100_000))
    local_steps: int = field(
        default=4, metadata=rule(ge=1, le=100_000, help="optimizer steps per site per round")
    )
    strategy: str = field(
        default="fedavg",
        metadata=rule(one_of=STRATEGIES, help="the server's strategy (core.plugins.STRATEGIES)"),
    )
    weighted: bool = field(
        default=True,
        metadata=rule(help="weight sites by sample count (false = the paper's plain mean)"),
    )
    proximal_mu: float = field(default=0.01, metadata=rule(ge=0.0, le=100.0))
    server_lr: float = field(default=0.01, metadata=rule(gt=0.0, le=10.0))
    min_sites: int = field(
        default=2, metadata=rule(ge=1, le=1000, help="fewest sites a round may complete with")
    )
    round_timeout: float = field(default=600.0, metadata=rule(gt=0.0, le=86_400.0))
    secure_aggregation: bool = field(
        default=False,
        metadata=rule(
            help="SecAgg+: the server sees only the weighted sum of the sites' updates "
            "(needs min_sites >= 3)"
        ),
    )
    secagg_clip: float = field(
        default=1.0,
        metadata=rule(
            gt=0.0,
            le=1e4,
            help="SecAgg+: each coordinate of a site's update (new - global weights) is "
            "clipped to +-secagg_clip before quantisation",
        ),
    )
    #: upper bound of any site's training slices (its weight): a reply claiming more is
    #: refused; SecAgg+ scales by it
    max_examples: int = field(default=1_000_000, metadata=rule(ge=1, le=10**9))
    #: mean (weighted by federated.weighted) or a robust rule, which ignores the sites' sizes
    aggregation: str = field(
        default="mean",
        metadata=rule(one_of=AGGREGATIONS, help="core.plugins.AGGREGATIONS (Flower 1.42's)"),
    )
    malicious_sites: int = field(default=0, metadata=rule(ge=0, le=1000, help="krum, bulyan: f"))
    trim_fraction: float = field(default=0.2, metadata=rule(ge=0.0, lt=0.5, help="trimmed_mean"))
    #: an update (new - global weights) with a norm over this many times the global model's
    #: norm, or over max_update_norm (when set), is refused
    max_update_ratio: float = field(default=10.0, metadata=rule(gt=0.0, le=1e6))
    max_update_norm: float | None = field(default=None, metadata=rule(gt=0.0))

    def check(self) -> None:
        robust = self.aggregation != "mean"
        mean_only = STRATEGIES.info(self.strategy).get("mean_only")
        if robust and (mean_only or self.secure_aggregation):
            why = f"strategy = {self.strategy!r}" if mean_only else "secure_aggregation = true"
            raise ConfigError(
                f"federated.aggregation = {self.aggregation!r} is invalid with federated.{why}: "
                "the server then works on the mean of the updates; use aggregation = 'mean'"
            )
        need = AGGREGATIONS.info(self.aggregation).get("sites_per_malicious")
        if need and self.min_sites < need * self.malicious_sites + 3:
            raise ConfigError(
                f"federated.min_sites = {self.min_sites} is too small for federated.aggregation "
                f"= {self.aggregation!r} with federated.malicious_sites = {self.malicious_sites}: "
                f"it needs at least {need * self.malicious_sites + 3} sites"
            )
        if self.secure_aggregation and self.min_sites < 3:
            raise ConfigError(
                f"federated.min_sites = {self.min_sites} is invalid with "
                "federated.secure_aggregation = true: secure aggregation (SecAgg+) needs at "
                "least 3 sites in every round (with 2, each site could subtract its own update "
                "from the sum and see the other's); set federated.min_sites = 3 or more"
            )


@dataclass
class AttackConfig:
    """Gradient inversion by an honest-but-curious server (Geiping et al. 2020)."""

    threat: Threat = "T1"
    batch_size: int = field(default=1, metadata=rule(ge=1, le=32))
    iterations: int = field(default=200, metadata=rule(ge=1, le=1_000_000))
    restarts: int = field(default=1, metadata=rule(ge=1, le=100))
    lr: float = field(default=0.1, metadata=rule(gt=0.0, le=10.0))
    tv_weight: float = field(default=0.1, metadata=rule(ge=0.0, le=100.0))
    mask: MaskMode = "given"
    #: Which global model the attacked update is computed on: the run's final one ("last": the
    #: site's next update) or the initial one the server broadcast in round 1 ("first"); the
    #: server sees every round, so the attacker may pick the round that leaks most.
    round: AttackRound = "last"
    targets: int = field(
        default=2,
        metadata=rule(ge=1, le=10_000, help="number of attacked updates (one per target batch)"),
    )
    audit_trials: int = field(default=200, metadata=rule(ge=1, le=1_000_000))
    audit_candidates: int = field(default=2, metadata=rule(ge=2, le=1000))


@dataclass
class StudyConfig:
    """The experiment grid that `privseg run` executes."""

    epsilons: list[float] = field(default_factory=lambda: [1.0, 3.0, 8.0])
    settings: list[StudySetting] = field(
        default_factory=lambda: ["central", "local", "federated", "federated_dp", "attack"]
    )
    compute: StudyCompute = field(
        default="equal",
        metadata=rule(
            help="equal: central and local-only get the federated run's steps and slices per "
            "site; as_configured: each mode's own [train] schedule"
        ),
    )

    def check(self) -> None:
        if any(not (e > 0 and math.isfinite(e)) for e in self.epsilons):
            raise ConfigError(
                f"study.epsilons = {self.epsilons!r} is invalid: expected a list of positive, "
                "finite numbers (empty: one DP setting at privacy.noise_multiplier)"
            )
