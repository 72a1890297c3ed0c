"""Config: TOML + overrides, typed coercion, and error messages that name field and rule."""

from __future__ import annotations

import tomllib

import pytest

from privseg.config import Config
from privseg.config.typed import apply_override
from privseg.core.errors import ConfigError


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path):
    cfg = Config()
    cfg.validate()
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert Config.load(path) == cfg


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("seed = 3\n[train]\nlr = 0.01\n[privacy]\nenabled = true\n")
    cfg = Config.load(path, ["train.lr=0.5", "model.name=monet", "study.epsilons=[2, 4]"])
    assert cfg.seed == 3
    assert cfg.train.lr == 0.5
    assert cfg.privacy.enabled is True
    assert cfg.model.name == "monet"
    assert cfg.study.epsilons == [2.0, 4.0]


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("train.lr=-1", ["train.lr", "-1", "> 0"]),
        ("model.name=unt", ["model.name", "'unt'", "did you mean 'unet'", "'monet'"]),
        ("data.resolution=60", ["data.resolution", "60", "multiple of 8"]),
        ("train.batchsize=3", ["train.batchsize", "did you mean 'batch_size'"]),
        ("privacy.delta=1.5", ["privacy.delta", "1.5", "< 1"]),
        ("privacy.target_epsilon=0", ["privacy.target_epsilon", "> 0"]),
        ("train.epochs=2.5", ["train.epochs", "2.5", "integer"]),
        ("privacy.enabled=maybe", ["privacy.enabled", "true or false"]),
        ("data.hu_window=[200, -150]", ["data.hu_window", "low < high"]),
        ("model.groups=3", ["model.groups", "divide"]),
        ("study.epsilons=[]", ["study.epsilons", "privacy.noise_multiplier"]),
        ("study.epsilons=[-1]", ["study.epsilons", "positive"]),
        ("data.val_fraction=0.8", ["val_fraction", "test_fraction", "< 1"]),
    ],
)
def test_bad_values_name_field_value_and_rule(override, fragments):
    with pytest.raises(ConfigError) as err:
        Config.load(overrides=[override])
    for fragment in fragments:
        assert fragment in str(err.value)


def test_dp_needs_a_noise_source():
    with pytest.raises(ConfigError, match="noise_multiplier and privacy.target_epsilon"):
        Config.load(overrides=["privacy.enabled=true", "privacy.target_epsilon=none"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(bad)


def test_replace_validates():
    cfg = Config().replace(**{"privacy.enabled": True, "privacy.target_epsilon": 3})
    assert cfg.privacy.target_epsilon == 3.0
    with pytest.raises(ConfigError, match="train.batch_size"):
        cfg.replace(**{"train.batch_size": 0})


def test_override_parsing():
    raw: dict = {}
    apply_override(raw, "data.site_map=maps/sites.json")
    apply_override(raw, "data.labels=[1, 2]")
    assert raw == {"data": {"site_map": "maps/sites.json", "labels": [1, 2]}}
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_override(raw, "train.lr")


def test_written_toml_is_parseable():
    assert tomllib.loads(Config().to_toml())["privacy"]["delta"] == 1e-5


def test_unset_optional_fields_survive_dict_and_toml_round_trips(tmp_path):
    cfg = Config().replace(**{"privacy.noise_multiplier": 1.0, "privacy.target_epsilon": None})
    assert Config.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    loaded = Config.load(path)
    assert loaded.privacy.target_epsilon is None and loaded.privacy.noise_multiplier == 1.0
