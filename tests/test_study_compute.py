"""The study's equal-compute rule, `train.steps`, the presets and the compute the report shows."""

from __future__ import annotations

import pytest

from privseg.config import Config
from privseg.core.errors import ConfigError
from privseg.core.study_result import COMPUTE_RULES
from privseg.report.sections import build_blocks
from privseg.report.study_view import federated_beats_local_cross_site
from privseg.report.summary import summarise
from privseg.runs.compute import compute_of, equalise
from privseg.runs.study import PRESETS, grid, paper_preset
from privseg.runs.train import train

SIZES = {"site-0": 130, "site-1": 125, "site-2": 128}


def base(**changes) -> Config:
    cfg = Config.from_dict({"federated": {"rounds": 12, "local_steps": 8}})
    return cfg.replace(**changes) if changes else cfg


def test_equal_compute_gives_every_mode_the_federated_steps_and_slices_per_site():
    cfg = base()
    central, local, fed = (equalise(cfg, m, 3) for m in ("central", "local", "federated"))
    assert central.train.steps == local.train.steps == 96
    assert central.train.batch_size == 3 * 16 and local.train.batch_size == 16
    assert fed == cfg
    computed = {
        "central": compute_of(central, "central", SIZES),
        "local": compute_of(local, "local", SIZES),
        "federated": compute_of(fed, "federated", SIZES),
    }
    for c in computed.values():
        assert c["sequential_steps"] == 96
        assert c["slices_per_site"] == pytest.approx(96 * 16)


def test_as_configured_keeps_each_modes_schedule():
    cfg = base(**{"study.compute": "as_configured"})
    assert equalise(cfg, "central", 3) == cfg
    # 6 epochs over the pooled 383 slices in batches of 16: ceil(383 / 16) = 24 steps each
    assert compute_of(cfg, "central", SIZES)["sequential_steps"] == 6 * 24
    assert compute_of(cfg, "local", SIZES)["sequential_steps"] == 6 * 9  # ceil(130 / 16)


def test_train_steps_sets_the_steps_of_central_and_local_runs(phantom_cache, tmp_path):
    cfg = Config.from_dict(
        {
            "model": {"features": 4, "groups": 1},
            "train": {"steps": 5, "epochs": 2, "batch_size": 4, "threads": 1},
            "study": {"compute": "as_configured"},
        }
    )
    result = train(cfg, data=phantom_cache.root, out=tmp_path / "run", mode="local")
    assert result["compute"]["sequential_steps"] == 5
    assert [h["epoch"] for h in result["history"]] == [1, 2]  # two validations over 5 steps
    assert result["compute"]["batch_size"] == 4


def test_paper_preset_is_the_papers_setting_and_user_overrides_win():
    cfg = paper_preset(Config())
    assert (cfg.model.name, cfg.data.resolution, cfg.train.batch_size) == ("monet", 256, 32)
    assert cfg.federated.local_steps == 1 and cfg.federated.weighted is False
    assert (cfg.privacy.max_grad_norm, cfg.privacy.noise_multiplier) == (1.2, 0.38)
    assert (cfg.privacy.accountant, cfg.privacy.unit, cfg.privacy.delta) == ("rdp", "slice", 1e-5)
    assert cfg.train.lr == 1e-3 and cfg.train.lr * cfg.train.lr_final == pytest.approx(1e-4)
    dp = [s for s in grid(cfg) if s.dp]
    assert [s.label for s in dp] == ["Federated DP (σ=0.38)"]
    run_cfg = dp[0].config(cfg, 3)
    assert run_cfg.privacy.noise_multiplier == 0.38 and run_cfg.privacy.target_epsilon is None
    assert PRESETS["paper"](Config()).with_overrides(["federated.rounds=3"]).federated.rounds == 3


def test_no_target_epsilons_without_a_configured_noise_is_refused():
    with pytest.raises(ConfigError, match="study.epsilons"):
        Config.from_dict({"study": {"epsilons": []}})


def _run(mode: str, sites: dict[str, float], cross: dict[str, dict] | None = None) -> dict:
    return {
        "mode": mode,
        "setting": mode,
        "label": mode,
        "dp": False,
        "dice_mean": sum(sites.values()) / len(sites),
        "compute": {"sequential_steps": 96, "batch_size": 48 if mode == "central" else 16},
        "sites": [
            {"name": n, "dice": d, **({"cross": cross[n]} if cross else {})}
            for n, d in sites.items()
        ],
    }


def test_report_states_the_compute_and_the_cross_site_comparison(tmp_path):
    local = _run("local", {"a": 0.9, "b": 0.9}, cross={"a": {"b": 0.80}, "b": {"a": 0.85}})
    fed = _run("federated", {"a": 0.86, "b": 0.82})
    central = _run("central", {"a": 0.88, "b": 0.86})
    assert federated_beats_local_cross_site([local, fed]) is True
    study = {"runs": [central, local, fed], "compute_rule": COMPUTE_RULES["equal"]}
    text = summarise(study)
    assert "above every other site's local-only model" in text
    assert "0.030 Dice below centralised" in text
    blocks, _ = build_blocks(study, tmp_path)
    compute = next(b for b in blocks if getattr(b, "name", "") == "compute")
    assert COMPUTE_RULES["equal"] in compute.caption
    # centralised: one pooled batch of 48 shared by the two sites = 24 slices per site and step
    assert [r[2] for r in compute.rows] == ["24", "16", "16"]
    fed["sites"][1]["dice"] = 0.79  # below site a's model on b's test split (0.80)
    assert federated_beats_local_cross_site([local, fed]) is False
