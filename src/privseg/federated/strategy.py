"""The registered Flower strategies (:mod:`privseg.federated.strategies`), made aware of sites,
declines and privacy.

Flower's strategies average every numeric metric; an epsilon must never be averaged. These
subclasses keep each site's metrics, report the MAX epsilon, skip sites that declined a round
(privacy budget exhausted) or failed, and weight by training slices or equally (the paper).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from privseg.config import Config, FederatedConfig
from privseg.core.plugins import STRATEGIES
from privseg.core.results import nanmean
from privseg.federated import messages as M
from privseg.federated.identity import SiteIdentity
from privseg.federated.validation import (
    ModelSpec,
    Refused,
    check_metrics,
    check_releases,
    check_size,
    model_norm,
    update_norm,
    update_norm_bound,
)

log = logging.getLogger(__name__)


@dataclass
class TrainRound:
    """What one training round brought back, site by site."""

    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    contributors: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    refused: int = 0  # replies refused: a claimed site not the node's (identity.py), no DP

    @property
    def epsilon_max(self) -> float:
        """The largest cumulative epsilon over every site that answered (never an average;
        NaN when none reported one: a missing epsilon is never 0)."""
        eps = [e for m in self.sites.values() if not math.isnan(e := m.get(M.EPSILON, math.nan))]
        return max(eps) if eps else math.nan

    def train_loss(self, weighted: bool) -> float:
        rows = [self.sites[s] for s in self.contributors]
        w = np.array([r[M.NUM_EXAMPLES] if weighted else 1.0 for r in rows], dtype=float)
        loss = np.array([r.get(M.TRAIN_LOSS, math.nan) for r in rows], dtype=float)
        ok = ~np.isnan(loss)
        return float(np.average(loss[ok], weights=w[ok])) if ok.any() and w[ok].sum() else math.nan


OUTLIER_FACTOR = 10.0
"""An update whose norm is this many times the median of the other sites' is rejected."""


def short(reason: str, limit: int = 300) -> str:
    """A site's error in one line: the message, without the Ray/Flower traceback around it."""
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    found = [ln.split("Message:", 1)[1].strip() for ln in lines if "Message:" in ln]
    text = (found or lines or [""])[-1].rstrip("'>")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _no_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    return MetricRecord()


class SiteAggregation(Strategy):
    """Mixin placed before a Flower strategy: per-site bookkeeping around its aggregation."""

    weighted: bool = True
    dp: bool = False  # a DP run: an update without a positive epsilon is rejected
    fed: FederatedConfig  # the update norm bound
    identity: SiteIdentity  # which node is which site (its registered key, see identity.py)
    spec: ModelSpec | None  # the model's arrays: names, shapes, dtypes
    first_norm: float | None  # the run's first model's norm: anchors the update norm bound
    sizes: dict[str, int]  # each site's registered training size (its first reply's)
    accepted: set[int]  # nodes with at least one accepted training reply in this run
    accepted_sites: set[str]  # their sites, the rounds before a resume included
    resumed: bool  # this process resumed the run: a node it has not heard is not known
    _global: dict[str, np.ndarray]  # this round's global weights
    last_train: TrainRound
    last_evaluate: dict[str, dict[str, float]]
    last_releases: dict[str, list[dict[str, Any]]]  # DP sites' release lists (final test)

    def _sort_replies(
        self, replies: Iterable[Message], *, secure: bool = False
    ) -> tuple[TrainRound, list[Message]]:
        """Per-site metrics; the replies of the sites that trained (not failed or declined).

        Every reply is validated first (:mod:`privseg.federated.validation`); a malformed one
        is refused with its reason, never an exception. ``secure``: SecAgg+ replies carry no
        weights, so only their metrics are checked.
        """
        report = TrainRound()
        usable: list[Message] = []
        norms: list[float] = []  # of the usable updates (new - global weights)
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                report.failed.append(self.identity.who(node, short(msg.error.reason)))
                continue
            site = M.reply_site(msg.content)
            refused = self.identity.problem(node, site)
            if refused:
                report.failed.append(refused)
                report.refused += 1
                continue
            try:
                verdict = self._check_reply(site, msg, secure)
            except Refused as exc:
                report.failed.append(f"site {site}: {exc}; reply refused")
                if secure:  # its update is in the masked sum all the same: discard the sum
                    report.refused += 1
                continue
            self.accepted.add(node)
            self.accepted_sites.add(site)
            metrics, norm = verdict
            report.sites[site] = metrics
            if metrics[M.DECLINED] >= 1.0:
                report.declined.append(site)
                continue
            norms.append(norm)
            usable.append(msg)
            report.contributors.append(site)
        if not secure:
            self._drop_outliers(report, usable, norms)
        return report, usable

    def _check_reply(self, site: str, msg: Message, secure: bool) -> tuple[dict[str, float], float]:
        """A reply's metrics and update norm, or Refused (see the module validation)."""
        metrics = check_metrics(msg.content, dp=self.dp)
        check_size(site, metrics[M.NUM_EXAMPLES], self.sizes, self.fed.max_examples)
        records = msg.content.array_records
        if metrics[M.DECLINED] >= 1.0:
            if records and not secure:
                raise Refused("it declined the round but sent weights")
            return metrics, math.nan
        eps = metrics.get(M.EPSILON, math.nan)
        # NaN, 0 or absent: no DP guarantee. An infinite epsilon is a DP site whose patients
        # were released without DP before (their lifetime total): this update is still noised
        if self.dp and not (eps > 0):
            raise Refused(f"its update carries no DP guarantee (epsilon {eps}) in a DP run")
        if secure:  # SecAgg+: no weights to check (the server never sees one update)
            return metrics, math.nan
        if self.spec is None:
            raise Refused("the server sent no model this round to check it against")
        if set(records) != {M.ARRAYS}:
            raise Refused(f"it sent array records {sorted(records)}, not [{M.ARRAYS!r}]")
        arrays = self.spec.check(records[M.ARRAYS])
        norm = update_norm(arrays, self._global)
        bound = update_norm_bound(self.fed, self._global, self.first_norm)
        if not norm <= bound:
            raise Refused(
                f"its update's norm {norm:.4g} is over the bound {bound:.4g} "
                "(federated.max_update_ratio x the global model's norm, or max_update_norm; "
                "raise them if many local steps make honest updates this large)"
            )
        return metrics, norm

    # ---- validation before aggregating --------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any):
        """Flower's messages, once the round's global weights are remembered (:meth:`start`)."""
        self.start(arrays)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[safe-super]

    def start(self, arrays: ArrayRecord) -> None:
        """Remember the global weights the sites start from (updates are measured against
        them); the first round's also fix the model's wire form unless :attr:`spec` is set."""
        self._global = {k: np.asarray(v.numpy(), dtype=np.float64) for k, v in arrays.items()}
        if self.first_norm is None:  # the bound never grows with the model
            self.first_norm = model_norm(self._global)
        if self.spec is None:
            self.spec = ModelSpec.of({k: v.numpy() for k, v in arrays.items()})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any):
        """Flower's messages; on the final test each site also learns whether the server
        accepted any of its training replies (an impostor's site then says so, see site.py)."""
        msgs = list(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[safe-super]
        if not int(config.get(M.CFG_FINAL, 0)):
            return msgs
        for msg in msgs:  # Flower's messages share one RecordDict: give each its own
            refused = self._refused(msg.metadata.dst_node_id)
            msg.content = RecordDict(
                {M.ARRAYS: arrays, M.CONFIG: ConfigRecord({**config, M.CFG_REFUSED: refused})}
            )
        return msgs

    def _refused(self, node: int) -> int:
        """1 when the server accepted none of this node's training replies in the run; a
        node first heard after a resume counts by its registered site (else: not claimed)."""
        if node in self.accepted:
            return 0
        site = self.identity.site_of(node)
        if site is not None:
            return int(site not in self.accepted_sites)
        return int(not self.resumed)

    def _drop_outliers(self, report: TrainRound, usable: list[Message], norms: list[float]) -> None:
        """With 3 or more updates, drop one whose norm (new - global weights) is more than
        OUTLIER_FACTOR times the median of the others: a poisoned or broken site."""
        if len(usable) < 3:
            return
        for i, msg in list(enumerate(usable))[::-1]:
            others = float(np.median(norms[:i] + norms[i + 1 :]))
            if others > 0 and norms[i] > OUTLIER_FACTOR * others:
                site = M.reply_site(msg.content)
                report.failed.append(
                    f"site {site}: its update's norm {norms[i]:.4g} is over {OUTLIER_FACTOR:g}x "
                    f"the median of the others ({others:.4g}); rejected for this round"
                )
                report.contributors.remove(site)
                usable.pop(i)
                norms.pop(i)

    def _summary(self, report: TrainRound) -> MetricRecord:
        return MetricRecord(
            {
                M.TRAIN_LOSS: report.train_loss(self.weighted),
                M.EPSILON: report.epsilon_max,
                "sites": float(len(report.contributors)),
            }
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report, usable = self._sort_replies(replies)
        for msg in usable:
            weight = M.reply_metrics(msg.content)[M.NUM_EXAMPLES] if self.weighted else 1.0
            msg.content[M.METRICS][M.AGG_WEIGHT] = float(weight)
        self.last_train = report
        if not usable:
            return None, None
        arrays, _ = super().aggregate_train(server_round, usable)  # type: ignore[safe-super]
        if arrays is None or self.spec is None:  # e.g. Bulyan with too few replies
            report.failed.append(f"{self.fed.aggregation}: no aggregate of {len(usable)} update(s)")
            report.contributors = []
            return None, None
        return self.spec.cast(arrays), self._summary(report)

    def aggregate_secure(
        self,
        server_round: int,
        replies: Iterable[Message],
        mean: ArrayRecord | None,
        failed: Iterable[str] = (),
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Secure aggregation: ``mean`` is the weighted mean of the contributing sites' weights,
        computed by SecAgg+ (the server never saw one site's weights); ``replies`` carry each
        site's metrics and name only. The strategy's own server step (FedAdam's optimizer,
        FedAvg's identity) runs on that mean exactly as it would on a plain average.
        """
        report, _ = self._sort_replies(replies, secure=True)
        report.failed.extend(failed)
        if report.refused and mean is not None:  # the masked sum holds the refused updates too
            report.failed.append(
                "the secure sum includes the update of a node that was refused (its site "
                "identity, or no DP guarantee in a DP run); the sum is discarded"
            )
            mean = None
        if mean is None:  # nobody's update reached a model
            report.contributors = []
        self.last_train = report
        if mean is None:
            return None, None
        one = Message(
            RecordDict({M.ARRAYS: mean, M.METRICS: MetricRecord({M.AGG_WEIGHT: 1.0})}),
            dst_node_id=0,
            message_type="train",
        )
        arrays, _ = super().aggregate_train(server_round, [one])  # type: ignore[safe-super]
        if arrays is not None and self.spec is not None:
            arrays = self.spec.cast(arrays)
        return arrays, self._summary(report)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        per_site: dict[str, dict[str, float]] = {}
        for msg in replies:
            if not msg.has_error():
                site = M.reply_site(msg.content)
                refused = self.identity.problem(msg.metadata.src_node_id, site)
                if refused:  # never a row of the results
                    log.warning("round %d: evaluation reply refused: %s", server_round, refused)
                    continue
                try:
                    metrics = check_metrics(msg.content, dp=self.dp, train=False)
                    releases = M.reply_releases(msg.content)
                    if releases is not None:
                        releases = check_releases(releases)
                except (Refused, ValueError, TypeError) as exc:
                    log.warning(
                        "round %d: site %s: evaluation reply refused: %s", server_round, site, exc
                    )
                    continue
                per_site[site] = metrics
                if releases is not None:
                    self.last_releases[site] = releases
        self.last_evaluate = per_site
        if not per_site:
            return None
        return MetricRecord(
            {
                M.DICE: nanmean(m.get(M.DICE, math.nan) for m in per_site.values()),
                "sites": float(len(per_site)),
            }
        )


def make_strategy(cfg: Config, identity: SiteIdentity | None = None) -> SiteAggregation:
    """The strategy named by ``cfg.federated`` (strategy, aggregation: looked up in
    :mod:`privseg.core.plugins`), made site-aware; ``identity`` checks
    which node is which site (default: no registrations, first come holds a name)."""
    fed = cfg.federated
    base, extra = STRATEGIES.get(fed.strategy)(cfg)
    cls = type(f"Site{base.__name__}", (SiteAggregation, base), {"__doc__": base.__doc__})
    strategy: SiteAggregation = cls(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=fed.min_sites,
        min_evaluate_nodes=fed.min_sites,
        min_available_nodes=fed.min_sites,
        weighted_by_key=M.AGG_WEIGHT,
        train_metrics_aggr_fn=_no_metrics,
        evaluate_metrics_aggr_fn=_no_metrics,
        **extra,
    )
    strategy.weighted = fed.weighted and fed.aggregation == "mean"
    strategy.dp = cfg.privacy.enabled
    strategy.fed = fed
    strategy.spec = None
    strategy.first_norm = None
    strategy.sizes = {}
    strategy.accepted = set()
    strategy.accepted_sites = set()
    strategy.resumed = False
    strategy.last_releases = {}
    strategy.identity = identity or SiteIdentity()
    strategy.last_train = TrainRound()
    strategy.last_evaluate = {}
    return strategy


_OPT_STATE = ("m_t", "v_t")


def strategy_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """Server-optimizer moments (FedAdam) to checkpoint; empty for FedAvg/FedProx."""
    out = {}
    for name in _OPT_STATE:
        value = getattr(strategy, name, None)
        if value:
            out[name] = {k: np.asarray(v) for k, v in value.items()}
    return out


def load_strategy_state(strategy: Strategy, state: dict[str, dict[str, Any]]) -> None:
    for name, value in state.items():
        if name in _OPT_STATE and hasattr(strategy, name):
            setattr(strategy, name, {k: np.asarray(v) for k, v in value.items()})
