"""One typed, validated configuration for every privseg command.

The config is a tree of dataclasses. It is read from a TOML file, then CLI overrides
(``section.field=value``) are applied, then every field is validated. A bad value raises
:class:`~privseg.core.errors.ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privseg.config.sections import (
    DEVICE_PATTERN,
    DEVICE_VALUES,
    AttackConfig,
    AttackRound,
    DataConfig,
    FederatedConfig,
    LrSchedule,
    MaskMode,
    ModelConfig,
    Partition,
    PrivacyConfig,
    PrivacyUnit,
    SlicePolicy,
    StudyCompute,
    StudyConfig,
    StudySetting,
    Threat,
    TrainConfig,
)
from privseg.config.typed import (
    apply_override,
    build,
    dumps_toml,
    none_to_string,
    rule,
    set_path,
    validate,
)
from privseg.core.errors import ConfigError

__all__ = [
    "AttackConfig",
    "AttackRound",
    "Config",
    "DEVICE_PATTERN",
    "DEVICE_VALUES",
    "DataConfig",
    "FederatedConfig",
    "LrSchedule",
    "MaskMode",
    "ModelConfig",
    "Partition",
    "PrivacyConfig",
    "PrivacyUnit",
    "SlicePolicy",
    "StudyCompute",
    "StudyConfig",
    "StudySetting",
    "Threat",
    "TrainConfig",
]


@dataclass
class Config:
    """The whole configuration of a privseg run."""

    seed: int = field(default=0, metadata=rule(ge=0, le=2**31 - 1))
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
        cfg = build(cls, raw, prefix="")
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

    def with_overrides(self, overrides: list[str]) -> Config:
        """A validated copy with ``a.b=value`` overrides applied (``--set`` over a preset)."""
        raw = self.to_dict()
        for item in overrides:
            apply_override(raw, item)
        return Config.from_dict(raw)

    def replace(self, **changes: Any) -> Config:
        """Return a validated copy with dotted-path changes, e.g. ``{"privacy.enabled": True}``."""
        raw = self.to_dict()
        for key, value in changes.items():
            set_path(raw, key.replace("__", "."), value)
        return Config.from_dict(raw)

    def validate(self) -> None:
        validate(self, prefix="")
        if not self.study.epsilons and self.privacy.noise_multiplier is None:
            raise ConfigError(
                "study.epsilons = [] is invalid with privacy.noise_multiplier unset: the DP "
                "setting then runs at the configured noise; set privacy.noise_multiplier or "
                "list target epsilons"
            )

    # ---- output -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """TOML has no null: an unset optional field is written as the string "none"."""
        return dumps_toml(none_to_string(self.to_dict()))
