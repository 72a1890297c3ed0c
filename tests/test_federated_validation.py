"""Issue 24, finding 2: no site steers the global model (every reply validated before it counts)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from conftest import small_cfg
from privseg.config import Config
from privseg.core.errors import ConfigError
from privseg.core.plugins import AGGREGATIONS
from privseg.federated import messages as M
from privseg.federated.strategy import make_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")

G = torch.Generator().manual_seed(0)
BASE = {"w": torch.randn(4, 8, generator=G), "b": torch.randn(8, generator=G)}
LAYOUT = M.state_layout(BASE)


def strategy_for(**fed: Any):
    """A DP FedAvg (or ``fed``) strategy in round 1, global = BASE (packed)."""
    strategy = make_strategy(small_cfg(max_update_ratio=10.0, **fed))
    strategy.start(M.pack_record(BASE, LAYOUT))
    return strategy


def request(node: int) -> Message:
    return Message(RecordDict({M.CONFIG: ConfigRecord()}), dst_node_id=node, message_type="train")


def reply(node: int, site: str, step: float = 0.01, **metrics: Any) -> Message:
    """Site ``site``'s honest-looking reply: every weight moved by ``step``."""
    new = {k: v + step for k, v in BASE.items()}
    values = {M.NUM_EXAMPLES: 10, M.EPSILON: 0.5, M.DECLINED: 0.0, **metrics}
    arrays = M.pack_record(new, LAYOUT)
    content = RecordDict(
        {
            M.METRICS: MetricRecord({k: v for k, v in values.items() if v is not None}),
            M.SITE: ConfigRecord({"name": site}),
            M.ARRAYS: arrays,
        }
    )
    return Message(content, reply_to=request(node))


def with_arrays(msg: Message, arrays: dict[str, np.ndarray]) -> Message:
    msg.content[M.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return msg


def aggregate(strategy, replies: list[Message]) -> dict[str, np.ndarray] | None:
    arrays, _ = strategy.aggregate_train(1, replies)
    return None if arrays is None else M.unpack(arrays, LAYOUT)


def honest() -> list[Message]:
    return [reply(1, "a"), reply(2, "b"), reply(3, "c")]


@pytest.mark.parametrize("weight", [-19.999, 1e30, float("nan"), 0.0, 2.5])
def test_a_weight_that_is_not_the_sites_size_is_refused_and_named(weight: float) -> None:
    strategy = strategy_for()
    aggregate(strategy, honest())  # round 1 registers every site's size (10)
    strategy.start(M.pack_record(BASE, LAYOUT))
    bad = reply(4, "d", step=0.02, **{M.NUM_EXAMPLES: weight})
    new = aggregate(strategy, [*honest(), bad])
    assert strategy.last_train.contributors == ["a", "b", "c"]
    assert strategy.last_train.failed[0].startswith("site d: its 'num-examples'")
    np.testing.assert_allclose(new["w"], BASE["w"].numpy() + 0.01, rtol=1e-6)


def test_a_later_larger_count_is_refused() -> None:
    strategy = strategy_for()
    aggregate(strategy, honest())
    strategy.start(M.pack_record(BASE, LAYOUT))
    aggregate(strategy, [reply(1, "a", **{M.NUM_EXAMPLES: 11}), reply(2, "b"), reply(3, "c")])
    assert "over its registered size 10" in strategy.last_train.failed[0]
    assert strategy.last_train.contributors == ["b", "c"]


@pytest.mark.parametrize(
    ("arrays", "why"),
    [
        ({M.PACKED: np.zeros(40, dtype=np.int64)}, "int64 [40], the model's float32 [40]"),
        ({M.PACKED: np.zeros(39, dtype=np.float32)}, "float32 [39], the model's float32 [40]"),
        ({M.PACKED: np.zeros(40, dtype=np.float64)}, "float64 [40]"),
        ({M.PACKED: np.full(40, np.inf, dtype=np.float32)}, "40 non-finite values"),
        ({"w": np.zeros((4, 8), dtype=np.float32)}, "missing ['packed:floats']"),
    ],
)
def test_weights_that_are_not_the_models_are_refused_never_a_crash(
    arrays: dict[str, np.ndarray], why: str
) -> None:
    strategy = strategy_for()
    aggregate(strategy, [reply(1, "a"), with_arrays(reply(2, "b"), arrays)])  # no exception
    assert strategy.last_train.contributors == ["a"]
    assert (
        strategy.last_train.failed[0].startswith("site b: its weights")
        and why in (strategy.last_train.failed[0])
    )


@pytest.mark.parametrize(
    ("metrics", "why"),
    [
        ({M.NUM_EXAMPLES: None}, "lack ['num-examples']"),
        ({"loss_of_patient_7": 0.3}, "carry ['loss_of_patient_7']"),
        ({M.TRAIN_LOSS: 0.3}, "carry ['train_loss']"),  # unaccounted in a DP run
        ({M.DECLINED: 0.5}, "not 0 or 1"),
    ],
)
def test_missing_or_extra_metric_keys_refuse_the_reply(metrics: dict, why: str) -> None:
    strategy = strategy_for()
    aggregate(strategy, [reply(1, "a"), reply(2, "b", **metrics), reply(3, "c")])
    assert strategy.last_train.contributors == ["a", "c"]
    assert (
        strategy.last_train.failed[0].startswith("site b: ")
        and why in (strategy.last_train.failed[0])
    )


def test_a_huge_update_is_refused_with_two_sites() -> None:
    """The outlier check needs 3 replies; the norm bound holds for one site alone."""
    strategy = strategy_for()
    new = aggregate(strategy, [reply(1, "a"), reply(2, "b", step=1e4), reply(3, "c")])
    assert strategy.last_train.contributors == ["a", "c"]
    assert "over the bound" in strategy.last_train.failed[0]
    np.testing.assert_allclose(new["b"], BASE["b"].numpy() + 0.01, rtol=1e-6)
    two = strategy_for(min_sites=1)
    aggregate(two, [reply(1, "a"), reply(2, "b", step=1e4)])
    assert two.last_train.contributors == ["a"], two.last_train.failed
    capped = strategy_for(max_update_norm=0.1)  # an absolute maximum as well
    aggregate(capped, [reply(1, "a"), reply(2, "b", step=0.1)])
    assert capped.last_train.contributors == ["a"]


def test_every_aggregation_is_one_of_flowers() -> None:
    for name in AGGREGATIONS:
        fed = {"aggregation": name, "min_sites": 3}
        strategy = make_strategy(small_cfg(**fed))
        assert isinstance(strategy, AGGREGATIONS.get(name)(small_cfg(**fed).federated)[0])


@pytest.mark.parametrize(
    ("name", "n", "f"),
    [
        ("median", 3, 0),
        ("trimmed_mean", 3, 0),
        ("krum", 5, 1),
        ("multikrum", 5, 1),
        ("bulyan", 7, 1),
    ],
)
def test_a_robust_aggregation_ignores_a_poisoner_that_passes_every_check(
    name: str, n: int, f: int
) -> None:
    """A poisoned update 5x the others passes the norm and outlier checks; the rule drops it."""
    strategy = strategy_for(aggregation=name, min_sites=n, malicious_sites=f, trim_fraction=0.34)
    sites = [reply(i + 1, f"s{i}") for i in range(n - 1)]
    new = aggregate(strategy, [*sites, reply(n, "poisoner", step=0.05)])
    assert "poisoner" in strategy.last_train.contributors  # it passed validation
    np.testing.assert_allclose(new["w"], BASE["w"].numpy() + 0.01, rtol=1e-5)
    assert new["w"].dtype == np.float32


def test_aggregation_options_fail_early_with_did_you_mean() -> None:
    with pytest.raises(ConfigError, match="did you mean 'median'"):
        Config.from_dict({"federated": {"aggregation": "medain"}})
    with pytest.raises(ConfigError, match="fedadam"):
        Config.from_dict({"federated": {"aggregation": "median", "strategy": "fedadam"}})
    with pytest.raises(ConfigError, match="at least 7 sites"):
        Config.from_dict({"federated": {"aggregation": "bulyan", "malicious_sites": 1}})


def test_the_final_test_tells_each_node_whether_any_reply_counted() -> None:
    """The impostor's own site learns it was refused (finding 6); others hear 0."""

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3]

    strategy = strategy_for()
    aggregate(strategy, [reply(1, "a"), reply(2, "b"), reply(3, "b")])  # node 3 is refused
    msgs = strategy.configure_evaluate(
        3, M.pack_record(BASE, LAYOUT), ConfigRecord({M.CFG_FINAL: 1}), Grid()
    )
    told = {m.metadata.dst_node_id: m.content[M.CONFIG][M.CFG_REFUSED] for m in msgs}
    assert told == {1: 0, 2: 0, 3: 1}


def test_a_malformed_evaluation_reply_is_refused_not_a_crash() -> None:
    strategy = strategy_for()
    good = Message(
        M.site_reply("a", {M.DICE: 0.5, M.NUM_EXAMPLES: 2}, M.EVAL_KEYS, None), reply_to=request(1)
    )
    extra = Message(
        RecordDict(
            {
                M.METRICS: MetricRecord({M.DICE: 0.9, "patient_7_dice": 0.1}),
                M.SITE: ConfigRecord({"name": "b"}),
            }
        ),
        reply_to=request(2),
    )
    garbage = Message(
        RecordDict(
            {
                M.METRICS: MetricRecord({M.DICE: 0.9}),
                M.SITE: ConfigRecord({"name": "c", M.RELEASES: "not json"}),
            }
        ),
        reply_to=request(3),
    )
    strategy.aggregate_evaluate(3, [good, extra, garbage])
    assert list(strategy.last_evaluate) == ["a"] and not strategy.last_releases


def test_the_norm_bound_does_not_grow_with_the_model() -> None:
    """Review of #24: the bound was relative to the current global model, so a site sending
    the largest allowed update every round grew the model by a factor per round (4.6e37 after
    50 rounds with 2 sites); the run's first model caps it."""
    from privseg.federated.validation import update_norm_bound

    fed = Config().federated  # max_update_ratio 10
    grown = {"w": 100 * np.ones(4)}  # norm 200; the first model's, np.ones(4): 2
    assert update_norm_bound(fed, grown) == pytest.approx(2000)
    assert update_norm_bound(fed, grown, first=2.0) == pytest.approx(20)
    strategy = make_strategy(Config())
    strategy.start(M.array_record({"w": np.ones(4, dtype=np.float32)}))
    strategy.start(M.array_record({"w": 100 * np.ones(4, dtype=np.float32)}))
    assert strategy.first_norm == pytest.approx(2.0)
