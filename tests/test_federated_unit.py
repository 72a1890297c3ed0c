"""Fast tests of the Flower adapters with a fake SiteTrainer (no Ray, no network)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, RecordDict

from conftest import (
    BUILT,
    SIZES,
    FakeTrainer,
    InProcessGrid,
    fake_factory,
    fake_ledger,
    handle,
    small_cfg,
)
from privseg.config import Config
from privseg.core.errors import FederationError
from privseg.core.io import read_json
from privseg.core.run_folder import RunFolder
from privseg.federated import client_app as ca
from privseg.federated import messages as M
from privseg.federated.rounds import ServerSettings, run_server
from privseg.federated.state import initial_state
from privseg.federated.strategy import load_strategy_state, make_strategy, strategy_state

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class FakeGrid(InProcessGrid):
    """Sites run privseg's handlers with the fake trainer; a dead site answers with an Error."""

    def __init__(
        self,
        sites: list[str],
        out: Path,
        fail_round: int | None = None,
        dead_after: dict[str, int] | None = None,
        factory: ca.TrainerFactory = fake_factory,
    ) -> None:
        super().__init__()
        self.sites = {i + 1: s for i, s in enumerate(sites)}
        self.out, self.fail_round, self.dead_after = out, fail_round, dead_after or {}
        self.factory = factory
        self.sent: list[tuple[int, str, dict]] = []  # (round, message type, config) per message

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def answer(self, msg: Message) -> Message:
        rnd = int(msg.content[M.CONFIG].get(M.CFG_ROUND, 0))
        if self.fail_round is not None and rnd == self.fail_round:
            raise RuntimeError("server crash")
        site = self.sites[msg.metadata.dst_node_id]
        self.sent.append((rnd, msg.metadata.message_type, dict(msg.content[M.CONFIG])))
        if rnd > self.dead_after.get(site, 10**9):
            return Message(Error(code=1, reason=f"{site} is gone"), reply_to=msg)
        settings = ca.SiteSettings(site, self.out, self.out)
        return handle(msg, settings, self.factory)


def train_message(
    cfg: Config, state: dict[str, torch.Tensor], node: int = 1, rnd: int = 1
) -> Message:
    """A train message as the server sends it: packed weights, their layout in the config."""
    layout = M.state_layout(state)
    config = ConfigRecord(
        {
            M.CFG_LAYOUT: layout,
            M.CFG_TOML: cfg.to_toml(),
            M.CFG_RUN_ID: "r1",
            M.CFG_LOCAL_STEPS: 3,
            M.CFG_PLANNED_STEPS: 6,
            M.CFG_ROUND: rnd,
        }
    )
    return Message(
        RecordDict({M.ARRAYS: M.pack_record(state, layout), M.CONFIG: config}),
        dst_node_id=node,
        message_type="train",
    )


def state() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(2, 3), "b": torch.zeros(3), "n": torch.tensor(7)}


# ---- what leaves a site ----------------------------------------------------------------------
def test_train_reply_carries_only_weights_scalars_and_name(tmp_path: Path) -> None:
    settings = ca.SiteSettings("a", tmp_path, tmp_path)
    reply = ca.handle_train(train_message(small_cfg(), state()), settings, fake_factory)
    content = reply.content
    assert not reply.has_error()
    assert set(content.array_records) == {M.ARRAYS}
    # the model weights only: every float weight in one packed vector, the int buffer as is
    assert set(content[M.ARRAYS].keys()) == {M.PACKED, "n"}
    packed = content[M.ARRAYS][M.PACKED].numpy()
    assert packed.dtype == np.float32 and packed.shape == (6 + 3,)
    assert set(content.metric_records) == {M.METRICS}
    metrics = content[M.METRICS]
    assert set(metrics) <= M.TRAIN_KEYS
    assert all(isinstance(v, float) for v in metrics.values())
    assert set(content.config_records) == {M.SITE}
    assert dict(content[M.SITE]) == {"name": "a"}
    new = M.unpack_torch(content[M.ARRAYS], M.state_layout(state()))
    assert list(new) == list(state())
    assert torch.equal(new["w"], torch.ones(2, 3)) and torch.equal(new["n"], torch.tensor(7))
    assert metrics[M.NUM_EXAMPLES] == SIZES["a"] and metrics[M.EPSILON] == pytest.approx(0.3)


def plain_cfg(**fed: object) -> Config:
    """``small_cfg`` without DP: a site answers evaluation queries exactly."""
    return small_cfg(**fed).replace(**{"privacy.enabled": False})


def test_eval_reply_is_scalar_and_report_stays_local(tmp_path: Path) -> None:
    cfg = plain_cfg()
    msg = train_message(cfg, state())
    msg.content[M.CONFIG][M.CFG_SPLIT] = "test"
    msg.content[M.CONFIG][M.CFG_FINAL] = 1
    settings = ca.SiteSettings("b", tmp_path, tmp_path / "site-b")
    reply = ca.handle_evaluate(msg, settings, fake_factory)
    assert not reply.content.array_records
    assert set(reply.content[M.METRICS]) <= M.EVAL_KEYS
    assert reply.content[M.METRICS][M.DICE] == pytest.approx(0.71)
    report = read_json(settings.report)
    assert report["test"]["patients"][0]["id"] == "b-0"  # per-patient results: site folder only


def test_per_class_dice_leaves_a_site_as_scalars_and_is_named_by_the_server(
    tmp_path: Path,
) -> None:
    """A deployed server has no site report: each class's mean test Dice travels as one scalar
    (dice_class_<k>, in data.classes order) and the server names it from the config."""
    from privseg.federated.server_app import scalars_to_test_metrics

    cfg = plain_cfg().with_overrides(["data.classes={liver = [1, 2], tumour = [2]}"])
    msg = train_message(cfg, state())
    msg.content[M.CONFIG][M.CFG_SPLIT] = "test"
    msg.content[M.CONFIG][M.CFG_FINAL] = 1
    reply = ca.handle_evaluate(msg, ca.SiteSettings("b", tmp_path, tmp_path / "b"), fake_factory)
    metrics = dict(reply.content[M.METRICS])
    assert set(metrics) <= M.EVAL_KEYS and M.CLASS_DICE[2] not in metrics
    assert metrics[M.CLASS_DICE[0]] == pytest.approx(0.71)
    assert metrics[M.CLASS_DICE[1]] == pytest.approx(0.61)
    classes = scalars_to_test_metrics(metrics, cfg)["classes"]
    assert classes == {
        "liver": {"dice": pytest.approx(0.71)},
        "tumour": {"dice": pytest.approx(0.61)},
    }


def test_trainer_is_built_once_per_run_and_site(tmp_path: Path) -> None:
    settings = ca.SiteSettings("a", tmp_path, tmp_path)
    cfg = small_cfg()
    for rnd in range(1, 4):
        ca.handle_train(train_message(cfg, state(), rnd=rnd), settings, fake_factory)
    assert BUILT == ["a"]
    assert read_json(fake_ledger(settings.out_dir, settings.site))["steps"] == 9


def test_declined_site_sends_no_weights(tmp_path: Path) -> None:
    settings = ca.SiteSettings("tight", tmp_path, tmp_path)
    cfg = small_cfg()
    first = ca.handle_train(train_message(cfg, state()), settings, fake_factory)
    second = ca.handle_train(train_message(cfg, state(), rnd=2), settings, fake_factory)
    assert first.content[M.METRICS][M.DECLINED] == 0.0
    assert not second.has_error() and not second.content.array_records
    assert second.content[M.METRICS][M.DECLINED] == 1.0
    assert second.content[M.METRICS][M.EPSILON] == pytest.approx(0.3)


def test_fedprox_passes_the_global_weights(tmp_path: Path) -> None:
    settings = ca.SiteSettings("a", tmp_path, tmp_path)
    ca.handle_train(train_message(small_cfg(strategy="fedprox"), state()), settings, fake_factory)
    trainer = next(iter(ca._TRAINERS.values()))[1]
    assert torch.equal(trainer.global_states[-1]["w"], torch.zeros(2, 3))
    ca._TRAINERS.clear()
    ca.handle_train(train_message(small_cfg(), state()), settings, fake_factory)
    assert next(iter(ca._TRAINERS.values()))[1].global_states[-1] is None


def test_site_settings_from_partition_or_node_config(tmp_path: Path) -> None:
    sim = ca.site_settings(
        {"partition-id": 1, "num-partitions": 2},
        {"sites": "a,b", "data-dir": "/d", "out-dir": "/o"},
    )
    assert sim.site == "b" and sim.data_dir == Path("/d") and sim.out_dir == Path("/o")
    dep = ca.site_settings({"site": "x", "data-dir": "/d", "out-dir": "/o"}, {})
    assert dep.report == Path("/o/sites/x.json")
    with pytest.raises(Exception, match="no site"):
        ca.site_settings({}, {})


# ---- aggregation -------------------------------------------------------------------------------
def started(strategy, base: dict[str, torch.Tensor] | None = None):
    """The strategy as configure_train leaves it: this round's global weights known."""
    base = state() if base is None else base
    strategy.start(M.pack_record(base, M.state_layout(base)))
    return strategy


def _replies(cfg: Config, sites: list[str], tmp_path: Path, rnd: int = 1) -> list[Message]:
    return [
        ca.handle_train(
            train_message(cfg, state(), node=i + 1, rnd=rnd),
            ca.SiteSettings(s, tmp_path, tmp_path),
            fake_factory,
        )
        for i, s in enumerate(sites)
    ]


@pytest.mark.parametrize("weighted", [True, False])
def test_fedavg_weights_and_epsilon_max(tmp_path: Path, weighted: bool) -> None:
    cfg = small_cfg(weighted=weighted)
    strategy = started(make_strategy(cfg))
    replies = _replies(cfg, ["a", "b"], tmp_path)
    # a third site fails: its error must not stop the round
    replies.append(Message(Error(code=1, reason="boom"), reply_to=train_message(cfg, state(), 3)))
    arrays, metrics = strategy.aggregate_train(1, replies)
    w = M.unpack_torch(arrays, M.state_layout(state()))["w"]
    expected = (10 * 1.0 + 30 * 2.0) / 40 if weighted else 1.5
    assert torch.allclose(w, torch.full((2, 3), expected))
    assert metrics[M.EPSILON] == pytest.approx(0.3)  # max, equal here; never averaged
    assert strategy.last_train.contributors == ["a", "b"] and len(strategy.last_train.failed) == 1


def test_epsilon_is_max_not_mean(tmp_path: Path) -> None:
    cfg = small_cfg()
    settings = ca.SiteSettings("a", tmp_path, tmp_path)
    for rnd in range(1, 4):  # site a has spent 9 steps, site b will have spent 3
        ca.handle_train(train_message(cfg, state(), rnd=rnd), settings, fake_factory)
    strategy = started(make_strategy(cfg))
    strategy.aggregate_train(1, _replies(cfg, ["a", "b"], tmp_path))
    assert strategy.last_train.epsilon_max == pytest.approx(1.2)
    assert strategy.last_train.sites["b"][M.EPSILON] == pytest.approx(0.3)


def test_declined_replies_are_left_out(tmp_path: Path) -> None:
    cfg = small_cfg()
    _replies(cfg, ["tight"], tmp_path)  # spends its whole budget
    strategy = started(make_strategy(cfg))
    arrays, _ = strategy.aggregate_train(2, _replies(cfg, ["a", "tight", "b"], tmp_path, rnd=2))
    assert strategy.last_train.declined == ["tight"]
    got = M.unpack_torch(arrays, M.state_layout(state()))["b"]
    assert torch.allclose(got, torch.full((3,), 70 / 40))


def test_fedadam_state_round_trips(tmp_path: Path) -> None:
    cfg = small_cfg(strategy="fedadam")
    strategy = make_strategy(cfg)
    msgs = list(
        strategy.configure_train(
            1,
            M.pack_record(state(), M.state_layout(state())),
            ConfigRecord(),
            FakeGrid(["a", "b"], tmp_path),
        )
    )
    assert len(msgs) == 2
    strategy.aggregate_train(1, _replies(cfg, ["a", "b"], tmp_path))
    saved = strategy_state(strategy)
    assert set(saved) == {"m_t", "v_t"}
    other = make_strategy(cfg)
    load_strategy_state(other, saved)
    assert all((other.m_t[k] == v).all() for k, v in saved["m_t"].items())


# ---- the server loop: checkpoints, resume, dropout ----------------------------------------
def test_run_server_checkpoints_and_resumes(tmp_path: Path) -> None:
    cfg = small_cfg(rounds=3)
    s = ServerSettings(cfg=cfg, out_dir=tmp_path / "run", run_id="r1")
    with pytest.raises(RuntimeError, match="server crash"):
        run_server(FakeGrid(["a", "b"], tmp_path, fail_round=3), s)
    saved = torch.load(RunFolder(tmp_path / "run").federated_state, weights_only=True)
    assert saved["round"] == 2 and [h["round"] for h in saved["history"]] == [1, 2]
    s.resume = True
    events: list[dict] = []
    s.progress = events.append
    summary = run_server(FakeGrid(["a", "b"], tmp_path), s)
    assert [h["round"] for h in summary["history"]] == [1, 2, 3]
    assert [e["round"] for e in events] == [3]
    # every round moved each weight by the weighted mean delta (10*1 + 30*2) / 40 = 1.75
    init = initial_state(cfg)
    key = next(k for k, v in init.items() if v.is_floating_point())
    assert torch.allclose(summary["state_dict"][key], init[key] + 3 * 1.75, atol=1e-5)
    assert math.isnan(summary["test"]["a"][M.DICE])  # a DP site without eval_noise refuses
    assert summary["history"][-1]["epsilon_max"] == pytest.approx(0.9)


def test_one_exchange_per_round_the_sites_score_the_incoming_model(tmp_path: Path) -> None:
    """Round r's train message asks the sites to score round r-1's model on val first, so
    only the last round has its own evaluate exchange; every round still gets its val Dice."""
    cfg = plain_cfg(rounds=3)
    grid = FakeGrid(["a", "b"], tmp_path)
    summary = run_server(grid, ServerSettings(cfg=cfg, out_dir=tmp_path / "run", run_id="r1"))
    kinds = [(rnd, kind) for rnd, kind, _ in grid.sent]
    done = [(0, "query")] * 2  # after the final answers are kept: the sites may leave
    assert [k for k in kinds if k[1] != "train"] == [(3, "evaluate")] * 2 + [
        (4, "evaluate")
    ] * 2 + done
    incoming = {rnd: c[M.CFG_EVAL_INCOMING] for rnd, kind, c in grid.sent if kind == "train"}
    assert incoming == {1: 0, 2: 1, 3: 1}
    for h in summary["history"]:
        assert h["val_dice_sites"] == {"a": 0.5, "b": 0.7}
        assert h["val_dice"] == pytest.approx(0.6)
    saved = torch.load(RunFolder(tmp_path / "run").federated_state, weights_only=True)
    assert all(h["val_dice"] == pytest.approx(0.6) for h in saved["history"])


def test_a_dp_run_asks_no_val_query_and_the_site_keeps_its_curve(tmp_path: Path) -> None:
    """Issue 22 finding 4: val_dice_nonprivate in every DP round was an unaccounted query on a
    model of the server's choosing; now only the final test query is asked (and a DP site
    without privacy.eval_noise refuses it: NaN)."""
    grid = FakeGrid(["a", "b"], tmp_path)
    summary = run_server(
        grid, ServerSettings(cfg=small_cfg(rounds=3), out_dir=tmp_path / "run", run_id="r1")
    )
    kinds = [(rnd, kind) for rnd, kind, _ in grid.sent]
    assert [k for k in kinds if k[1] != "train"] == [(4, "evaluate")] * 2 + [(0, "query")] * 2
    assert {c[M.CFG_EVAL_INCOMING] for _, kind, c in grid.sent if kind == "train"} == {0}
    assert all(h["val_dice"] is None for h in summary["history"])
    assert math.isnan(summary["test"]["a"][M.DICE])


def test_round_with_too_few_sites_stops_cleanly(tmp_path: Path) -> None:
    cfg = small_cfg(rounds=3)
    s = ServerSettings(cfg=cfg, out_dir=tmp_path / "run", run_id="r1")
    with pytest.raises(FederationError, match="min_sites"):
        run_server(FakeGrid(["a", "tight"], tmp_path), s)
    status = read_json(tmp_path / "run" / "federation_status.json")
    assert status["status"] == "stopped" and status["round"] == 1
    assert "tight" in status["message"]


def test_enough_sites_continue_without_the_declined_one(tmp_path: Path) -> None:
    cfg = small_cfg(rounds=3)
    s = ServerSettings(cfg=cfg, out_dir=tmp_path / "run", run_id="r1")
    summary = run_server(FakeGrid(["a", "b", "tight"], tmp_path), s)
    assert [h["declined"] for h in summary["history"]] == [[], ["tight"], ["tight"]]
    assert summary["history"][1]["sites"] == ["a", "b"]
    assert math.isclose(summary["history"][2]["epsilon_sites"]["tight"], 0.3)


def test_missing_sites_time_out(tmp_path: Path) -> None:
    cfg = small_cfg(min_sites=3)
    s = ServerSettings(cfg=cfg, out_dir=tmp_path / "run", run_id="r1", node_wait=0.2)
    with pytest.raises(FederationError, match="only 2 of the 3 sites"):
        run_server(FakeGrid(["a", "b"], tmp_path), s)


def test_first_round_waits_for_expected_sites_then_settles(tmp_path: Path) -> None:
    from privseg.federated.exchange import wait_for_sites

    grid = FakeGrid(["a", "b"], tmp_path)
    assert len(wait_for_sites(grid, 2, timeout=0.2, want=3)) == 2  # waited, then settled
    with pytest.raises(FederationError):
        wait_for_sites(grid, 3, timeout=0.1)


def test_a_site_that_drops_out_still_counts_in_epsilon_max(tmp_path: Path) -> None:
    cfg = small_cfg(rounds=3)
    for rnd in range(1, 4):  # site a has already spent 9 steps elsewhere
        ca.handle_train(
            train_message(cfg, state(), rnd=rnd),
            ca.SiteSettings("a", tmp_path, tmp_path),
            fake_factory,
        )
    s = ServerSettings(cfg=cfg, out_dir=tmp_path / "run", run_id="r1")
    summary = run_server(FakeGrid(["a", "b", "c"], tmp_path, dead_after={"a": 1}), s)
    last = summary["history"][-1]
    assert last["sites"] == ["b", "c"] and last["failed"] == 1
    assert last["epsilon_max"] == pytest.approx(1.2)  # a's, though a is gone
    assert last["epsilon_sites"] == pytest.approx({"a": 1.2, "b": 0.9, "c": 0.9})
    from privseg.federated.server_app import build_results

    results = build_results(cfg, summary, wall_seconds=1.0).to_dict()
    gone = next(site for site in results["sites"] if site["name"] == "a")
    assert not gone["completed"] and gone["epsilon"] == pytest.approx(1.2)
    assert gone["epsilon_lower_bound"] is True  # it may have reserved more before it died
    assert results["epsilon_max"] == pytest.approx(1.2)


def test_site_enforces_its_own_privacy_settings(tmp_path: Path) -> None:
    own = tmp_path / "site.toml"
    own.write_text("[privacy]\nenabled = true\nnoise_multiplier = 2.0\n")
    server_cfg = small_cfg().replace(**{"privacy.enabled": False})  # the server turns DP off
    settings = ca.SiteSettings("a", tmp_path, tmp_path, privacy_config=own)
    reply = ca.handle_train(train_message(server_cfg, state()), settings, fake_factory)
    trainer = next(iter(ca._TRAINERS.values()))[1]
    assert trainer.cfg.privacy.enabled and trainer.cfg.privacy.noise_multiplier == 2.0
    assert reply.content[M.METRICS][M.EPSILON] > 0


# ---- packed weights: one array per message -----------------------------------------------------
def test_pack_round_trips_exactly_and_checks_the_layout() -> None:
    st = {
        "w": torch.randn(2, 3),
        "n": torch.tensor(2**40 + 1),  # beyond float precision: must not go through a float
        "s": torch.tensor(0.5),
        "mask": torch.tensor([True, False]),
        "b": torch.randn(3),
    }
    layout = M.state_layout(st)
    wire = M.pack(st, layout)
    assert set(wire) == {M.PACKED, "n", "mask"}
    assert wire[M.PACKED].dtype == np.float32 and wire[M.PACKED].shape == (6 + 1 + 3,)
    back = M.unpack_torch(M.pack_record(st, layout), layout)
    assert list(back) == list(st)  # state_dict order
    for key, value in st.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value)
    with pytest.raises(ValueError, match="missing"):
        M.pack({k: v for k, v in st.items() if k != "b"}, layout)
    with pytest.raises(ValueError, match="layout packs"):
        M.pack({**st, "w": torch.zeros(3, 2)}, layout)
    with pytest.raises(ValueError, match="do not match the layout"):
        M.unpack({k: v for k, v in wire.items() if k != "n"}, layout)
    with pytest.raises(ValueError, match="values for a layout"):
        M.unpack({**wire, M.PACKED: wire[M.PACKED][:-1]}, layout)
    assert M.unpack(wire, None) is not None and M.pack(st, None).keys() == st.keys()


@pytest.mark.parametrize("name", ["unet", "monet"])
def test_our_models_travel_as_one_float32_array(name: str) -> None:
    from privseg.models import build_model

    cfg = Config.from_dict({"model": {"name": name, "features": 4, "groups": 1}})
    st = build_model(cfg.model).state_dict()
    assert all(v.is_floating_point() for v in st.values())  # no integer buffers (GroupNorm)
    layout = M.state_layout(st)
    rec = M.pack_record(st, layout)
    assert list(rec.keys()) == [M.PACKED] and rec[M.PACKED].numpy().dtype == np.float32
    back = M.unpack_torch(rec, layout)
    assert all(torch.equal(back[k], v) for k, v in st.items())


def _random_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "norm.weight": torch.randn(4, generator=g),
        "head.weight": torch.randn(1, 4, 1, 1, generator=g),
    }


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_aggregating_packed_equals_aggregating_per_tensor(tmp_path: Path, strategy: str) -> None:
    """Flower's strategies work elementwise: the packed vector aggregates like the tensors."""
    g = torch.Generator().manual_seed(0)
    init = _random_state(g)
    layout = M.state_layout(init)
    rounds = [[(_random_state(g), n) for n in (10, 30, 20)] for _ in range(3)]
    grid = FakeGrid(["a", "b", "c"], tmp_path)
    results = {}
    for packed in (False, True):
        lay = layout if packed else None
        strat = make_strategy(small_cfg(strategy=strategy))
        arrays = M.pack_record(init, lay)
        for rnd, sites in enumerate(rounds, start=1):
            ins = list(strat.configure_train(rnd, arrays, ConfigRecord(), grid))
            replies = [
                Message(
                    M.site_reply(
                        f"s{msg.metadata.dst_node_id}",  # a node keeps its site's name
                        {M.NUM_EXAMPLES: n, M.EPSILON: 0.5, M.DECLINED: 0.0},
                        M.TRAIN_KEYS,
                        M.pack_record(st, lay),
                    ),
                    reply_to=msg,
                )
                for msg in ins
                for st, n in [sites[msg.metadata.dst_node_id - 1]]  # a node's size is fixed
            ]
            arrays, _ = strat.aggregate_train(rnd, replies)
            assert arrays is not None and not strat.last_train.failed, strat.last_train.failed
            if packed:
                assert list(arrays.keys()) == [M.PACKED]
        moments = {k: M.unpack(d, lay) for k, d in strategy_state(strat).items()}
        results[packed] = (M.unpack(arrays, lay), moments)
    (plain, plain_m), (packed, packed_m) = results[False], results[True]
    assert list(packed) == list(init)
    for key, value in plain.items():
        assert packed[key].shape == value.shape
        np.testing.assert_allclose(packed[key], value, rtol=1e-6, atol=1e-7)
    assert set(packed_m) == set(plain_m) == ({"m_t", "v_t"} if strategy == "fedadam" else set())
    for name, d in plain_m.items():
        for key, value in d.items():
            np.testing.assert_allclose(packed_m[name][key], value, rtol=1e-6, atol=1e-9)


def test_fedadam_checkpoint_holds_state_dicts_and_resumes_exactly(tmp_path: Path) -> None:
    cfg = small_cfg(rounds=3, strategy="fedadam")
    whole = run_server(
        FakeGrid(["a", "b"], tmp_path / "w"),
        ServerSettings(cfg=cfg, out_dir=tmp_path / "whole", run_id="r1"),
    )
    s = ServerSettings(cfg=cfg, out_dir=tmp_path / "run", run_id="r1")
    with pytest.raises(RuntimeError, match="server crash"):
        run_server(FakeGrid(["a", "b"], tmp_path / "r", fail_round=3), s)
    saved = torch.load(RunFolder(tmp_path / "run").federated_state, weights_only=True)
    names = list(initial_state(cfg))
    assert list(saved["state_dict"]) == names  # a plain, named torch state_dict
    assert all(isinstance(v, torch.Tensor) for v in saved["state_dict"].values())
    assert set(saved["strategy"]) == {"m_t", "v_t"}
    assert all(list(d) == names for d in saved["strategy"].values())
    s.resume = True
    resumed = run_server(FakeGrid(["a", "b"], tmp_path / "r"), s)
    assert list(resumed["state_dict"]) == names
    for key, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value)


# ---- issue 14: nothing unaccounted leaves a DP site; the site's policy is a floor -------------
def test_a_dp_train_reply_carries_exactly_the_accounted_keys(tmp_path: Path) -> None:
    """No raw loss (unclipped, un-noised) and no timing (it reveals the Poisson batch size)."""
    settings = ca.SiteSettings("a", tmp_path, tmp_path)
    msg = train_message(small_cfg(), state())
    msg.content[M.CONFIG][M.CFG_EVAL_INCOMING] = 1
    metrics = ca.handle_train(msg, settings, fake_factory).content[M.METRICS]
    assert set(metrics) == {M.NUM_EXAMPLES, M.EPSILON, M.DECLINED}  # no val Dice (issue 22)
    assert M.DP_TRAIN_KEYS - set(metrics) == {M.SECAGG_CLIPPED}  # SecAgg+ rounds only
    plain = ca.handle_train(
        train_message(small_cfg().replace(**{"privacy.enabled": False}), state()),
        ca.SiteSettings("b", tmp_path, tmp_path),
        fake_factory,
    ).content[M.METRICS]
    assert {M.TRAIN_LOSS, M.SECONDS} <= set(plain)  # without DP they may travel


def test_a_dp_final_test_reply_has_no_spread_and_carries_the_releases(tmp_path: Path) -> None:
    """With two test patients, the mean and sd of Dice would give each patient's Dice."""
    msg = train_message(small_cfg(), state())
    msg.content[M.CONFIG][M.CFG_SPLIT] = "test"
    msg.content[M.CONFIG][M.CFG_FINAL] = 1
    reply = ca.handle_evaluate(msg, ca.SiteSettings("a", tmp_path, tmp_path), fake_factory)
    assert set(reply.content[M.METRICS]) <= M.DP_EVAL_KEYS
    assert M.DICE_SD not in reply.content[M.METRICS] and M.HD95 not in reply.content[M.METRICS]
    (release,) = M.reply_releases(reply.content)
    assert (release["noise_multiplier"], release["sample_rate"], release["steps"]) == (1.1, 0.1, 0)


def test_a_site_policy_without_enabled_keeps_dp_on(tmp_path: Path) -> None:
    """Finding 1: a site table with target, budget and unit but no `enabled` once replaced the
    server's whole table and trained without DP (epsilon 0.0 reported)."""
    own = tmp_path / "site.toml"
    own.write_text('[privacy]\ntarget_epsilon = 2.0\nbudget_epsilon = 5.0\nunit = "patient"\n')
    settings = ca.SiteSettings("a", tmp_path, tmp_path, privacy_config=own)
    for server_dp in (True, False):
        ca._TRAINERS.clear()
        server = small_cfg().replace(
            **{"privacy.enabled": server_dp, "privacy.target_epsilon": 8.0, "privacy.delta": 1e-4}
        )
        reply = ca.handle_train(train_message(server, state()), settings, fake_factory)
        cfg = next(iter(ca._TRAINERS.values()))[1].cfg.privacy
        assert cfg.enabled and cfg.unit == "patient" and cfg.budget_epsilon == 5.0
        assert cfg.target_epsilon == 2.0 and cfg.delta == 1e-5  # the smaller of the two
        assert reply.content[M.METRICS][M.EPSILON] > 0


def test_the_server_rejects_an_update_without_dp_in_a_dp_run(tmp_path: Path) -> None:
    """Finding 1, server side: never counted as epsilon 0."""
    strategy = make_strategy(small_cfg())
    arrays = M.pack_record(state(), None)
    grid = FakeGrid(["a", "b", "c"], tmp_path)
    ins = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    replies = [
        Message(
            M.site_reply(
                "a", {M.NUM_EXAMPLES: 5, M.EPSILON: eps, M.DECLINED: 0.0}, M.TRAIN_KEYS, arrays
            ),
            reply_to=ins[0],
        )
        for eps in (0.0,)
    ]
    new, _ = strategy.aggregate_train(1, replies)
    assert new is None and strategy.last_train.contributors == []
    assert "no DP guarantee" in strategy.last_train.failed[0]


# ---- issue 15: validate before aggregating ------------------------------------------------------
def _site_updates(strategy, grid, updates: dict[str, torch.Tensor]) -> list[Message]:
    base = state()
    arrays = M.pack_record(base, None)
    ins = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    out = []
    for (name, w), msg in zip(updates.items(), ins, strict=False):
        new = {**base, "w": base["w"] + w}
        metrics = {M.NUM_EXAMPLES: 5, M.EPSILON: 0.5, M.DECLINED: 0.0}
        out.append(
            Message(
                M.site_reply(name, metrics, M.TRAIN_KEYS, M.pack_record(new, None)), reply_to=msg
            )
        )
    return out


def test_a_non_finite_update_is_rejected_and_named(tmp_path: Path) -> None:
    """One NaN patch in one site's CT once turned every global parameter NaN."""
    strategy = make_strategy(small_cfg())
    grid = FakeGrid(["a", "b", "c"], tmp_path)
    nan = torch.full((2, 3), float("nan"))
    new, _ = strategy.aggregate_train(
        1, _site_updates(strategy, grid, {"a": torch.ones(2, 3), "b": nan, "c": torch.ones(2, 3)})
    )
    assert strategy.last_train.contributors == ["a", "c"]
    assert (
        "site b" in strategy.last_train.failed[0] and "non-finite" in strategy.last_train.failed[0]
    )
    assert torch.isfinite(new.to_torch_state_dict()["w"]).all()


def test_an_update_far_outside_the_others_is_rejected(tmp_path: Path) -> None:
    strategy = make_strategy(small_cfg())
    grid = FakeGrid(["a", "b", "c", "d"], tmp_path)
    ups = {"a": torch.ones(2, 3), "b": 1.2 * torch.ones(2, 3), "c": 0.9 * torch.ones(2, 3)}
    strategy.aggregate_train(1, _site_updates(strategy, grid, {**ups, "d": 50 * torch.ones(2, 3)}))
    assert sorted(strategy.last_train.contributors) == ["a", "b", "c"]
    assert "site d" in strategy.last_train.failed[0] and "median" in strategy.last_train.failed[0]


def test_a_site_that_stops_answering_is_logged_and_counted_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class SilentC(FakeGrid):
        def answer(self, msg: Message) -> Message | None:
            return None if self.sites[msg.metadata.dst_node_id] == "c" else super().answer(msg)

    cfg = small_cfg(rounds=1, round_timeout=0.3)
    s = ServerSettings(cfg=cfg, out_dir=tmp_path / "run", run_id="r1")
    with caplog.at_level("WARNING"):
        summary = run_server(SilentC(["a", "b", "c"], tmp_path), s)
    assert summary["history"][0]["failed"] == 1 and summary["history"][0]["sites"] == ["a", "b"]
    assert "no reply within federated.round_timeout = 0.3 s" in caplog.text


def test_a_sites_error_is_reported_in_one_line_without_the_traceback():
    from privseg.federated.strategy import short

    ray = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run()\n"
        '  File "x.py", line 1, in f\n    raise DataError(...)\n'
        "privseg.core.errors.DataError: cache: not a manifest\n\n"
        "Exception ClientAppException occurred. Message: cache: not a manifest'>"
    )
    assert short(ray) == "cache: not a manifest"
    assert short("plain reason") == "plain reason"
    assert len(short("x" * 1000)) == 300


# ---- issue 24: rounds are idempotent across a server crash --------------------------------------
class CrashGrid(FakeGrid):
    """The server dies once the sites have trained round ``crash_after``, before it saves it."""

    def __init__(self, *args: object, crash_after: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.crash_after, self.trained = crash_after, False

    def answer(self, msg: Message) -> Message:
        reply = super().answer(msg)
        rnd = int(msg.content[M.CONFIG].get(M.CFG_ROUND, 0))
        self.trained |= msg.metadata.message_type == "train" and rnd == self.crash_after
        return reply

    def pull_messages(self, message_ids):
        if self.trained:
            raise RuntimeError("server killed")
        return super().pull_messages(message_ids)


def calibrated_factory(cfg: Config, settings: ca.SiteSettings, *, planned_steps: int, run_id: str):
    """Each site refuses a step beyond the run's planned ones (its noise's calibration)."""
    ledger = fake_ledger(settings.out_dir, settings.site)
    return FakeTrainer(cfg, name=settings.site, ledger=ledger, budget_steps=planned_steps)


@pytest.mark.parametrize("crash_after", [1, 2, 3])
def test_a_resumed_server_finishes_every_round_without_extra_steps(
    tmp_path: Path, crash_after: int
) -> None:
    """The sites trained the round the server lost; on resume they replay it, so the last round
    is not declined and each site's ledger holds exactly the planned steps."""
    cfg = small_cfg(rounds=3)
    s = ServerSettings(cfg=cfg, out_dir=tmp_path / "run", run_id="r1")
    grid = CrashGrid(["a", "b"], tmp_path, factory=calibrated_factory, crash_after=crash_after)
    with pytest.raises(RuntimeError, match="server killed"):
        run_server(grid, s)
    s.resume = True
    summary = run_server(FakeGrid(["a", "b"], tmp_path, factory=calibrated_factory), s)
    assert [h["round"] for h in summary["history"]] == [1, 2, 3]
    assert all(h["sites"] == ["a", "b"] and not h["declined"] for h in summary["history"])
    for site in ("a", "b"):
        assert read_json(fake_ledger(tmp_path, site))["steps"] == 3 * 3
    init = initial_state(cfg)  # every round moved each weight by 1.75, no round twice
    key = next(k for k, v in init.items() if v.is_floating_point())
    assert torch.allclose(summary["state_dict"][key], init[key] + 3 * 1.75, atol=1e-5)


def test_a_site_replays_only_the_request_it_answered(tmp_path: Path) -> None:
    settings = ca.SiteSettings("a", tmp_path, tmp_path)
    cfg = small_cfg()
    first = ca.handle_train(train_message(cfg, state(), rnd=1), settings, fake_factory)
    again = ca.handle_train(train_message(cfg, state(), rnd=1), settings, fake_factory)
    assert read_json(fake_ledger(tmp_path, "a"))["steps"] == 3  # replayed, not trained
    assert dict(again.content[M.METRICS]) == dict(first.content[M.METRICS])
    assert np.array_equal(
        again.content[M.ARRAYS][M.PACKED].numpy(), first.content[M.ARRAYS][M.PACKED].numpy()
    )
    other = {k: v + 1 if v.is_floating_point() else v for k, v in state().items()}
    ca.handle_train(train_message(cfg, other, rnd=1), settings, fake_factory)  # other weights
    ca.handle_train(train_message(cfg, state(), rnd=2), settings, fake_factory)  # next round
    assert read_json(fake_ledger(tmp_path, "a"))["steps"] == 9
    assert RunFolder(tmp_path).site_reply("a").is_file()


def test_a_resume_with_another_config_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    """Review of #24: a resume compared only model and strategy, so a non-DP run resumed with
    DP on (or another aggregation, lr, local steps) was admitted and its config.toml replaced."""
    from privseg.core.errors import CheckpointError
    from privseg.federated.state import load_state

    cfg = plain_cfg(rounds=3)
    s = ServerSettings(cfg=cfg, out_dir=tmp_path / "run", run_id="r1")
    with pytest.raises(RuntimeError, match="server crash"):
        run_server(FakeGrid(["a", "b"], tmp_path, fail_round=3), s)
    assert load_state(tmp_path / "run", cfg.replace(**{"train.threads": 1})) is not None
    for change in ({"privacy.enabled": True}, {"train.lr": 0.5}, {"federated.local_steps": 5}):
        with pytest.raises(CheckpointError, match="another config"):
            load_state(tmp_path / "run", cfg.replace(**change))


class FinalCrashGrid(FakeGrid):
    """The server dies in the final test: once the sites answered (``at="answers"``, before
    it kept the answers) or when it tells them they may leave (``at="done"``)."""

    def __init__(self, *args: object, at: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.at, self.answered = at, False

    def answer(self, msg: Message) -> Message:
        if self.at == "done" and msg.metadata.message_type == "query":
            raise RuntimeError("server killed")
        self.answered |= int(msg.content[M.CONFIG].get(M.CFG_FINAL, 0)) == 1
        return super().answer(msg)

    def pull_messages(self, message_ids):
        if self.at == "answers" and self.answered:
            raise RuntimeError("server killed")
        return super().pull_messages(message_ids)


@pytest.mark.parametrize("at", ["answers", "done"])
def test_a_server_killed_in_the_final_test_resumes_without_a_second_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str
) -> None:
    """Review of #24: killed after the last round, the server lost the sites' final answers;
    they had left (report written, server gone), so the resumed run had no release lists.
    Now the sites stay until told the answers are kept, and replay their answer if asked."""
    answered: list[str] = []
    real = ca.site_evaluate

    def counted(config, state, settings, factory=fake_factory):
        answered.append(settings.site)
        return real(config, state, settings, factory)

    monkeypatch.setattr(ca, "site_evaluate", counted)
    s = ServerSettings(cfg=plain_cfg(rounds=2), out_dir=tmp_path / "run", run_id="r1")
    with pytest.raises(RuntimeError, match="server killed"):
        run_server(FinalCrashGrid(["a", "b"], tmp_path, at=at), s)
    done = [RunFolder(tmp_path).site_done(site) for site in ("a", "b")]
    assert not any(p.exists() for p in done)  # no site was told it may leave
    assert RunFolder(s.out_dir).final_test.is_file() == (at == "done")
    first = sorted(answered)
    s.resume = True
    grid = FakeGrid(["a", "b"], tmp_path)
    summary = run_server(grid, s)
    assert sorted(answered) == first  # the final test was answered once per site
    asked = [kind for _, kind, c in grid.sent if int(c.get(M.CFG_FINAL, 0))]
    assert asked == ([] if at == "done" else ["evaluate"] * 2)  # a kept answer: not asked
    assert [kind for _, kind, _ in grid.sent] == asked + ["query"] * 2
    assert all(p.is_file() for p in done)
    assert set(summary["test"]) == {"a", "b"}
    kept = read_json(RunFolder(s.out_dir).final_test)["test"]
    assert json.dumps(summary["test"], sort_keys=True) == json.dumps(kept, sort_keys=True)  # NaN


def test_a_kept_final_answer_is_replayed_only_for_the_same_request(tmp_path: Path) -> None:
    settings = ca.SiteSettings("a", tmp_path, tmp_path)
    calls: list[int] = []

    def factory(cfg, settings, *, planned_steps, run_id):
        trainer = fake_factory(cfg, settings, planned_steps=planned_steps, run_id=run_id)
        evaluate = trainer.evaluate
        trainer.evaluate = lambda *a, **k: calls.append(1) or evaluate(*a, **k)
        return trainer

    def final(weights: dict[str, torch.Tensor]) -> Message:
        msg = train_message(plain_cfg(), weights)
        msg.content[M.CONFIG][M.CFG_SPLIT] = "test"
        msg.content[M.CONFIG][M.CFG_FINAL] = 1
        return msg

    first = ca.handle_evaluate(final(state()), settings, factory)
    again = ca.handle_evaluate(final(state()), settings, factory)
    assert len(calls) == 1
    same = [json.dumps(dict(r.content[M.METRICS]), sort_keys=True) for r in (first, again)]
    assert same[0] == same[1]
    other = {k: v + 1 if v.is_floating_point() else v for k, v in state().items()}
    ca.handle_evaluate(final(other), settings, factory)  # another model: a new answer
    assert len(calls) == 2


def test_a_deployed_sites_privacy_scalars_become_typed_results(tmp_path: Path) -> None:
    """CI of #23: a deployed site's privacy arrives as float scalars; results.json then held
    `steps: 1.0`, which its own typed reader refused ("must be a whole number")."""
    from privseg.core.results import RunResult
    from privseg.federated.server_app import build_results

    cfg = small_cfg()
    scalars = {M.DICE: 0.5, M.STEPS: 6.0, M.EPSILON: math.nan, M.NOISE_MULTIPLIER: 1.1}
    summary = {"history": [], "test": {"a": scalars}, "n_train": {"a": 4}, "releases": {}}
    result = build_results(cfg, summary, wall_seconds=1.0)
    privacy = result.sites[0].privacy
    assert privacy["steps"] == 6 and isinstance(privacy["steps"], int)
    assert privacy["epsilon"] is None  # a missing epsilon is never 0
    result.write(tmp_path / "results.json")
    assert RunResult.load(tmp_path / "results.json").sites[0].privacy["steps"] == 6
