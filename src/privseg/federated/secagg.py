"""Secure aggregation of a training round with Flower's SecAgg+ (federated.secure_aggregation).

Flower 1.42 has SecAgg+ only on its legacy path: ``flwr.server.workflow.SecAggPlusWorkflow``
(run inside a ``LegacyContext`` with a legacy ``flwr.server.strategy`` strategy) on the server,
``flwr.client.mod.secaggplus_mod`` on the site. We run the workflow for one round at a time
from our own round loop; our legacy "strategy" only hands out the fit instructions and captures
the unmasked sum. Every other step of a round (evaluation, checkpoints, resume, privacy
bookkeeping, dropouts and ``min_sites``) stays the plain one.

Per round, each site exchanges four ``train`` messages with the server (setup: public keys;
share keys: encrypted key shares; collect masked vectors: our fit request and the masked
update; unmask: key shares of the surviving sites). The site's handler is called once, in the
third stage, and runs the same ``site_train`` as without SecAgg.

What a site submits is its **update** ``new - global`` of the floating-point weights (integer
buffers keep the global value), clipped to ``+-federated.secagg_clip``, with weight
``num-examples`` (or 1 when ``federated.weighted = false``; 0 when the site declines the round).
``secaggplus_mod`` multiplies it by ``weight / max_weight``, quantises it to integers in
``[0, quantization_range]`` with stochastic (unbiased) rounding and adds the masks. The server
gets ``sum(w_i * u_i) / sum(w_i)`` with an error per coordinate of at most
``n_sites * 2 * secagg_clip / quantization_range * max_weight / sum(w_i)``; we use the largest
quantisation range that cannot overflow the 2**32 modulus (``(2**32 - 1) // n_sites``).
"""

from __future__ import annotations

import logging
import timeit
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    FitIns,
    Parameters,
    bytes_to_ndarray,
    ndarray_to_bytes,
    parameters_to_ndarrays,
)
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow

from privseg.config import FederatedConfig
from privseg.federated import flower_compat as fc
from privseg.federated import messages as M

log = logging.getLogger(__name__)

MODULUS = 2**32  # Flower's largest (and default) modulus_range
_INT32_MAX = 2**31 - 1  # flwr's stochastic rounding casts to int32


# ---- shared: which arrays are aggregated ------------------------------------------------------
def float_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The keys SecAgg+ aggregates: the floating-point arrays, in state_dict order."""
    return [k for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def protocol_params(n_sites: int, fed: FederatedConfig) -> dict[str, Any]:
    """SecAggPlusWorkflow's arguments for ``n_sites`` sampled sites.

    Every site is every other site's neighbour (``num_shares = n``, i.e. SecAgg+ reduces to
    SecAgg; fine for the tens of hospitals a federation has) and a key needs a majority of
    shares (``threshold = n // 2 + 1``): up to ``n - threshold`` sites may drop out during
    the protocol, and the server together with fewer than ``threshold`` sites learns no
    site's update.
    """
    if n_sites < 3:
        raise ValueError(f"SecAgg+ needs at least 3 sites, got {n_sites}")
    return {
        "num_shares": n_sites,
        "reconstruction_threshold": n_sites // 2 + 1,
        "max_weight": float(fed.max_examples) if fed.weighted else 1.0,
        "clipping_range": float(fed.secagg_clip),
        "quantization_range": min(_INT32_MAX, (MODULUS - 1) // n_sites),
        "modulus_range": MODULUS,
        "timeout": fed.round_timeout,
    }


# ---- server ------------------------------------------------------------------------------------
@dataclass
class SecureRound:
    """What the server learns from one SecAgg+ round."""

    mean: ArrayRecord | None  # global + weighted mean update of the contributors; None: halted
    replies: list[Message] = field(default_factory=list)  # per site: metrics and name only
    failed: list[str] = field(default_factory=list)  # sites that dropped out, why it halted
    seconds: float = 0.0


class _Instructions(LegacyStrategy):
    """A legacy strategy that only hands out our fit instructions and keeps the sum."""

    def __init__(self, instructions: list[tuple[Any, FitIns]]) -> None:
        self.instructions = instructions
        self.aggregate: Parameters | None = None

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return self.instructions

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        # SecAggPlusWorkflow has put the unmasked weighted mean into every result
        self.aggregate = results[0][1].parameters if results else None
        return self.aggregate, {}

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return []

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None


class _Workflow(SecAggPlusWorkflow):
    """SecAggPlusWorkflow that does not unmask a sum of fewer than ``min_contributors`` updates.

    A site that declines (privacy budget) still takes part with weight 0; if too few sites
    really contributed, the "sum" would be one site's update in the clear.
    """

    def __init__(self, *, min_contributors: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_contributors = min_contributors
        self.halted = ""

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        if not super().collect_masked_vectors_stage(grid, context, state):
            self.halted = "too many sites dropped out (fewer than the reconstruction threshold)"
            return False
        contributors = sum(1 for _, res in fc.legacy_results(state) if res.num_examples > 0)
        if contributors < self.min_contributors:
            self.halted = (
                f"only {contributors} site(s) contributed an update; the sum is not unmasked "
                f"(it must mix at least {self.min_contributors})"
            )
            return False
        return True


Send = Callable[..., Iterable[Message]]
"""``send(grid, messages, timeout=...) -> replies`` (default: ``grid.send_and_receive``)."""


def _grid_send(grid: Any, messages: Iterable[Message], *, timeout: float | None) -> Any:
    return grid.send_and_receive(messages, timeout=timeout)


class _Recorder:
    """The grid as the workflow sees it: sends with ``send`` and keeps every reply."""

    def __init__(self, grid: Any, send: Send) -> None:
        self.grid, self.send = grid, send
        self.replies: list[list[Message]] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        out = list(self.send(self.grid, messages, timeout=timeout))
        self.replies.append(out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def secure_round(
    grid: Any,
    node_ids: list[int],
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    fed: FederatedConfig,
    *,
    min_contributors: int | None = None,
    send: Send = _grid_send,
    who: Callable[[int, str], str] = lambda node, why: f"node {node}: {why}",
) -> SecureRound:
    """Run SecAgg+ for one round at ``node_ids``; return the new weights (global + mean update).

    ``arrays`` are the global weights, ``config`` the round's config record (as our strategies
    build it). The sites' updates are weighted as plain FedAvg weights them.
    """
    t0 = timeit.default_timer()
    keys = list(arrays.keys())
    fit_config = {**dict(config), M.CFG_ARRAY_KEYS: "\n".join(keys)}
    fitins = FitIns(fc.arrayrecord_to_parameters(arrays), fit_config)
    strategy = _Instructions([(fc.grid_client_proxy(nid, grid), fitins) for nid in node_ids])
    context = fc.legacy_context(strategy, server_round, t0, arrays)
    workflow = _Workflow(
        min_contributors=max(2, min_contributors or fed.min_sites),
        **protocol_params(len(node_ids), fed),
    )
    recorder = _Recorder(grid, send)
    workflow(recorder, context)  # type: ignore[arg-type]

    # per site: its stage-3 reply (metrics, name; the update left masked), else why it failed
    replies: dict[int, Message] = {}
    errors: dict[int, str] = {}
    for stage in recorder.replies:
        for msg in stage:
            nid = msg.metadata.src_node_id
            if msg.has_error():
                errors.setdefault(nid, msg.error.reason)
            elif M.METRICS in msg.content.metric_records:
                replies[nid] = msg
    failed = [  # named by site (``who``: the strategy's SiteIdentity.who)
        who(nid, errors.get(nid, "no reply during SecAgg+ (federated.round_timeout)"))
        for nid in node_ids
        if nid not in replies
    ]
    mean = None
    if strategy.aggregate is not None:
        mean = apply_update(arrays, parameters_to_ndarrays(strategy.aggregate))
    elif workflow.halted:
        failed.append(f"secure aggregation halted: {workflow.halted}")
    else:
        failed.append("secure aggregation halted (see the log)")
    return SecureRound(mean, list(replies.values()), failed, timeit.default_timer() - t0)


def apply_update(arrays: ArrayRecord, update: list[np.ndarray]) -> ArrayRecord:
    """``arrays`` plus ``update`` on the floating-point arrays (others unchanged), same dtypes."""
    current = {k: a.numpy() for k, a in arrays.items()}
    keys = float_keys(current)
    if len(keys) != len(update):
        raise ValueError(f"SecAgg+ returned {len(update)} arrays for {len(keys)} weights")
    for key, delta in zip(keys, update, strict=True):
        g = current[key]
        current[key] = (g.astype(np.float64) + delta.reshape(g.shape)).astype(g.dtype)
    return M.array_record(current)


def secure_train(
    grid: Any,
    strategy: Any,
    server_round: int,
    arrays: ArrayRecord,
    instructions: Iterable[Message],
    fed: FederatedConfig,
    *,
    send: Send = _grid_send,
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """The secure counterpart of ``strategy.aggregate_train(rnd, grid.send_and_receive(ins))``.

    ``instructions`` are ``strategy.configure_train``'s messages (who trains, with which
    config); the strategy's per-site report (``last_train``) is filled as in a plain round.
    ``arrays`` are the global weights as the strategy holds them (packed when the config of
    ``instructions`` names a layout, see ``M.pack``), and so are the new weights returned.
    """
    msgs = list(instructions)
    config = msgs[0].content[M.CONFIG] if msgs else ConfigRecord()
    node_ids = [m.metadata.dst_node_id for m in msgs]
    # SecAgg+ runs on the named weights (Flower's legacy format, one array per weight); the
    # strategy works on the packed ones (M.pack) when the config names a layout.
    layout = M.layout_of(config)
    named = M.array_record(M.unpack(arrays, layout))
    config = ConfigRecord({k: v for k, v in config.items() if k != M.CFG_LAYOUT})
    result = secure_round(
        grid, node_ids, server_round, named, config, fed, send=send, who=strategy.identity.who
    )
    log.info("round %d: SecAgg+ took %.1f s", server_round, result.seconds)
    mean = None if result.mean is None else M.pack_record(result.mean, layout)
    out = strategy.aggregate_secure(server_round, result.replies, mean, result.failed)
    for site, metrics in strategy.last_train.sites.items():
        if metrics.get(M.SECAGG_CLIPPED, 0.0) > 0:
            log.warning(
                "round %d: site %s clipped %d coordinates of its update to +-%g "
                "(raise federated.secagg_clip)",
                server_round,
                site,
                int(metrics[M.SECAGG_CLIPPED]),
                fed.secagg_clip,
            )
    return out


# ---- site ---------------------------------------------------------------------------------------
def secagg_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages; every other message passes through.

    Flower's mod treats every ``train`` message as a SecAgg+ stage (a plain one fails with
    a KeyError), so the one ClientApp serves plain and secure rounds through this guard.
    """
    if msg.metadata.message_type == MessageType.TRAIN and fc.is_secaggplus_stage(msg):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure_fit(msg: Message) -> bool:
    """Whether a train message is SecAgg+'s fit request (legacy FitIns layout)."""
    return M.FITINS_ARRAYS in msg.content.array_records


def fit_request(msg: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The config and the named global weights of SecAgg+'s fit request."""
    config = dict(msg.content[M.FITINS_CONFIG])
    keys = str(config[M.CFG_ARRAY_KEYS]).split("\n")
    data = [bytes_to_ndarray(a.data) for a in msg.content[M.FITINS_ARRAYS].values()]
    if len(keys) != len(data):
        raise ValueError(f"SecAgg+ fit request: {len(data)} arrays for {len(keys)} names")
    return config, dict(zip(keys, data, strict=True))


def site_update(
    global_state: Mapping[str, np.ndarray], new_state: Mapping[str, Any] | None, clip: float
) -> tuple[list[np.ndarray], int]:
    """The update ``new - global`` of the float arrays, clipped to ``+-clip`` (zeros when the
    site declined), and how many coordinates were clipped."""
    out, clipped = [], 0
    for key in float_keys(global_state):
        g = np.asarray(global_state[key], dtype=np.float64)
        if new_state is None:
            out.append(np.zeros_like(g))
            continue
        new = new_state[key]
        new = new.detach().cpu().numpy() if hasattr(new, "detach") else np.asarray(new)
        delta = new.astype(np.float64) - g
        clipped += int(np.count_nonzero(np.abs(delta) > clip))
        out.append(np.clip(delta, -clip, clip))
    return out, clipped


def fit_reply(content: RecordDict, update: list[np.ndarray], weight: int) -> RecordDict:
    """Add the legacy FitRes records that ``secaggplus_mod`` masks (then empties)."""
    params = Parameters(tensors=[ndarray_to_bytes(u) for u in update], tensor_type="numpy.ndarray")
    content[M.FITRES_ARRAYS] = fc.parameters_to_arrayrecord(params)
    content[M.FITRES_WEIGHT] = MetricRecord({"num_examples": int(weight)})
    content[M.FITRES_METRICS] = ConfigRecord({})
    content[M.FITRES_STATUS] = ConfigRecord({"code": 0, "message": "Success"})
    return content
