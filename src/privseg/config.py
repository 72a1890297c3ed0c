"""One typed, validated configuration for every privseg command.

The config is a tree of dataclasses. It is read from a TOML file, then CLI overrides
(``section.field=value``) are applied, then every field is validated. A bad value raises
:class:`~privseg.errors.ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from privseg.errors import ConfigError

ModelName = Literal["unet", "monet"]
Partition = Literal["auto", "mapping", "iid", "non-iid"]
SlicePolicy = Literal["all", "foreground"]
LrSchedule = Literal["cosine", "constant"]
Accountant = Literal["prv", "rdp"]
PrivacyUnit = Literal["slice", "patient"]
GradPath = Literal["batched", "loop", "opacus", "functorch"]
Strategy = Literal["fedavg", "fedprox", "fedadam"]
Threat = Literal["T1", "T2", "T3"]
MaskMode = Literal["given", "joint", "predicted"]
AttackRound = Literal["last", "first"]
StudySetting = Literal["central", "local", "federated", "federated_dp", "attack"]


def _rule(**kwargs: Any) -> dict[str, Any]:
    """Field metadata: numeric bounds (gt, ge, lt, le) and a short help text."""
    return kwargs


@dataclass
class DataConfig:
    """How MSD volumes become per-site 2D slice caches."""

    resolution: int = field(
        default=64,
        metadata=_rule(
            ge=16,
            le=1024,
            multiple_of=8,
            help="in-plane size in pixels (multiple of the model stride, 8)",
        ),
    )
    hu_window: list[float] = field(
        default_factory=lambda: [-150.0, 200.0],
        metadata=_rule(help="HU window [low, high] mapped to [0, 1]"),
    )
    labels: list[int] = field(
        default_factory=list, metadata=_rule(help="label values kept as foreground; [] = all > 0")
    )
    slice_policy: SlicePolicy = field(
        default="foreground", metadata=_rule(help="all slices, or foreground + some empty")
    )
    empty_fraction: float = field(
        default=0.25,
        metadata=_rule(
            ge=0.0, le=10.0, help="empty slices kept per foreground slice (policy foreground)"
        ),
    )
    val_fraction: float = field(default=0.2, metadata=_rule(ge=0.0, lt=1.0))
    test_fraction: float = field(default=0.2, metadata=_rule(gt=0.0, lt=1.0))
    sites: int = field(default=3, metadata=_rule(ge=1, le=64))
    partition: Partition = field(
        default="auto", metadata=_rule(help="auto: the task's site map if it has one, else iid")
    )
    site_map: str = field(default="", metadata=_rule(help="JSON/CSV patient->site file"))
    site_name: str = field(
        default="",
        metadata=_rule(help="name of the only site when data.sites = 1; '' = site-0"),
    )
    nan_hu: float | None = field(
        default=None,
        metadata=_rule(
            ge=-1e5, le=1e5, help="HU written over NaN image voxels; None = NaN is an error"
        ),
    )

    def check(self) -> None:
        if self.site_name:
            from privseg.data.sites import check_site_name
            from privseg.errors import DataError

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
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction = "
                f"{self.val_fraction + self.test_fraction:g} is invalid: must be < 1 "
                "so that some patients are left for training"
            )


@dataclass
class ModelConfig:
    """Which DP-ready 2D network to train."""

    name: ModelName = field(default="unet", metadata=_rule(help="unet or monet (the paper's)"))
    features: int = field(
        default=16, metadata=_rule(ge=4, le=256, multiple_of=4, help="channels of the first level")
    )
    groups: int = field(default=4, metadata=_rule(ge=1, le=64, help="GroupNorm groups"))
    dropout: float = field(default=0.0, metadata=_rule(ge=0.0, lt=1.0))

    def check(self) -> None:
        if self.features % self.groups:
            raise ConfigError(
                f"model.groups = {self.groups} is invalid: must divide model.features "
                f"({self.features})"
            )


@dataclass
class TrainConfig:
    """The local optimisation used by central, local-only and federated training."""

    epochs: int = field(
        default=6,
        metadata=_rule(ge=1, le=10_000, help="passes over the data (central and local modes)"),
    )
    batch_size: int = field(
        default=16,
        metadata=_rule(ge=1, le=4096, help="(expected) batch size; with DP the Poisson mean"),
    )
    lr: float = field(default=2e-3, metadata=_rule(gt=0.0, le=10.0))
    lr_schedule: LrSchedule = "cosine"
    weight_decay: float = field(default=0.0, metadata=_rule(ge=0.0, le=1.0))
    threads: int = field(default=0, metadata=_rule(ge=0, le=512, help="torch threads; 0 = all"))


@dataclass
class PrivacyConfig:
    """DP-SGD at each site. Exactly one of noise_multiplier / target_epsilon drives the noise."""

    enabled: bool = False
    unit: PrivacyUnit = field(
        default="slice",
        metadata=_rule(help="what one DP 'record' is: one slice (as the paper) or one patient"),
    )
    max_grad_norm: float = field(default=1.0, metadata=_rule(gt=0.0, le=1e6))
    noise_multiplier: float | None = field(default=None, metadata=_rule(ge=0.0, le=1e4))
    target_epsilon: float | None = field(default=8.0, metadata=_rule(gt=0.0, le=1e4))
    delta: float = field(default=1e-5, metadata=_rule(gt=0.0, lt=1.0))
    accountant: Accountant = "prv"
    budget_epsilon: float | None = field(
        default=None,
        metadata=_rule(gt=0.0, le=1e4, help="site budget over all runs; None = no budget"),
    )
    grad_path: GradPath = field(
        default="batched", metadata=_rule(help="per-sample gradient implementation")
    )

    def check(self) -> None:
        if self.enabled:
            self.noise_source()

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


@dataclass
class FederatedConfig:
    """Flower federation: rounds, local work per round, aggregation."""

    rounds: int = field(default=6, metadata=_rule(ge=1, le=100_000))
    local_steps: int = field(
        default=8, metadata=_rule(ge=1, le=100_000, help="optimizer steps per site per round")
    )
    strategy: Strategy = "fedavg"
    weighted: bool = field(
        default=True,
        metadata=_rule(help="weight sites by sample count (false = the paper's plain mean)"),
    )
    proximal_mu: float = field(default=0.01, metadata=_rule(ge=0.0, le=100.0))
    server_lr: float = field(default=0.01, metadata=_rule(gt=0.0, le=10.0))
    min_sites: int = field(
        default=2, metadata=_rule(ge=1, le=1000, help="fewest sites a round may complete with")
    )
    round_timeout: float = field(default=600.0, metadata=_rule(gt=0.0, le=86_400.0))
    secure_aggregation: bool = field(
        default=False,
        metadata=_rule(
            help="SecAgg+: the server sees only the weighted sum of the sites' updates "
            "(needs min_sites >= 3)"
        ),
    )
    secagg_clip: float = field(
        default=1.0,
        metadata=_rule(
            gt=0.0,
            le=1e4,
            help="SecAgg+: each coordinate of a site's update (new - global weights) is "
            "clipped to +-secagg_clip before quantisation",
        ),
    )
    secagg_max_examples: int = field(
        default=1_000_000,
        metadata=_rule(
            ge=1, le=10**9, help="SecAgg+: upper bound of any site's training slices (its weight)"
        ),
    )

    def check(self) -> None:
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
    batch_size: int = field(default=1, metadata=_rule(ge=1, le=32))
    iterations: int = field(default=200, metadata=_rule(ge=1, le=1_000_000))
    restarts: int = field(default=1, metadata=_rule(ge=1, le=100))
    lr: float = field(default=0.1, metadata=_rule(gt=0.0, le=10.0))
    tv_weight: float = field(default=0.1, metadata=_rule(ge=0.0, le=100.0))
    mask: MaskMode = "given"
    #: Which global model the attacked update is computed on: the run's final one ("last": the
    #: site's next update) or the initial one the server broadcast in round 1 ("first"); the
    #: server sees every round, so the attacker may pick the round that leaks most.
    round: AttackRound = "last"
    targets: int = field(
        default=2,
        metadata=_rule(ge=1, le=10_000, help="number of attacked updates (one per target batch)"),
    )
    audit_trials: int = field(default=200, metadata=_rule(ge=1, le=1_000_000))
    audit_candidates: int = field(default=2, metadata=_rule(ge=2, le=1000))


@dataclass
class StudyConfig:
    """The experiment grid that `privseg run` executes."""

    epsilons: list[float] = field(default_factory=lambda: [1.0, 3.0, 8.0])
    settings: list[StudySetting] = field(
        default_factory=lambda: ["central", "local", "federated", "federated_dp", "attack"]
    )

    def check(self) -> None:
        if not self.epsilons or any(not (e > 0 and math.isfinite(e)) for e in self.epsilons):
            raise ConfigError(
                f"study.epsilons = {self.epsilons!r} is invalid: expected a non-empty list of "
                "positive, finite numbers"
            )


@dataclass
class Config:
    """The whole configuration of a privseg run."""

    seed: int = field(default=0, metadata=_rule(ge=0, le=2**31 - 1))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        cfg = _build(cls, raw, prefix="")
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
        """Read TOML (or defaults when path is None), apply ``a.b=value`` overrides, validate."""
        raw: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {p} does not exist")
            try:
                raw = tomllib.loads(p.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw)

    def replace(self, **changes: Any) -> Config:
        """Return a validated copy with dotted-path changes, e.g. ``{"privacy.enabled": True}``."""
        raw = self.to_dict()
        for key, value in changes.items():
            _set_path(raw, key.replace("__", "."), value)
        return Config.from_dict(raw)

    def validate(self) -> None:
        _validate(self, prefix="")

    # ---- output -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """TOML has no null: an unset optional field is written as the string "none"."""
        return dumps_toml(_none_to_string(self.to_dict()))


# ---- overrides ---------------------------------------------------------------------------
def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.field=value`` override; the value is parsed as TOML when it can be."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is invalid: expected section.field=value")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    _set_path(raw, key, value)


def _set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r} is invalid: {part!r} is not a section")
    node[parts[-1]] = value


# ---- typed construction with messages that name the field --------------------------------
def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        name = sorted(unknown)[0]
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{prefix}{name} is not a config field{hint}; allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(args[0], value, name)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{name} = {value!r} is invalid{hint}: allowed values are "
                + ", ".join(repr(a) for a in allowed)
            )
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{name} = {value!r} is invalid: expected a list")
        return [_coerce(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{name} = {value!r} is invalid: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} = {value!r} is invalid: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} = {value!r} is invalid: expected a number")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{name} = {value!r} is invalid: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} = {value!r} is invalid: expected a string")
        return value
    return value


def _validate(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _validate(value, prefix=f"{name}.")
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            _check_bounds(name, value, v, f.metadata)
    check = getattr(obj, "check", None)
    if check is not None:
        check()


def _check_bounds(name: str, shown: Any, v: float, meta: Any) -> None:
    rules = [
        ("gt", lambda b: v > b, "> {}"),
        ("ge", lambda b: v >= b, ">= {}"),
        ("lt", lambda b: v < b, "< {}"),
        ("le", lambda b: v <= b, "<= {}"),
    ]
    allowed = " and ".join(fmt.format(meta[k]) for k, _, fmt in rules if k in meta)
    for key, ok, _ in rules:
        if key in meta and not ok(meta[key]):
            raise ConfigError(f"{name} = {shown!r} is invalid: allowed values are {allowed}")
    step = meta.get("multiple_of")
    if step and int(v) % step:
        raise ConfigError(
            f"{name} = {shown!r} is invalid: must be a multiple of {step}"
            + (f" ({meta['help']})" if "help" in meta else "")
        )


# ---- TOML output (stdlib has a reader only) ----------------------------------------------
def _none_to_string(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (_none_to_string(v) if isinstance(v, dict) else "none" if v is None else v)
        for k, v in d.items()
    }


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dumps_toml(d: dict[str, Any]) -> str:
    """Write a two-level dict (scalars, then tables) as TOML."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"
