"""Flower's simulation engine (Ray, or in-process) end to end, with fake site trainers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import SIZES, e2e_config, fake_factory, fake_ledger, small_cfg
from privseg.core.errors import ConfigError, FederationError
from privseg.core.io import read_json
from privseg.federated import client_app as ca
from privseg.federated import flower_compat as fc
from privseg.federated.simulation import run_federated


@pytest.mark.slow
def test_simulation_three_sites_one_declines(tmp_path: Path) -> None:
    cfg = small_cfg(rounds=3, round_timeout=120.0)
    events: list[dict] = []
    t0 = time.perf_counter()
    results = run_federated(
        cfg,
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "run",
        run_id="sim1",
        progress=events.append,
        sites=["a", "b", "tight"],
        trainer_factory=fake_factory,
    ).to_dict()
    print(
        f"simulation: {time.perf_counter() - t0:.1f} s", [h["seconds"] for h in results["history"]]
    )
    assert [e["round"] for e in events] == [1, 2, 3]
    assert results["mode"] == "federated" and results["rounds"] == 3
    assert [h["declined"] for h in results["history"]] == [[], ["tight"], ["tight"]]
    sites = {s["name"]: s for s in results["sites"]}
    assert set(sites) == {"a", "b", "tight"}
    for name, site in sites.items():  # per-site epsilon is what the site's ledger says
        ledger = read_json(fake_ledger(tmp_path / "run", name))
        assert site["epsilon"] == pytest.approx(ledger["epsilon"])
        assert site["n_train"] == SIZES[name]
        assert len(site["patients"]) == 2 and site["accountant"] == cfg.privacy.accountant
    assert results["epsilon_max"] == pytest.approx(0.9)
    assert results["history"][-1]["epsilon_max"] == pytest.approx(0.9)
    assert sites["a"]["dice"] == pytest.approx(0.51)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    for h in results["history"]:  # the round's time, split into its phases
        assert 0 <= h["train_seconds"] <= h["seconds"]
        assert h["evaluate_seconds"] == pytest.approx(h["seconds"] - h["train_seconds"])
        assert "site_train_seconds_max" in h

    # resume for a 4th round that needs all 3 sites: round 4 runs (with its absolute number)
    # at a and b, tight declines, so the server stops cleanly and keeps round 3's model
    cfg4 = cfg.replace(**{"federated.rounds": 4, "federated.min_sites": 3})
    with pytest.raises(FederationError, match="round 4: only 2 site"):
        run_federated(
            cfg4,
            cache_dir=tmp_path / "cache",
            out_dir=tmp_path / "run",
            run_id="sim2",
            resume=True,
            sites=["a", "b", "tight"],
            trainer_factory=fake_factory,
        )
    assert read_json(fake_ledger(tmp_path / "run", "a"))["steps"] == 12
    status = read_json(tmp_path / "run" / "federation_status.json")
    assert status["status"] == "stopped" and status["round"] == 3


def test_simulation_without_ray_runs_every_site_in_process(tmp_path: Path) -> None:
    """Where Ray is missing (a GPU machine's image), Flower's engine runs the ClientApps in
    this process: same rounds, declines and ledgers; the trainers are released afterwards."""
    import sys

    saved = sys.modules.get(fc.RAY_BACKEND_MODULE)
    cfg = small_cfg(rounds=2, round_timeout=60.0)
    results = run_federated(
        cfg,
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "run",
        run_id="inproc",
        sites=["a", "b", "tight"],
        trainer_factory=fake_factory,
        backend="in-process",
    ).to_dict()
    assert [h["declined"] for h in results["history"]] == [[], ["tight"]]
    for site in results["sites"]:
        ledger = read_json(fake_ledger(tmp_path / "run", site["name"]))
        assert site["epsilon"] == pytest.approx(ledger["epsilon"])
    assert not ca._TRAINERS  # no model outlives the run in this process
    assert sys.modules.get(fc.RAY_BACKEND_MODULE) is saved  # Flower's own module is back
    with pytest.raises(ValueError, match="backend = 'threads' is invalid"):
        run_federated(
            cfg, cache_dir=tmp_path, out_dir=tmp_path / "x", run_id="x", backend="threads"
        )


@pytest.mark.slow
def test_simulation_with_the_real_trainer_matches_the_ledgers(tmp_path: Path) -> None:
    from privseg.data.phantom import synth_task
    from privseg.data.prepare import prepare_cache
    from privseg.privacy.accounting import epsilon

    cfg = e2e_config(sites=2, strategy="fedprox")
    task = synth_task(tmp_path / "task", sites=2, patients_per_site=4, size=32, slices=8)
    cache = prepare_cache(task, tmp_path / "cache", cfg.data, seed=0).root
    results = run_federated(
        cfg, cache_dir=Path(cache), out_dir=tmp_path / "run", run_id="real"
    ).to_dict()
    assert [h["round"] for h in results["history"]] == [1, 2]
    from privseg.privacy.ledger import PrivacyLedger
    from privseg.privacy.stores import LEDGER_FILE, store_dir

    rows = PrivacyLedger(store_dir() / LEDGER_FILE).rows()  # the per-user store, by patient
    assert {r["site"] for r in rows} == {"site-0", "site-1"}
    assert not (tmp_path / "run" / "ledgers").exists()
    for site in results["sites"]:
        history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in site["releases"]]
        eps = epsilon(history, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant)
        assert site["epsilon"] == pytest.approx(eps) and eps > 0  # recomputable from releases
        assert site["steps"] == 4 == site["steps_lifetime"]
        assert site["patients"] and site["epsilon_lower_bound"] is False
    assert results["epsilon_max"] == pytest.approx(max(s["epsilon"] for s in results["sites"]))


# ---- issue 24, finding 7: early errors that name sites -----------------------------------------
def test_an_unreachable_epsilon_is_refused_before_flower_starts(
    tmp_path: Path, phantom_cache
) -> None:
    """It used to surface in round 1 (171 s in), naming the site by its Flower node id."""
    from privseg.config import Config

    cfg = Config.from_dict(
        {
            **e2e_config().to_dict(),
            "privacy": {"enabled": True, "target_epsilon": 0.001, "noise_multiplier": None},
        }
    )
    t0 = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"^site '[\w-]+': privacy.target_epsilon = 0.001 is unreach"
    ):
        run_federated(cfg, cache_dir=phantom_cache.root, out_dir=tmp_path / "run", run_id="e")
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "run" / "federated_state.pt").exists()


def test_a_sites_error_names_the_site_not_the_node(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord, Error, Message, RecordDict

    from privseg.core.errors import DataError
    from privseg.federated.identity import SiteIdentity
    from privseg.federated.strategy import make_strategy

    with pytest.raises(DataError, match="^site 'a': broken cache"), ca.named("a"):
        raise DataError("broken cache")
    strategy = make_strategy(small_cfg(), SiteIdentity({12998560576394869161: "b"}))
    ask = [
        Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type="train")
        for n in (77, 12998560576394869161)
    ]
    strategy.aggregate_train(
        1,
        [
            Message(Error(1, "x\nMessage: site 'a': broken cache"), reply_to=ask[0]),
            Message(Error(1, "DataError: no manifest"), reply_to=ask[1]),
        ],
    )
    assert strategy.last_train.failed == [
        "site 'a': broken cache",
        "site b: DataError: no manifest",
    ]


@pytest.mark.slow
def test_a_killed_federated_train_leaves_no_ray_process(tmp_path: Path, phantom_dir: Path) -> None:
    """Issue 24, finding 6: Ray's agents lived ~70 s after a SIGKILL of `privseg train`."""
    import os
    import subprocess
    import sys

    from privseg.federated.reaper import descendants, proc_start

    cfg_file = tmp_path / "cfg.toml"
    cfg_file.write_text(e2e_config(rounds=500).to_toml())
    cli = [sys.executable, "-c", "from privseg.cli.app import main; main()", "train"]
    args = ["--data", str(phantom_dir), "--out", str(tmp_path / "run"), "--mode", "federated"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    log = open(tmp_path / "train.out", "wb")  # noqa: SIM115 - closed below
    train = subprocess.Popen(
        [*cli, *args, "--config", str(cfg_file)], stdout=log, stderr=log, env=env
    )
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "run" / "federated_state.pt").exists():  # round 1 is done
            assert time.monotonic() < deadline and train.poll() is None, (
                tmp_path / "train.out"
            ).read_text()
            time.sleep(0.5)
        children = descendants(train.pid)
        assert len(children) >= 3  # Ray's processes (and the watcher)
        train.kill()
        train.wait()
        t0 = time.monotonic()
        while any(proc_start(p) == s for p, s in children.items()):
            assert time.monotonic() - t0 < 1.0, [
                p for p, s in children.items() if proc_start(p) == s
            ]
            time.sleep(0.05)
    finally:
        train.kill()
        train.wait()
        log.close()
