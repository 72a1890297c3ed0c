"""A node's site is its registered key's, never the name its reply claims (fast, no Flower run).

The deployment end of it (two real SuperNodes, one with another site's key) is in
tests/test_federated_deployment.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, MetricRecord

from conftest import InProcessGrid, fake_factory, handle, small_cfg
from privseg.core.errors import FederationError
from privseg.federated import client_app as ca
from privseg.federated import messages as M
from privseg.federated.certs import check_distinct_keys, make_certs
from privseg.federated.deployment import _node_id
from privseg.federated.identity import SiteIdentity, dumps_site_nodes, loads_site_nodes
from privseg.federated.rounds import ServerSettings, run_server
from privseg.federated.server_app import build_results
from privseg.federated.strategy import make_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class ClaimGrid(InProcessGrid):
    """Node ``n`` runs the site handlers under the name it *claims*, on data in its own folder
    (its own fake ledger) and with its own trainers, as a process of its own would: an
    impostor can claim another site's name."""

    def __init__(self, nodes: dict[int, tuple[str, Path]]) -> None:
        super().__init__()
        self.nodes = nodes
        self.trainers: dict[int, dict] = {n: {} for n in nodes}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def answer(self, msg: Message) -> Message:
        claimed, folder = self.nodes[msg.metadata.dst_node_id]
        settings = ca.SiteSettings(claimed, folder, folder)
        shared = ca._TRAINERS
        ca._TRAINERS = self.trainers[msg.metadata.dst_node_id]  # this node's process
        try:
            return handle(msg, settings, fake_factory)
        finally:
            ca._TRAINERS = shared


# ---- the rules -----------------------------------------------------------------------------
def test_a_registered_node_may_only_be_its_own_site() -> None:
    ident = SiteIdentity({11: "a", 22: "b"})
    assert ident.problem(11, "a") == ""
    assert ident.problem(11, "a") == ""  # every round
    why = ident.problem(22, "a")
    assert "node 22 holds the key registered for site 'b'" in why and "claims site 'a'" in why
    assert "no key the server registered" in ident.problem(33, "c")
    assert ident.problem(22, "b") == ""  # the refusal took nothing from b


def test_without_registrations_the_first_node_holds_a_name() -> None:
    ident = SiteIdentity()
    assert ident.problem(1, "a") == ""
    assert "two nodes for one site" in ident.problem(2, "a")
    assert "one node for two sites" in ident.problem(1, "b")
    assert ident.problem(2, "b") == ""  # the refused claim did not bind 'b' to node 1
    ident.keep_connected([2])  # node 1 is gone: a restarted SuperNode gets a new id
    assert ident.problem(3, "a") == ""
    assert "two nodes for one site" in ident.problem(4, "b")


def test_registered_names_survive_a_disconnect() -> None:
    ident = SiteIdentity({11: "a"})
    assert ident.problem(11, "a") == ""
    ident.keep_connected([])  # a registered node keeps its id across restarts: nothing freed
    assert "no key the server registered" in ident.problem(12, "a")


def test_site_nodes_travel_in_the_run_config() -> None:
    nodes = {-9_000_000_000_000_000_000: "a", 42: "b"}  # Flower's node ids are signed int64
    text = dumps_site_nodes(nodes)
    assert loads_site_nodes(text) == nodes and loads_site_nodes("") is None
    settings = ServerSettings.from_run_config(
        {
            M.CFG_TOML: small_cfg().to_toml(),
            "out-dir": "/tmp/x",
            M.CFG_RUN_ID: "r",
            "site-nodes": text,
        }
    )
    assert settings.site_nodes == nodes
    with pytest.raises(FederationError, match="one site for two nodes"):
        loads_site_nodes('{"1": "a", "2": "a"}')
    with pytest.raises(FederationError, match="not valid"):
        loads_site_nodes("[1, 2]")


def test_node_id_is_read_from_flower_register_json() -> None:
    # what `flwr supernode register --format json` prints (rich's indented JSON)
    assert _node_id('{\n  "success": true,\n  "node-id": -7291\n}\n') == -7291
    assert _node_id('{"success": false, "error-message": "x"}') is None
    assert _node_id("Exit Code: 305 ...") is None


def test_one_key_for_two_site_names_is_refused(tmp_path: Path) -> None:
    files = make_certs(tmp_path / "c", ["a", "b"])
    check_distinct_keys(files.site_public_keys())
    copy = files.root / "sites" / "c.pub"
    copy.write_bytes(files.site_pub("a").read_bytes().replace(b" a\n", b" c\n"))
    with pytest.raises(FederationError, match="same public key"):
        check_distinct_keys(files.site_public_keys())


# ---- the server loop ---------------------------------------------------------------------
def _spend(folder: Path, site: str, times: int) -> None:
    """``site``'s fake ledger in ``folder`` has spent 3 * ``times`` steps (epsilon 0.3 each)."""
    cfg = small_cfg()
    for rnd in range(1, times + 1):  # distinct rounds: an identical request would be replayed
        ca.handle_train(_train_msg(cfg, rnd), ca.SiteSettings(site, folder, folder), fake_factory)


def _train_msg(cfg, rnd: int = 1):
    from flwr.app import ConfigRecord, RecordDict

    state = {"w": np.zeros(3, dtype=np.float32)}
    config = ConfigRecord(
        {
            M.CFG_TOML: cfg.to_toml(),
            M.CFG_RUN_ID: "earlier",
            M.CFG_ROUND: rnd,
            M.CFG_LOCAL_STEPS: 3,
            M.CFG_PLANNED_STEPS: 6,
        }
    )
    return Message(
        RecordDict({M.ARRAYS: M.array_record(state), M.CONFIG: config}),
        dst_node_id=1,
        message_type="train",
    )


def test_an_impostor_with_another_sites_key_is_refused_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Node 22 holds b's key but calls itself 'a' (and its data has spent far more): every
    reply of it is refused and logged; 'a' keeps its own row and epsilon."""
    _spend(tmp_path / "impostor", "a", 5)  # the impostor's epsilon would be 1.5 + 0.6
    cfg = small_cfg(rounds=2, min_sites=1)
    grid = ClaimGrid({11: ("a", tmp_path / "real"), 22: ("a", tmp_path / "impostor")})
    s = ServerSettings(
        cfg=cfg, out_dir=tmp_path / "run", run_id="r1", site_nodes={11: "a", 22: "b"}
    )
    with caplog.at_level(logging.WARNING, logger="privseg"):
        summary = run_server(grid, s)
    for entry in summary["history"]:
        assert entry["sites"] == ["a"] and entry["failed"] == 1
        assert entry["epsilon_sites"] == pytest.approx({"a": 0.3 * entry["round"]})
    assert set(summary["test"]) == {"a"}
    results = build_results(cfg, summary, wall_seconds=1.0).to_dict()
    assert [(r["name"], r["epsilon"]) for r in results["sites"]] == [("a", pytest.approx(0.6))]
    refusals = [r.getMessage() for r in caplog.records if "holds the key registered" in r.message]
    assert len(refusals) == 3  # two train rounds and the final test (a DP run asks no val)
    assert all("node 22" in m and "site 'b'" in m and "claims site 'a'" in m for m in refusals)


def test_two_unregistered_nodes_for_one_site_keep_one_row(tmp_path: Path) -> None:
    """Without registrations (simulation, --insecure) the second node claiming 'a' is refused:
    the results never merge two nodes into one row or let one overwrite the other's epsilon."""
    _spend(tmp_path / "second", "a", 5)
    cfg = small_cfg(rounds=2, min_sites=1)
    grid = ClaimGrid({1: ("a", tmp_path / "first"), 2: ("a", tmp_path / "second")})
    summary = run_server(grid, ServerSettings(cfg=cfg, out_dir=tmp_path / "run", run_id="r1"))
    assert [h["failed"] for h in summary["history"]] == [1, 1]
    # whichever node answered first holds 'a' for the whole run: its epsilon, never a mix
    # (node 2's data had spent 1.5 before this run)
    start = {round(h["epsilon_sites"]["a"] - 0.3 * h["round"], 6) for h in summary["history"]}
    assert len(start) == 1 and start <= {0.0, 1.5}
    assert summary["test"]["a"][M.EPSILON] == pytest.approx(start.pop() + 0.6)


def test_too_few_genuine_sites_stop_the_run_naming_the_impostor(tmp_path: Path) -> None:
    cfg = small_cfg(rounds=1, min_sites=2)
    grid = ClaimGrid({11: ("a", tmp_path / "a"), 22: ("a", tmp_path / "b")})
    s = ServerSettings(
        cfg=cfg, out_dir=tmp_path / "run", run_id="r1", site_nodes={11: "a", 22: "b"}
    )
    with pytest.raises(FederationError, match="node 22 holds the key registered for site 'b'"):
        run_server(grid, s)


def _secure_replies(nodes: tuple[tuple[int, str, float], ...]) -> list[Message]:
    """SecAgg+ train replies (metrics and name; the update is in the masked sum) of
    ``(node, claimed site, epsilon)``."""
    replies = []
    for node, claimed, eps in nodes:
        metrics = {M.NUM_EXAMPLES: 10.0, M.EPSILON: eps, M.DECLINED: 0.0}
        content = M.site_reply(claimed, metrics, M.TRAIN_KEYS, None)
        reply = Message(content, dst_node_id=node, message_type="train")
        reply.metadata.__dict__["_src_node_id"] = node
        replies.append(reply)
    return replies


def test_a_secure_sum_with_a_refused_node_is_discarded() -> None:
    """SecAgg+ masks every update into one sum: a refused node's update cannot be taken out."""
    strategy = make_strategy(small_cfg(), SiteIdentity({11: "a", 22: "b", 33: "c"}))
    replies = _secure_replies(((11, "a", 0.5), (22, "b", 0.5), (33, "a", 0.5)))
    mean = M.array_record({"w": np.ones(3, dtype=np.float32)})
    arrays, _ = strategy.aggregate_secure(1, replies, mean)
    assert arrays is None and strategy.last_train.contributors == []
    assert any("sum is discarded" in f for f in strategy.last_train.failed)
    honest = make_strategy(small_cfg(), SiteIdentity({11: "a", 22: "b"}))
    arrays, metrics = honest.aggregate_secure(1, replies[:2], mean)
    assert arrays is not None and isinstance(metrics, MetricRecord)


# ---- issue 24, finding 6: an impostor's own site is told, and exits non-zero ---------------------
def test_a_site_whose_every_reply_was_refused_is_told_and_fails(tmp_path: Path) -> None:
    from privseg.federated.site import check_accepted

    started = 0.0
    grid = ClaimGrid(
        {11: ("a", tmp_path / "a"), 22: ("b", tmp_path / "b"), 33: ("c", tmp_path / "c")}
    )
    settings = ServerSettings(
        cfg=small_cfg(),
        out_dir=tmp_path / "run",
        run_id="r1",
        site_nodes={11: "a", 22: "b", 33: "x"},
    )
    run_server(grid, settings)
    check_accepted("a", tmp_path / "a", started)  # its replies counted: no error
    with pytest.raises(FederationError, match="refused every reply from this site: wrong key"):
        check_accepted("c", tmp_path / "c", started)
    assert not ca.SiteSettings("a", tmp_path / "a", tmp_path / "a").refused.exists()


@pytest.mark.parametrize("eps", [math.nan, 0.0])
def test_a_secure_sum_with_an_update_without_epsilon_is_discarded(eps: float) -> None:
    """Issue 22 finding 5: under SecAgg+ a reply without epsilon was 'rejected' but its update
    stayed in the masked sum; the whole sum is now discarded."""
    strategy = make_strategy(small_cfg(), SiteIdentity({11: "a", 22: "b", 33: "c"}))
    replies = _secure_replies(((11, "a", 0.5), (22, "b", 0.5), (33, "c", eps)))
    mean = M.array_record({"w": np.ones(3, dtype=np.float32)})
    arrays, _ = strategy.aggregate_secure(1, replies, mean)
    assert arrays is None and strategy.last_train.contributors == []
    assert any("no DP guarantee" in f for f in strategy.last_train.failed)
    assert any("sum is discarded" in f for f in strategy.last_train.failed)
