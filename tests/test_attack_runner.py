"""The attack runner and CLI: result files and keys, DP settings, run folders, user errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import R, TinySeg, phantom, plan
from privseg.attack.runner import run_attack_on_model
from privseg.config import Config
from privseg.core.io import read_json
from privseg.core.results import RunResult, SiteResult
from privseg.runs.attack import run_attack, run_audit

KEYS = (
    "threat",
    "dp",
    "epsilon",
    "batch_size",
    "psnr_median",
    "ssim_median",
    "reidentification_rate",
    "prior_psnr_median",
    "chance_psnr_median",
    "mask_mode",
    "threat_model",
    "targets",
)


def _cfg(**changes: object) -> Config:
    base = {
        "data.resolution": R,
        "attack.iterations": 20,
        "attack.restarts": 1,
        "attack.targets": 2,
        "attack.audit_trials": 20,
    }
    return Config().replace(**{**base, **changes})


def test_run_attack_on_model_writes_json_and_png(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = phantom(24)
    res = run_attack_on_model(
        TinySeg(),
        x[:, 0].numpy(),
        y[:, 0].numpy(),
        cfg=_cfg(),
        patients=np.repeat(np.arange(12), 2),
        out_dir=tmp_path,
    )
    assert all(k in res for k in KEYS)
    assert res["threat"] == "T1" and res["epsilon"] is None and len(res["targets"]) == 2
    assert res["targets"][0]["gallery_size"] >= 16
    assert read_json(tmp_path / "attack.json")["threat"] == "T1"
    assert (tmp_path / "attack.png").read_bytes()[:4] == b"\x89PNG"


def test_a_dp_plan_makes_it_t3_with_epsilon(tmp_path: Path) -> None:
    x, y = phantom(24)
    dp = plan(noise_multiplier=1.5, target_epsilon=8.0)
    res = run_attack_on_model(
        TinySeg(),
        x[:, 0],
        y[:, 0],
        cfg=_cfg(**{"attack.targets": 1, "attack.mask": "joint"}),
        dp=dp,
    )
    assert res["threat"] == "T3" and res["dp"] and res["epsilon"] == 8.0
    assert res["threat_model"]["noise_multiplier"] == 1.5
    assert res["targets"][0]["mask_dice"] is not None


@pytest.mark.parametrize("mask", ["joint", "given", "predicted"])
def test_the_attack_runs_on_a_two_class_model(mask: str) -> None:
    """With data.classes the server's model has one output per class; the site's update and
    the attacker's masks have as many channels, and the audit plays on them too."""
    x, y = phantom(24)
    bits = y[:, 0].numpy().astype(np.uint8)
    bits[:, R // 3 : R // 2, R // 3 : R // 2] |= 2  # a second class inside the first
    model = TinySeg()
    model.head = torch.nn.Conv2d(8, 2, 1)
    cfg = _cfg(**{"attack.targets": 1, "attack.mask": mask, "data.classes": {"a": [1], "b": [2]}})
    res = run_attack_on_model(model, x[:, 0].numpy(), bits, cfg=cfg)
    assert len(res["targets"]) == 1 and np.isfinite(res["psnr_median"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished-looking run folder: a small phantom cache, a U-Net checkpoint, results."""
    from privseg.data.phantom import synth_task
    from privseg.data.prepare import prepare_cache
    from privseg.models import build_model
    from privseg.models.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("attack_run")
    cfg = _cfg(**{"data.sites": 2, "model.features": 4, "data.slice_policy": "all"})
    task = synth_task(root / "task", sites=2, patients_per_site=4, size=32, slices=8, seed=0)
    cache = prepare_cache(task, root / "cache", cfg.data, seed=0)
    run = root / "run"
    run.mkdir()
    (run / "config.toml").write_text(cfg.to_toml())
    torch.manual_seed(1)  # "trained": not the initial weights the seed gives
    save_checkpoint(run / "checkpoint.pt", build_model(cfg.model).state_dict(), cfg)
    sites = [SiteResult.from_test(s, None, {}, None) for s in cache.sites]
    result = RunResult.of(cfg.privacy, "central", sites, history=[])
    result.provenance["cache_dir"] = str(cache.root)
    result.write(run / "results.json")
    return run


def test_run_attack_and_audit_on_a_run_folder(run_dir: Path) -> None:
    site = read_json(run_dir / "results.json")["sites"][0]["name"]
    res = run_attack(run_dir, site=site, iterations=5, targets=1)
    assert res["site"] == site and (run_dir / "attack" / "attack.png").is_file()
    dp = run_attack(run_dir, site=site, iterations=5, targets=1, epsilon=8.0)
    assert dp["threat"] == "T3" and dp["epsilon"] == 8.0 and dp["noise_multiplier"] > 0
    aud = run_audit(run_dir, site=site, trials=10, epsilon=8.0)
    assert read_json(run_dir / "attack" / "audit.json")["trials"] == 10
    assert aud["held"] and aud["noise_multiplier"] == dp["noise_multiplier"]


def test_round_first_attacks_the_initial_global_model(run_dir: Path) -> None:
    from privseg.attack.runner import attacked_model
    from privseg.cli.app import app
    from privseg.federated.state import initial_state
    from privseg.runs.attack import load_run

    final, cfg, _, _ = load_run(run_dir, "site-0")
    last, what = attacked_model(cfg, final)
    assert last is final and "final" in what
    first, what = attacked_model(cfg.replace(**{"attack.round": "first"}), final)
    assert "round 1" in what
    broadcast = initial_state(cfg)  # what the server sent every site in round 1
    assert all(torch.equal(first.state_dict()[k], v) for k, v in broadcast.items())
    assert not all(torch.equal(final.state_dict()[k], v) for k, v in broadcast.items())
    args = ["attack", str(run_dir), "--site", "site-0", "--iterations", "2", "--targets", "1"]
    out = CliRunner().invoke(app, [*args, "--round", "first"])
    assert out.exit_code == 0, out.output
    assert "round 1" in out.output
    res = read_json(run_dir / "attack" / "attack.json")
    assert res["round"] == "first" and "round 1" in res["weights"]
    out = CliRunner().invoke(app, [*args, "--round", "middle"])
    text = " ".join(out.output.split())
    assert out.exit_code == 2 and "'middle' is not one of 'last', 'first'" in text


def test_cli_user_errors_exit_2(run_dir: Path, tmp_path: Path) -> None:
    from privseg.cli.app import app

    runner = CliRunner()
    out = runner.invoke(app, ["attack", str(tmp_path / "missing"), "--site", "a"])
    assert out.exit_code == 2 and "does not exist" in out.output
    out = runner.invoke(app, ["attack", str(run_dir), "--site", "nowhere"])
    assert out.exit_code == 2 and "sites:" in out.output
    out = runner.invoke(app, ["attack", str(run_dir), "--site", "site-0", "--threat", "T9"])
    assert out.exit_code == 2 and "'T9' is not one of 'T1', 'T2', 'T3'" in out.output
    out = runner.invoke(app, ["audit", str(tmp_path / "missing"), "--site", "a"])
    assert out.exit_code == 2


def test_the_attack_folder_is_claimed_like_every_output(run_dir: Path, tmp_path: Path) -> None:
    """RUN/attack is refused when privseg did not create it (--overwrite adds files next to the
    user's and never replaces one), and one writer at a time holds it."""
    from privseg.cli.app import app
    from privseg.core.output import MARKER, claim_folder, read_marker

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("attack"))
    mine = run / "attack"
    mine.mkdir()
    (mine / "attack.json").write_text("the user's")
    runner = CliRunner()
    attack = ["attack", str(run), "--site", "site-0", "--iterations", "2", "--targets", "1"]
    out = runner.invoke(app, attack)
    assert out.exit_code == 2 and "privseg did not create it" in out.output
    out = runner.invoke(app, [*attack, "--overwrite"])
    assert out.exit_code == 2 and "would replace attack.json" in out.output
    assert (mine / "attack.json").read_text() == "the user's" and not (mine / MARKER).exists()
    (mine / "attack.json").rename(mine / "notes.json")
    out = runner.invoke(app, [*attack, "--overwrite"])
    assert out.exit_code == 0, out.output
    assert (mine / "notes.json").read_text() == "the user's"
    assert set(read_marker(mine)["owns"]) == {"attack.json", "attack.png"}
    audit = ["audit", str(run), "--site", "site-0", "--trials", "4", "--epsilon", "8"]
    assert runner.invoke(app, audit).exit_code == 0  # privseg's folder now: no --overwrite
    assert set(read_marker(mine)["owns"]) == {"attack.json", "attack.png", "audit.json"}
    held = claim_folder(mine, "attack")  # another privseg process writing it
    try:
        out = runner.invoke(app, audit)
        assert out.exit_code == 2 and "another privseg process" in out.output
    finally:
        held.release()
