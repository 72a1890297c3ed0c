"""The one training loop: it learns, it is shared by every mode, and its run folder is complete."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from privseg.config import Config
from privseg.core.device import describe_device, resolve_device
from privseg.core.errors import PrivacyBudgetExceeded
from privseg.models import build_model
from privseg.models.checkpoint import load_checkpoint
from privseg.runs.train import train
from privseg.training.trainer import SiteTrainer

FAST = {
    "train.epochs": 3,
    "train.batch_size": 8,
    "train.lr": 3e-3,
    "model.features": 8,
    "train.threads": 2,
}


def _cfg(phantom_cache, **changes):
    base = (
        {"data.resolution": phantom_cache.resolution}
        if hasattr(phantom_cache, "resolution")
        else {}
    )
    return Config().replace(**{**FAST, **base, **changes})


def _untrained_dice(cfg, split):
    torch.manual_seed(0)
    trainer = SiteTrainer(cfg, name="untrained", train=split, test=split)
    trainer.model.load_state_dict(build_model(cfg.model).state_dict())
    return trainer.evaluate(None, "test")["dice"]


def test_central_training_beats_untrained_and_writes_run_folder(phantom_cache, tmp_path):
    cfg = _cfg(phantom_cache)
    out = tmp_path / "central"
    results = train(cfg, data=phantom_cache.root, out=out, mode="central")
    site = phantom_cache.sites[0]
    untrained = _untrained_dice(cfg, phantom_cache.split(site, "test"))
    assert results["dice_mean"] > untrained + 0.2, (results["dice_mean"], untrained)
    assert results["dice_mean"] > 0.5
    for name in ("config.toml", "results.json", "checkpoint.pt", "learning_curve.png", "run.log"):
        assert (out / name).is_file(), name
    assert f"central run into {out}" in (out / "run.log").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert saved["mode"] == "central" and saved["dp"] is False
    assert saved["device"] == describe_device(resolve_device("auto"))  # where it trained
    assert [s["name"] for s in saved["sites"]] == phantom_cache.sites
    assert all(0.0 <= s["dice"] <= 1.0 for s in saved["sites"])
    # distances on each test case's original grid, in mm, per run, site and patient
    assert saved["hd95_units"] == saved["assd_units"] == "mm"
    for s in saved["sites"]:
        assert s["hd95_units"] == s["assd_units"] == "mm"
        assert {"id", "dice", "hd95", "assd"} <= set(s["patients"][0])
    assert saved["wall_seconds"] > 0 and saved["seconds_per_epoch"] > 0
    assert len(saved["history"]) == cfg.train.epochs
    model, loaded_cfg, _ = load_checkpoint(out / "checkpoint.pt")
    assert loaded_cfg.model == cfg.model
    assert Config.load(out / "config.toml") == cfg


def test_a_rejected_resume_leaves_the_run_folder_as_it_was(phantom_cache, tmp_path):
    """A resume refused for another model once replaced the run's config.toml first."""
    from privseg.core.errors import CheckpointError
    from privseg.core.run_folder import RunFolder

    out = tmp_path / "fed"
    RunFolder(out).claim("run", inputs=[phantom_cache.root])
    (out / "config.toml").write_text("# the run's own config\n")
    other = _cfg(phantom_cache, **{"model.name": "monet"})
    torch.save({"config": other.to_toml(), "round": 1}, out / "federated_state.pt")
    with pytest.raises(CheckpointError, match="another config"):
        train(_cfg(phantom_cache), data=phantom_cache.root, out=out, mode="federated", resume=True)
    assert (out / "config.toml").read_text() == "# the run's own config\n"


def test_dp_local_training_records_privacy_and_still_learns(phantom_cache, tmp_path):
    cfg = _cfg(
        phantom_cache,
        **{
            "privacy.enabled": True,
            "privacy.target_epsilon": 8.0,
            "train.epochs": 4,
            "train.lr": 5e-3,
            "privacy.max_grad_norm": 1.0,
            "privacy.ledger_dir": str(tmp_path / "ledgers"),
        },
    )
    out = tmp_path / "local-dp"
    results = train(cfg, data=phantom_cache.root, out=out, mode="local")
    assert results["mode"] == "local" and results["dp"] is True
    for site in results["sites"]:
        assert 0 < site["epsilon"] <= 8.0 + 1e-6
        assert site["delta"] == cfg.privacy.delta
        assert site["noise_multiplier"] > 0 and 0 < site["sample_rate"] <= 1
        assert site["max_grad_norm"] == cfg.privacy.max_grad_norm
        assert site["accountant"] == "prv"
        assert set(site["cross"]) == set(phantom_cache.sites) - {site["name"]}
        assert (tmp_path / "ledgers" / "ledger.sqlite").is_file()  # privacy.ledger_dir's store
    assert results["epsilon_max"] == max(s["epsilon"] for s in results["sites"])
    assert "privacy_note" in results  # slice-level DP says what it does not protect
    assert all(math.isfinite(s["dice"]) for s in results["sites"])


def test_budget_refuses_a_round_that_would_overspend(phantom_cache, tmp_path):
    from privseg.training.trainer import open_privacy

    cfg = _cfg(
        phantom_cache,
        **{
            "privacy.enabled": True,
            "privacy.noise_multiplier": 0.8,
            "privacy.target_epsilon": None,
            "privacy.budget_epsilon": 1.0,
            "privacy.ledger_dir": str(tmp_path),
        },
    )
    site = phantom_cache.sites[0]
    train_split = phantom_cache.split(site, "train")
    privacy = open_privacy(
        cfg, phantom_cache, site=site, train=train_split, planned_steps=10, run_id="r"
    )
    trainer = SiteTrainer(cfg, name="a", train=train_split, privacy=privacy, planned_steps=10)
    before = trainer.state_dict()
    with pytest.raises(PrivacyBudgetExceeded):
        trainer.fit(None, 500)
    after = trainer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing trained, nothing sent
    assert privacy.epsilon() == 0.0


def test_fedprox_pulls_towards_the_global_model(phantom_cache):
    cfg = _cfg(phantom_cache, **{"federated.proximal_mu": 50.0, "train.lr": 1e-2})
    split = phantom_cache.split(phantom_cache.sites[0], "train")
    torch.manual_seed(0)
    start = SiteTrainer(cfg, name="a", train=split).state_dict()
    free, _ = SiteTrainer(cfg, name="a", train=split).fit(start, 5)
    prox, _ = SiteTrainer(cfg, name="a", train=split).fit(start, 5, global_state=start)

    def dist(state):
        return sum(float((state[k].float() - start[k].float()).norm()) for k in start)

    assert dist(prox) < dist(free)


def test_fit_reports_metrics_and_does_not_alias_weights(phantom_cache):
    cfg = _cfg(phantom_cache)
    split = phantom_cache.split(phantom_cache.sites[0], "train")
    trainer = SiteTrainer(cfg, name="a", train=split)
    state, metrics = trainer.fit(None, 2)
    assert metrics["num_examples"] == len(split) and metrics["steps"] == 2
    assert np.isfinite(metrics["train_loss"]) and math.isnan(
        metrics["epsilon"]
    )  # no DP: no epsilon
    key = next(iter(state))
    state[key].add_(1.0)
    assert not torch.equal(state[key], trainer.model.state_dict()[key])


def test_a_batch_in_chunks_gives_the_same_gradient_as_one_pass(phantom_cache):
    split = phantom_cache.split(phantom_cache.sites[0], "train")
    grads, losses = [], []
    for chunk in (16, 3):  # one pass over a batch of 8, or chunks of 3 + 3 + 2
        cfg = _cfg(phantom_cache, **{"train.batch_size": 8, "train.chunk_slices": chunk})
        trainer = SiteTrainer(cfg, name="a", train=split)
        losses.append(trainer._gradient_step())  # the same seeded batch both times
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-7)
