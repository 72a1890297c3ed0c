"""`privseg audit RUN --whole-run` on a real (tiny) DP run trained with canaries."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from privseg.cli.app import app
from privseg.config import Config
from privseg.core.errors import ConfigError, DataError
from privseg.privacy.canaries import commitment
from privseg.runs.audit_run import audit_whole_run
from privseg.runs.train import train


def _cfg(phantom_cache, tmp_path, **changes):
    return Config().replace(
        **{
            "data.resolution": phantom_cache.resolution,
            "model.features": 8,
            "train.threads": 2,
            "train.epochs": 1,
            "train.steps": 6,
            "train.batch_size": 8,
            "privacy.enabled": True,
            "privacy.target_epsilon": 8.0,
            "privacy.audit_canaries": 20,
            "privacy.ledger_dir": str(tmp_path / "ledgers"),
            **changes,
        }
    )


def test_federated_runs_refuse_canaries_before_any_output(phantom_cache, tmp_path):
    cfg = _cfg(phantom_cache, tmp_path)
    with pytest.raises(ConfigError, match="not supported in federated runs yet"):
        train(cfg, data=phantom_cache.root, out=tmp_path / "fed", mode="federated")
    assert not (tmp_path / "fed").exists()


def test_canaries_need_dp_and_enough_of_them():
    with pytest.raises(ConfigError, match="privacy.audit_canaries = 20 needs privacy.enabled"):
        Config().replace(**{"privacy.audit_canaries": 20})
    with pytest.raises(ConfigError, match="at least 10"):
        Config().replace(**{"privacy.enabled": True, "privacy.audit_canaries": 3})


@pytest.mark.slow  # a real DP run: ~80 s on 2 shared cores
def test_whole_run_audit_of_a_central_dp_run(phantom_cache, tmp_path):
    out = tmp_path / "run"
    train(_cfg(phantom_cache, tmp_path), data=phantom_cache.root, out=out, mode="central")
    committed = json.loads((out / "audit" / "canaries-central.commit.json").read_text())
    assert "seed" not in committed  # only the hash leaves the site before training
    res = audit_whole_run(out)
    trainer = res["trainers"][0]
    assert trainer["canaries"]["commitment"] == commitment(trainer["canaries"]["seed"])
    assert trainer["claim"]["epsilon_run"] <= 8.0 + 1e-6
    for threat in ("every_step", "final_model"):
        audit = trainer["threat_models"][threat]
        assert len(audit["scores"]) == 20
        assert 0 <= audit["epsilon_lower"] <= audit["ceiling"] < 8.0
    assert res["passed"] and (out / "audit_run.json").is_file()
    assert CliRunner().invoke(app, ["audit", str(out), "--whole-run"]).exit_code == 0

    # a run whose results under-report its epsilon fails the audit with exit code 1
    results = json.loads((out / "results.json").read_text())
    for site in results["sites"]:
        site["epsilon_run"] = -1.0
    (out / "results.json").write_text(json.dumps(results))
    failed = CliRunner().invoke(app, ["audit", str(out), "--whole-run"])
    assert failed.exit_code == 1 and "audit FAILED" in failed.output

    # a seed that does not match the commitment is refused
    revealed = out / "audit" / "canaries-central.json"
    data = json.loads(revealed.read_text())
    revealed.write_text(json.dumps({**data, "seed": data["seed"] + 1}))
    with pytest.raises(DataError, match="does not match the commitment"):
        audit_whole_run(out)
