"""Secure aggregation (Flower's SecAgg+) of a round: same result, no update in the clear."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from conftest import DELTAS, SIZES, InProcessGrid, e2e_config, fake_factory, small_cfg
from privseg.config import Config
from privseg.core.errors import ConfigError, FederationError
from privseg.core.io import read_json
from privseg.federated import client_app as ca
from privseg.federated import messages as M
from privseg.federated.rounds import ServerSettings, run_server
from privseg.federated.secagg import protocol_params, secure_round, secure_train
from privseg.federated.strategy import make_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SITES = ["a", "b", "c"]


def secure_cfg(**fed: Any) -> Config:
    settings = {"secure_aggregation": True, "min_sites": 3, "secagg_clip": 4.0}
    settings["max_examples"] = 100
    return small_cfg(**{**settings, **fed})


def _stage(msg: Message) -> str | None:
    rec = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    return None if rec is None else str(rec.get(Key.STAGE, "reply"))


class AppGrid(InProcessGrid):
    """Node i runs the real ClientApp (mods included) as site ``sites[i]``, with its own
    persistent Context; every message pushed and every reply pulled is kept."""

    def __init__(self, sites: list[str], out: Path, fail: dict[str, str] | None = None) -> None:
        super().__init__()
        self.app = ca.make_client_app(trainer_factory=fake_factory)
        self.site = {i + 1: s for i, s in enumerate(sites)}
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config={"site": s, "data-dir": str(out), "out-dir": str(out)},
                state=RecordDict(),
                run_config={},
            )
            for nid, s in self.site.items()
        }
        self.fail = fail or {}  # site -> SecAgg+ stage at which it dies
        self.dead: set[int] = set()
        self.sent: list[tuple[str, str | None]] = []  # (message type, SecAgg+ stage)
        self.pulled: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return [nid for nid in self.site if nid not in self.dead]

    def answer(self, msg: Message) -> Message | None:
        stage = _stage(msg)
        self.sent.append((msg.metadata.message_type, stage))
        msg = copy.deepcopy(msg)  # as if sent over the wire (Flower's mod edits what it gets)
        nid = msg.metadata.dst_node_id
        if stage is not None and self.fail.get(self.site[nid]) == stage:
            self.dead.add(nid)
        if nid in self.dead:
            return None  # no reply: the node is gone
        try:
            reply = self.app(msg, self.contexts[nid])
        except Exception as exc:  # noqa: BLE001 - Flower turns a ClientApp exception into an Error
            reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        self.pulled.append(reply)
        return reply


def initial(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 5, generator=g),
        "b": torch.randn(5, generator=g).double(),
        "n": torch.tensor(7),
    }


def base_config(cfg: Config, run_id: str = "r1") -> ConfigRecord:
    fed = cfg.federated
    return ConfigRecord(
        {
            M.CFG_TOML: cfg.to_toml(),
            M.CFG_RUN_ID: run_id,
            M.CFG_LOCAL_STEPS: fed.local_steps,
            M.CFG_PLANNED_STEPS: fed.rounds * fed.local_steps,
        }
    )


def one_round(cfg: Config, grid: AppGrid, state: dict[str, torch.Tensor]):
    strategy = make_strategy(cfg)
    arrays = ArrayRecord(state)
    ins = strategy.configure_train(1, arrays, base_config(cfg), grid)
    if cfg.federated.secure_aggregation:
        new, _ = secure_train(grid, strategy, 1, arrays, ins, cfg.federated)
    else:
        new, _ = strategy.aggregate_train(1, grid.send_and_receive(ins))
    return new, strategy


def error_bound(cfg: Config, weights: list[float]) -> float:
    """SecAgg+'s worst-case quantisation error of the mean, per coordinate."""
    p = protocol_params(len(weights), cfg.federated)
    step = 2 * p["clipping_range"] / p["quantization_range"]
    return len(weights) * step * p["max_weight"] / sum(weights)


# ---- config and protocol parameters ------------------------------------------------------------
def test_config_refuses_fewer_than_three_sites() -> None:
    with pytest.raises(ConfigError, match="min_sites = 2 is invalid with federated.secure_agg"):
        small_cfg(secure_aggregation=True, min_sites=2)
    with pytest.raises(ConfigError, match="secagg_clip"):
        secure_cfg(secagg_clip=0.0)
    assert secure_cfg().federated.secure_aggregation


@pytest.mark.parametrize("n", [3, 4, 10, 200])
def test_protocol_parameters_cannot_overflow(n: int) -> None:
    p = protocol_params(n, secure_cfg().federated)
    assert p["num_shares"] == n and 2 <= p["reconstruction_threshold"] < n
    assert p["reconstruction_threshold"] > n / 2  # a majority holds each key
    assert n * p["quantization_range"] < p["modulus_range"] == 2**32
    assert p["quantization_range"] < 2**31  # flwr rounds to int32
    assert protocol_params(n, secure_cfg(weighted=False).federated)["max_weight"] == 1.0


def secure_and_plain(cfg: Config, tmp_path: Path, state: dict[str, torch.Tensor]):
    """One round with SecAgg+ and the same round in the clear: (secure, plain, strategy)."""
    secure, strategy = one_round(cfg, AppGrid(SITES, tmp_path / "s"), state)
    plain_cfg = cfg.replace(**{"federated.secure_aggregation": False})
    plain, _ = one_round(plain_cfg, AppGrid(SITES, tmp_path / "p"), state)
    return secure, plain, strategy


# ---- (1) the same aggregate as plain FedAvg ----------------------------------------------------
@pytest.mark.parametrize("weighted", [True, False])
def test_secure_mean_equals_fedavg(tmp_path: Path, weighted: bool) -> None:
    cfg = secure_cfg(weighted=weighted)
    state = initial()
    secure, plain, strategy = secure_and_plain(cfg, tmp_path, state)
    weights = [SIZES[s] if weighted else 1.0 for s in SITES]
    mean_delta = sum(w * DELTAS[s] for w, s in zip(weights, SITES, strict=True)) / sum(weights)
    tol = error_bound(cfg, weights) + 1e-6  # + float32 rounding of the weights
    got, ref = secure.to_torch_state_dict(), plain.to_torch_state_dict()
    for key in ("w", "b"):
        assert got[key].dtype == state[key].dtype
        assert torch.allclose(got[key].double(), ref[key].double(), atol=tol, rtol=0)
        assert torch.allclose(got[key].double(), state[key].double() + mean_delta, atol=tol)
    assert int(got["n"]) == 7  # integer buffers keep the global value
    report = strategy.last_train
    assert sorted(report.contributors) == SITES and not report.failed
    for s in SITES:  # per-site metrics still reach the server, per site
        assert report.sites[s][M.EPSILON] == pytest.approx(0.3)
        assert report.sites[s][M.NUM_EXAMPLES] == SIZES[s]
        assert report.sites[s][M.SECAGG_CLIPPED] == 0


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_server_optimizers_work_on_the_secure_mean(tmp_path: Path, strategy: str) -> None:
    cfg = secure_cfg(strategy=strategy)
    state = initial()
    secure, plain, _ = secure_and_plain(cfg, tmp_path, state)
    got, ref = secure.to_torch_state_dict(), plain.to_torch_state_dict()
    assert torch.allclose(got["w"].double(), ref["w"].double(), atol=1e-5)
    if strategy == "fedprox":  # the site got the global weights for its proximal term
        trainer = ca._TRAINERS[("r1", "a")][1]
        assert torch.allclose(trainer.global_states[0]["w"], state["w"])


def test_updates_are_clipped_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = secure_cfg(secagg_clip=1.5)
    state = initial()
    with caplog.at_level(logging.WARNING):
        new, strategy = one_round(cfg, AppGrid(SITES, tmp_path), state)
    clipped = {s: min(DELTAS[s], 1.5) for s in SITES}
    mean = sum(SIZES[s] * clipped[s] for s in SITES) / sum(SIZES[s] for s in SITES)
    got = new.to_torch_state_dict()["w"]
    assert torch.allclose(got, state["w"] + mean, atol=1e-5)
    assert strategy.last_train.sites["a"][M.SECAGG_CLIPPED] == 0
    assert strategy.last_train.sites["b"][M.SECAGG_CLIPPED] == 25  # every float coordinate
    assert "raise federated.secagg_clip" in caplog.text


# ---- (2) the server never receives a site's update in the clear --------------------------------
def _arrays_in(msg: Message) -> list[np.ndarray]:
    """Every numpy array the server could decode from a reply's config records."""
    out = []
    for rec in msg.content.config_records.values():
        for value in rec.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bytes) and item.startswith(b"\x93NUMPY"):
                    out.append(bytes_to_ndarray(item))
    return out


def test_server_receives_no_update_in_the_clear(tmp_path: Path) -> None:
    cfg = secure_cfg(rounds=2)
    grid = AppGrid(SITES, tmp_path)
    s = ServerSettings(cfg=cfg, out_dir=tmp_path / "run", run_id="r1")
    secure = run_server(grid, s)
    train_replies = [r for r in grid.pulled if r.metadata.message_type == "train"]
    assert len(train_replies) == 2 * 4 * len(SITES)  # 2 rounds x 4 SecAgg+ stages x 3 sites
    masked = []
    for reply in train_replies:
        assert not reply.has_error()
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        assert set(reply.content.metric_records) <= {M.METRICS, M.FITRES_WEIGHT}
        masked += [a for a in _arrays_in(reply) if a.size > 1]
    n_float = sum(v.is_floating_point() and v.numel() > 1 for v in make_initial(cfg).values())
    assert len(masked) == 2 * len(SITES) * n_float  # every weight of every site, every round
    for arr in masked:  # uniform in [0, 2**32), nothing like a (weighted, quantised) update
        assert np.ptp(arr) > 2**20
        for d in DELTAS.values():
            assert not np.allclose(arr, d * np.ones_like(arr), rtol=0.5)

    # and the run is the plain run: same weights, per-site epsilon and validation Dice
    plain_cfg = cfg.replace(**{"federated.secure_aggregation": False})
    plain = run_server(
        AppGrid(SITES, tmp_path / "p"),
        ServerSettings(cfg=plain_cfg, out_dir=tmp_path / "plain", run_id="r2"),
    )
    for key, value in plain["state_dict"].items():
        assert torch.allclose(secure["state_dict"][key], value, atol=1e-5)
    for a, b in zip(secure["history"], plain["history"], strict=True):
        assert a["epsilon_sites"] == pytest.approx(b["epsilon_sites"])
        assert a["val_dice_sites"] == pytest.approx(b["val_dice_sites"])
        assert a["sites"] == b["sites"] == SITES


# ---- declines and dropouts -----------------------------------------------------------------------
def test_a_declined_site_takes_part_with_weight_zero(tmp_path: Path) -> None:
    cfg = secure_cfg(rounds=2)
    sites = ["a", "b", "c", "tight"]  # tight can afford one round only
    summary = run_server(AppGrid(sites, tmp_path), ServerSettings(cfg, tmp_path / "run", "r1"))
    assert [h["declined"] for h in summary["history"]] == [[], ["tight"]]
    assert summary["history"][1]["epsilon_sites"]["tight"] == pytest.approx(0.3)
    w1 = (10 * 1 + 30 * 2 + 20 * 3 + 5 * 4) / 65
    w2 = (10 * 1 + 30 * 2 + 20 * 3) / 60
    init = ArrayRecord(make_initial(cfg)).to_torch_state_dict()
    key = next(k for k, v in init.items() if v.is_floating_point())
    assert torch.allclose(summary["state_dict"][key], init[key] + w1 + w2, atol=1e-5)


def make_initial(cfg: Config) -> dict[str, torch.Tensor]:
    from privseg.federated.state import initial_state

    return initial_state(cfg)


def test_unmasking_stops_when_too_few_sites_contribute(tmp_path: Path) -> None:
    cfg = secure_cfg(rounds=2)
    grid = AppGrid(["a", "b", "tight"], tmp_path)
    with pytest.raises(FederationError, match="round 2: only 0 site"):
        run_server(grid, ServerSettings(cfg, tmp_path / "run", "r1"))
    stages = [stage for kind, stage in grid.sent if kind == "train"]
    assert stages.count(Stage.UNMASK) == 3  # round 1 only: round 2's sum of 2 stays masked
    assert read_json(tmp_path / "run" / "federation_status.json")["round"] == 1


def test_a_site_that_dies_mid_protocol_is_recovered(tmp_path: Path) -> None:
    cfg = secure_cfg()
    sites = ["a", "b", "c", "tight"]
    grid = AppGrid(sites, tmp_path, fail={"c": Stage.COLLECT_MASKED_VECTORS})
    state = initial()
    strategy = make_strategy(cfg)
    arrays = ArrayRecord(state)
    ins = list(strategy.configure_train(1, arrays, base_config(cfg), grid))
    result = secure_round(
        grid,
        [m.metadata.dst_node_id for m in ins],
        1,
        arrays,
        ins[0].content[M.CONFIG],
        cfg.federated,
    )
    assert result.mean is not None and len(result.failed) == 1 and "node 3" in result.failed[0]
    mean = (10 * 1 + 30 * 2 + 5 * 4) / 45  # c's masks are removed with the others' shares
    got = result.mean.to_torch_state_dict()["w"]
    assert torch.allclose(got, state["w"] + mean, atol=1e-5)


# ---- end to end: Flower's simulation engine, the real trainer, the phantom ---------------------
@pytest.mark.slow
def test_simulation_with_secure_aggregation_writes_results(tmp_path: Path, phantom_cache) -> None:
    from privseg.runs.train import train

    cfg = e2e_config(min_sites=3, secure_aggregation=True)
    t0 = time.perf_counter()
    results = train(cfg, data=Path(phantom_cache.root), out=tmp_path / "run", mode="federated")
    print(f"SecAgg+ simulation: {time.perf_counter() - t0:.1f} s, rounds", results["history"])
    assert (tmp_path / "run" / "results.json").is_file()
    assert [h["round"] for h in results["history"]] == [1, 2]
    assert results["secure_aggregation"] is True
    assert [len(h["sites"]) for h in results["history"]] == [3, 3]
    assert len(results["sites"]) == 3 and all(s["epsilon"] > 0 for s in results["sites"])
    assert results["epsilon_max"] == pytest.approx(max(s["epsilon"] for s in results["sites"]))
