"""Flower's FedAvg / FedProx / FedAdam, made aware of sites, declines and privacy.

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
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from privseg.config import Config
from privseg.federated import messages as M
from privseg.federated.identity import SiteIdentity
from privseg.results import nanmean

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
    identity: SiteIdentity  # which node is which site (its registered key, see identity.py)
    last_train: TrainRound
    last_evaluate: dict[str, dict[str, float]]
    last_releases: dict[str, list[dict[str, Any]]]  # DP sites' release lists (final test)

    def _sort_replies(
        self, replies: Iterable[Message], *, secure: bool = False
    ) -> tuple[TrainRound, list[Message]]:
        """Per-site metrics; the replies of the sites that trained (not failed or declined).

        ``secure``: SecAgg+ replies carry no weights, so only the ``declined`` metric counts.
        """
        report = TrainRound()
        usable: list[Message] = []
        norms: list[float] = []  # of the usable updates (new - global weights)
        for msg in replies:
            if msg.has_error():
                report.failed.append(f"node {msg.metadata.src_node_id}: {short(msg.error.reason)}")
                continue
            site, metrics = M.reply_site(msg.content), M.reply_metrics(msg.content)
            refused = self.identity.problem(msg.metadata.src_node_id, site)
            if refused:
                report.failed.append(refused)
                report.refused += 1
                continue
            no_weights = not secure and not msg.content.array_records
            if metrics.get(M.DECLINED, 0.0) >= 1.0 or no_weights:
                report.sites[site] = metrics
                report.declined.append(site)
                continue
            eps = metrics.get(M.EPSILON, math.nan)
            if self.dp and not (eps > 0):  # NaN, 0 or absent: this update carries no DP
                report.failed.append(
                    f"site {site}: its update carries no DP guarantee (epsilon {eps}) in a DP "
                    "run; rejected"
                )
                report.refused += 1  # under SecAgg+ its update is in the masked sum: discard it
                continue
            report.sites[site] = metrics
            if not secure:
                problem, norm = self._check_update(msg)
                if problem:
                    report.failed.append(f"site {site}: {problem}; rejected for this round")
                    continue
                norms.append(norm)
            usable.append(msg)
            report.contributors.append(site)
        if not secure:
            self._drop_outliers(report, usable, norms)
        return report, usable

    # ---- validation before aggregating --------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any):
        """Remember the global weights the sites start from: updates are measured against them."""
        self._global = {k: np.asarray(v.numpy(), dtype=np.float64) for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[safe-super]

    def _check_update(self, msg: Message) -> tuple[str, float]:
        """Why a site's weights must not be averaged in ('' when they may: non-finite values are
        refused), and the norm of its update against the global weights it started from."""
        norm = 0.0
        start = getattr(self, "_global", {})
        for record in msg.content.array_records.values():
            for key, value in record.items():
                arr = np.asarray(value.numpy())
                if arr.dtype.kind != "f":
                    continue
                if not np.isfinite(arr).all():
                    bad = int((~np.isfinite(arr)).sum())
                    return f"its weights hold {bad} non-finite values", math.nan
                if key in start and start[key].shape == arr.shape:
                    norm += float(np.sum((arr - start[key]) ** 2))
        return "", math.sqrt(norm)

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
        return arrays, self._summary(report)

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
                per_site[site] = M.reply_metrics(msg.content)
                releases = M.reply_releases(msg.content)
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


class SiteFedAvg(SiteAggregation, FedAvg):
    """FedAvg (McMahan et al. 2017), per-site aware."""


class SiteFedProx(SiteAggregation, FedProx):
    """FedProx: the server side is FedAvg; sites add mu (w - w_global) to their gradient."""


class SiteFedAdam(SiteAggregation, FedAdam):
    """FedAdam (Reddi et al. 2021): Adam on the averaged update at the server."""


def make_strategy(cfg: Config, identity: SiteIdentity | None = None) -> SiteAggregation:
    """The strategy named by ``cfg.federated.strategy``; ``identity`` checks which node is
    which site (default: no registrations, first come holds a name)."""
    fed = cfg.federated
    common: dict[str, Any] = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=fed.min_sites,
        min_evaluate_nodes=fed.min_sites,
        min_available_nodes=fed.min_sites,
        weighted_by_key=M.AGG_WEIGHT,
        train_metrics_aggr_fn=_no_metrics,
        evaluate_metrics_aggr_fn=_no_metrics,
    )
    strategy: SiteAggregation
    if fed.strategy == "fedavg":
        strategy = SiteFedAvg(**common)
    elif fed.strategy == "fedprox":
        strategy = SiteFedProx(proximal_mu=fed.proximal_mu, **common)
    elif fed.strategy == "fedadam":
        strategy = SiteFedAdam(eta=fed.server_lr, eta_l=cfg.train.lr, **common)
    else:  # pragma: no cover - the config validates the name
        raise ValueError(f"federated.strategy = {fed.strategy!r} is not supported")
    strategy.weighted = fed.weighted
    strategy.dp = cfg.privacy.enabled
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
