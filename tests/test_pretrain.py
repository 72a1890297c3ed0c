"""Public pretraining and ``train.init``: what a checkpoint was trained on decides if it may
start a run, and public generated data releases no patient."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from privseg.config import Config
from privseg.core.errors import ConfigError
from privseg.models.checkpoint import read_checkpoint, save_checkpoint
from privseg.models.init import load_init, trained_on
from privseg.models.registry import initial_model
from privseg.privacy.stores import LEDGER_FILE, store_dir, store_of
from privseg.runs.pretrain import PublicPopulation, pretrain
from privseg.runs.train import train

TINY = PublicPopulation(scanners=2, patients_per_scanner=3, size=32, slices=8)


def _cfg(**changes: Any) -> Config:
    base = {
        "data.resolution": 32,
        "model.features": 4,
        "model.groups": 1,
        "train.steps": 2,
        "train.epochs": 1,
        "train.batch_size": 4,
        "train.threads": 1,
        "federated.rounds": 1,
        "federated.local_steps": 1,
        "federated.min_sites": 2,
    }
    return Config().replace(**{**base, **changes})


@pytest.fixture(scope="module")
def public_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "run"
    pretrain(_cfg(), out=out, population=TINY)
    return out / "checkpoint.pt"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pretrain_says_generated_public_data_and_records_no_patient(tmp_path: Path) -> None:
    out = tmp_path / "run"
    results = pretrain(_cfg(), out=out, population=TINY)
    origin = results["data_origin"]
    assert origin["kind"] == "generated-public" and origin["epsilon"] == 0.0
    generator = origin["generator"]
    assert generator["population"] == "public" and generator["seed"] == 0
    assert (generator["sites"], generator["patients_per_site"], generator["size"]) == (2, 3, 32)
    assert results["dp"] is False and results["epsilon_max"] == 0.0
    assert {s["name"] for s in results["sites"]} == {"public-0", "public-1"}
    assert all(s["epsilon"] == 0.0 and s["releases"] == [] for s in results["sites"])
    assert results["init"] is None
    # nothing in the privacy ledger: no store, no registered patient
    from privseg.data.cache import SliceCache

    cache = SliceCache.open(out / "cache")
    patients = [p for s in cache.sites for p in cache.contents(s, "train")]
    assert store_of(patients) is None and not (store_dir() / LEDGER_FILE).exists()
    extra = read_checkpoint(out / "checkpoint.pt")["extra"]
    assert extra["trained_on"]["data"] == "public" and extra["trained_on"]["generator"]
    with pytest.raises(ConfigError, match="needs no DP"):
        pretrain(_cfg(**{"privacy.enabled": True}), out=tmp_path / "dp", population=TINY)


@pytest.mark.parametrize("mode", ["central", "local"])
def test_a_run_starts_from_the_public_checkpoint_and_records_it(
    public_checkpoint: Path, phantom_cache: Any, tmp_path: Path, mode: str
) -> None:
    cfg = _cfg(**{"train.init": str(public_checkpoint), "train.steps": 1})
    results = train(cfg, data=phantom_cache.root, out=tmp_path / "run", mode=mode)
    init = results["init"]
    assert init["sha256"] == _sha256(public_checkpoint)
    assert init["trained_on"]["data"] == "public" and init["epsilon_max"] == 0.0
    assert results["data_origin"] == {"kind": "private"}
    assert results["sites"][0]["epsilon"] is None  # private data without DP: never 0
    # the next checkpoint carries its lineage
    saved = "checkpoint.pt" if mode == "central" else "checkpoints/site-0.pt"
    lineage = read_checkpoint(tmp_path / "run" / saved)["extra"]["trained_on"]
    assert lineage["data"] == "private" and lineage["init"]["sha256"] == init["sha256"]


def test_federated_dp_run_starts_from_the_public_checkpoint(
    public_checkpoint: Path, phantom_cache: Any, tmp_path: Path
) -> None:
    from privseg.federated.state import initial_state

    cfg = _cfg(
        **{
            "train.init": str(public_checkpoint),
            "privacy.enabled": True,
            "privacy.noise_multiplier": 1.0,
            "privacy.target_epsilon": None,
        }
    )
    start = initial_state(cfg)
    weights = read_checkpoint(public_checkpoint)["state_dict"]
    assert all(start[k].equal(weights[k]) for k in weights)  # the round-0 global model
    results = train(
        cfg, data=phantom_cache.root, out=tmp_path / "fed", mode="federated",
        simulation="in-process",
    )  # fmt: skip
    assert results["dp"] is True and results["init"]["sha256"] == _sha256(public_checkpoint)


def test_a_checkpoint_trained_on_private_data_without_dp_is_refused(tmp_path: Path) -> None:
    private = _checkpoint(tmp_path / "private.pt", _cfg())  # a checkpoint from before #26
    with pytest.raises(ConfigError, match="trained on private data without DP is not public"):
        load_init(_cfg(**{"train.init": str(private)}))
    public_on_top = _checkpoint(  # public fine-tuning does not launder its starting point
        tmp_path / "public.pt",
        _cfg(),
        trained_on=trained_on(
            _cfg(),
            public={"seed": 0},
            init={"trained_on": trained_on(_cfg(), public=None, init=None)},
        ),
    )
    with pytest.raises(ConfigError, match="not public"):
        load_init(_cfg(**{"train.init": str(public_on_top)}))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="not public"):  # refused before any output
        train(_cfg(**{"train.init": str(private)}), data=tmp_path, out=out, mode="central")
    assert not out.exists()


def test_a_dp_checkpoint_is_allowed_and_recorded(tmp_path: Path) -> None:
    dp = _cfg(**{"privacy.enabled": True, "privacy.noise_multiplier": 1.0})
    path = _checkpoint(tmp_path / "dp.pt", dp, run_id="r1")
    (tmp_path / "results.json").write_text(json.dumps({"run_id": "r1", "epsilon_max": 2.5}))
    init = load_init(_cfg(**{"train.init": str(path)}))
    assert init is not None
    assert init.record["trained_on"]["dp"] is True and init.record["epsilon_max"] == 2.5
    assert init.record["sha256"] == _sha256(path)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model.features": 8}, "model.features"),
        ({"model.name": "monet"}, "model.name"),
        ({"data.resolution": 64}, "data.resolution"),
        ({"data.classes": {"liver": [1, 2], "tumour": [2]}}, "data.classes"),
    ],
)
def test_a_model_mismatch_is_refused_naming_the_field(
    public_checkpoint: Path, change: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=rf"its {field}.* differs from this run's {field}"):
        load_init(_cfg(**{"train.init": str(public_checkpoint), **change}))


def _checkpoint(path: Path, cfg: Config, **extra: Any) -> Path:
    model = initial_model(cfg.model, cfg.seed, cfg.data.n_classes)
    return save_checkpoint(path, model.state_dict(), cfg, **extra)


def test_the_pretrain_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from privseg.cli.app import app

    args = ["pretrain", "--out", str(tmp_path / "run"), "--scanners", "2", "--patients", "3"]
    args += ["--size", "32", "--slices", "8", "--set", "data.resolution=32"]
    args += ["--set", "model.features=4", "--set", "model.groups=1", "--set", "train.steps=1"]
    result = CliRunner().invoke(app, [*args, "--epochs", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "no patient released, epsilon 0" in result.output
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_open_privacy_exempts_only_the_verified_public_cache(tmp_path: Path) -> None:
    from privseg.data.phantom import synth_task
    from privseg.data.prepare import prepare_cache
    from privseg.training.trainer import CENTRAL, open_privacy

    tiny = {"sites": 2, "patients_per_site": 3, "size": 16, "slices": 4, "seed": 1}
    cfg = _cfg(**{"data.resolution": 16, "data.sites": 2, "data.slice_policy": "all"})
    caches = {}
    for population in ("public", "sites"):
        task = synth_task(tmp_path / population, population=population, **tiny)
        caches[population] = prepare_cache(task, tmp_path / f"{population}-cache", cfg.data, seed=0)
    args = {"site": CENTRAL, "train": None, "planned_steps": 1, "run_id": "r"}
    assert open_privacy(cfg, caches["public"], **args) is None
    assert not (store_dir() / LEDGER_FILE).exists()
    dp = cfg.replace(**{"privacy.enabled": True, "privacy.noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="public phantom .* needs no DP"):
        open_privacy(dp, caches["public"], **args)
    assert open_privacy(cfg, caches["sites"], **args) is None  # recorded: a release without DP
    from privseg.privacy.ledger import PrivacyLedger

    rows = PrivacyLedger(store_dir() / LEDGER_FILE).rows()
    assert [r["kind"] for r in rows] == ["non-private"]
