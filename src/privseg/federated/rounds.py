"""The server's round loop over Flower's Grid.

We drive Flower's strategy round by round ourselves (instead of ``strategy.start``) so that
rounds keep their absolute number after a resume, every round is checkpointed atomically, and
the run stops with a clear message when fewer than ``federated.min_sites`` sites take part.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from privseg.config import Config
from privseg.core.errors import FederationError
from privseg.core.io import make_folder
from privseg.core.results import nanmean
from privseg.core.run_folder import RunFolder
from privseg.federated import messages as M
from privseg.federated.exchange import POLL, send_and_receive, wait_for_sites
from privseg.federated.final_test import final_test
from privseg.federated.identity import SiteIdentity, SiteNodes, loads_site_nodes
from privseg.federated.secagg import secure_train
from privseg.federated.state import (
    initial_state,
    load_state,
    save_state,
    saved_round,
    state_dict,
    write_status,
)
from privseg.federated.strategy import load_strategy_state, make_strategy
from privseg.federated.validation import ModelSpec, model_norm
from privseg.privacy.plan import planned_steps

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]
"""Called with each round's history entry once the round is saved."""


@dataclass
class ServerSettings:
    """Everything the server needs; parsed once from the engine's config at the boundary."""

    cfg: Config
    out_dir: Path
    run_id: str
    resume: bool = False
    progress: RoundCallback | None = None
    node_wait: float | None = None  # seconds to wait for min_sites (default: round_timeout)
    expected_sites: int = 0  # before the first round, wait (node_wait) for this many sites
    poll: tuple[float, float, float] = POLL  # send_and_receive's (lo, hi, factor)
    site_nodes: SiteNodes | None = None  # node id -> site, from the server's key registrations

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> ServerSettings:
        """Deployment: ``flwr run ... --run-config`` carries the config TOML and the out dir."""
        try:
            cfg = Config.from_dict(tomllib.loads(str(run_config[M.CFG_TOML])))
            return cls(
                cfg=cfg,
                out_dir=Path(str(run_config[M.RUN_OUT_DIR])),
                run_id=str(run_config[M.CFG_RUN_ID]),
                resume=bool(run_config.get(M.RUN_RESUME, False)),
                expected_sites=int(run_config.get(M.RUN_EXPECTED_SITES, 0)),
                site_nodes=loads_site_nodes(str(run_config.get(M.RUN_SITE_NODES, ""))),
            )
        except KeyError as exc:
            raise FederationError(f"the run config lacks {exc.args[0]!r}") from None


def _set_val(entry: dict[str, Any], dice: dict[str, float]) -> None:
    """Record the validation Dice of the global model that ``entry``'s round produced."""
    entry["val_dice_sites"] = dict(dice)
    entry["val_dice"] = nanmean(dice.values())


def run_server(grid: Grid, s: ServerSettings) -> dict[str, Any]:
    """Run (or resume) all rounds, then the final test evaluation at every site.

    Raises FederationError (and records it in ``federation_status.json``) when fewer than
    ``federated.min_sites`` sites connect or train in a round.
    """
    try:
        return _run_rounds(grid, s)
    except FederationError as exc:
        write_status(s.out_dir, "stopped", saved_round(s.out_dir), str(exc))
        raise


def _run_rounds(grid: Grid, s: ServerSettings) -> dict[str, Any]:
    """Restore or start, train every remaining round (each saved before the next), then the
    final test."""
    cfg, fed = s.cfg, s.cfg.federated
    send = functools.partial(send_and_receive, poll=s.poll)
    make_folder(s.out_dir)
    strategy = make_strategy(cfg, SiteIdentity(s.site_nodes))
    model = initial_state(cfg)  # replies are checked against its names, shapes and dtypes
    start, history, run_id, layout, arrays = _restore(s, strategy, model)
    base = {
        M.CFG_LAYOUT: layout,
        M.CFG_TOML: cfg.to_toml(),
        M.CFG_RUN_ID: run_id,
        M.CFG_LOCAL_STEPS: fed.local_steps,
        M.CFG_PLANNED_STEPS: planned_steps(cfg, federated=True),
    }
    wait = s.node_wait if s.node_wait is not None else fed.round_timeout
    # Last known cumulative epsilon and training size of every site that ever answered: a
    # site that drops out still counts in the maximum.
    known: dict[str, dict[str, Any]] = {"epsilon_sites": {}, "n_train_sites": {}}
    for old in history:
        for key, values in known.items():
            values.update(old.get(key, {}))
    strategy.sizes.update(known["n_train_sites"])  # a registered size holds across a resume
    for rnd in range(start + 1, fed.rounds + 1):
        t0 = time.perf_counter()
        want = s.expected_sites if rnd == start + 1 else 0
        strategy.identity.keep_connected(wait_for_sites(grid, fed.min_sites, wait, want))
        arrays, report, val, t_train = _train_round(
            grid, s, strategy, rnd, arrays, base, history, send
        )
        for key, name in (("n_train_sites", M.NUM_EXAMPLES), ("epsilon_sites", M.EPSILON)):
            got = {k: v.get(name, math.nan) for k, v in report.sites.items()}
            known[key].update({k: v for k, v in got.items() if not math.isnan(v)})
        entry = _round_entry(rnd, report, known, fed.weighted, (t0, t_train))
        if val is not None:
            _set_val(entry, val)
        history.append(entry)
        save_state(
            s.out_dir,
            cfg=cfg,
            rnd=rnd,
            arrays=arrays,
            layout=layout,
            history=history,
            strategy=strategy,
            run_id=run_id,
        )
        write_status(s.out_dir, "running", rnd, f"round {rnd} of {fed.rounds} done")
        if s.progress is not None:
            s.progress(entry)
    test, releases = final_test(grid, s, strategy, arrays, base, run_id=run_id, wait=wait)
    write_status(s.out_dir, "completed", fed.rounds, f"{fed.rounds} rounds done")
    return {
        "run_id": run_id,  # a resumed run keeps the id its sites' ledgers and replies know
        "state_dict": state_dict(arrays, layout),
        "history": history,
        "test": test,
        "releases": releases,
        "n_train": {k: int(v) for k, v in known["n_train_sites"].items()},
    }


def _restore(
    s: ServerSettings, strategy: Any, model: dict[str, Any]
) -> tuple[int, list[dict[str, Any]], str, str, ArrayRecord]:
    """(rounds done, history, run id, weight layout, global weights): the saved state of a
    resumed run, else round 0 of ``model``. The strategy learns what the run already knew."""
    saved = load_state(s.out_dir, s.cfg) if s.resume else None
    # The weights travel packed (one array per message, see M.pack); the layout goes with them.
    if saved is None:
        layout = M.state_layout(model)
        start, history, run_id, arrays = 0, [], s.run_id, M.pack_record(model, layout)
    else:
        start, history = int(saved["round"]), list(saved["history"])
        run_id = str(saved.get("run_id") or s.run_id)  # the sites' ledgers know the run by it
        layout = M.state_layout(saved["state_dict"])
        arrays = M.pack_record(saved["state_dict"], layout)
        load_strategy_state(
            strategy,
            {
                k: M.pack({n: t.numpy() for n, t in d.items()}, layout)
                for k, d in saved["strategy"].items()
            },
        )
        log.info("resuming after round %d of %d", start, s.cfg.federated.rounds)
    strategy.spec = ModelSpec.of(M.pack(model, layout))
    # the norm bound is anchored to the run's first model, also after a resume (never to a
    # model a site may have grown round by round)
    strategy.first_norm = model_norm(M.pack(model, layout))
    strategy.resumed = saved is not None
    strategy.accepted_sites.update(n for h in history for n in h["sites"] + h["declined"])
    return start, history, run_id, layout, arrays


def _train_round(
    grid: Grid,
    s: ServerSettings,
    strategy: Any,
    rnd: int,
    arrays: ArrayRecord,
    base: dict[str, Any],
    history: list[dict[str, Any]],
    send: Callable[..., list[Message]],
) -> tuple[ArrayRecord, Any, dict[str, float] | None, float]:
    """One round's train phase (and, in the last round of a run without DP, its val phase):
    the new global weights, the strategy's report, the val Dice per site (or None) and when
    the train phase ended (``time.perf_counter``)."""
    fed, dp = s.cfg.federated, s.cfg.privacy.enabled
    # the sites score the previous round's global model on val before they train (no
    # separate evaluate exchange); a DP site keeps its val curve to itself (an unaccounted
    # query otherwise)
    previous = history[-1] if history and history[-1]["round"] == rnd - 1 else None
    score_incoming = not dp and previous is not None and previous.get("val_dice") is None
    train_cfg = ConfigRecord({**base, M.CFG_EVAL_INCOMING: int(score_incoming)})
    train_ins = strategy.configure_train(rnd, arrays, train_cfg, grid)
    if fed.secure_aggregation:  # SecAgg+: the server sees only the sum of the updates
        new_arrays, _ = secure_train(grid, strategy, rnd, arrays, train_ins, fed, send=send)
    else:
        train_ins = list(train_ins)
        replies = send(grid, train_ins, timeout=fed.round_timeout)
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        strategy.last_train.failed.extend(
            _timed_out(train_ins, replies, fed.round_timeout, strategy.identity)
        )
    report = strategy.last_train
    t_train = time.perf_counter()
    if score_incoming and previous is not None:
        _set_val(previous, {k: v.get(M.VAL_DICE, math.nan) for k, v in report.sites.items()})
    _check_round(s, rnd, new_arrays, report)
    if rnd < fed.rounds or dp:
        return new_arrays, report, None, t_train  # val: from the next round's train replies
    request = ConfigRecord({**base, M.CFG_SPLIT: "val"})
    evaluate = strategy.configure_evaluate(rnd, new_arrays, request, grid)
    strategy.aggregate_evaluate(rnd, send(grid, evaluate, timeout=fed.round_timeout))
    val = {k: v.get(M.DICE, math.nan) for k, v in strategy.last_evaluate.items()}
    return new_arrays, report, val, t_train


def _check_round(s: ServerSettings, rnd: int, new_arrays: ArrayRecord | None, report: Any) -> None:
    """Log who declined or failed; stop (FederationError) when too few sites trained or the
    new global model is not finite: the last saved round stays the run's model."""
    fed, saved = s.cfg.federated, RunFolder(s.out_dir).federated_state
    for name in report.declined:
        log.warning(
            "round %d: site %s declined (its privacy budget, or the steps its noise was "
            "calibrated for, would be passed; the site's log says which)",
            rnd,
            name,
        )
    for reason in report.failed:
        log.warning("round %d: a site failed: %s", rnd, reason)
    if new_arrays is None or len(report.contributors) < fed.min_sites:
        raise FederationError(
            f"round {rnd}: only {len(report.contributors)} site(s) trained "
            f"({', '.join(report.contributors) or 'none'}), fewer than federated.min_sites = "
            f"{fed.min_sites}; declined: {', '.join(report.declined) or 'none'}; failed: "
            f"{len(report.failed)} ({'; '.join(report.failed) or 'none'}). Stopped after "
            f"round {rnd - 1}; the last global model is in {saved}"
        )
    if not _finite(new_arrays):  # never replace the global model by a non-finite one
        raise FederationError(
            f"round {rnd}: the aggregated global model is not finite (NaN or Inf); stopped "
            f"after round {rnd - 1}, whose model is in {saved}"
        )


def _round_entry(
    rnd: int,
    report: Any,
    known: dict[str, dict[str, Any]],
    weighted: bool,
    times: tuple[float, float],
) -> dict[str, Any]:
    """The round's history entry (what results.json's ``history`` holds); ``times``: when the
    round and its train phase began and ended (``time.perf_counter``)."""
    (t0, t_train), t_end = times, time.perf_counter()
    site_seconds = [v.get(M.SECONDS, math.nan) for v in report.sites.values()]
    eps = known["epsilon_sites"]
    return {
        "round": rnd,
        "train_loss": report.train_loss(weighted),
        "val_dice": None,
        "val_dice_sites": {},
        "epsilon_max": max(eps.values(), default=None),
        "epsilon_sites": dict(eps),
        "n_train_sites": {k: int(v) for k, v in known["n_train_sites"].items()},
        "sites": sorted(report.contributors),
        "declined": sorted(report.declined),
        "failed": len(report.failed),
        "seconds": t_end - t0,
        # where the round went: the train phase (send, site work, replies, aggregation), the
        # slowest site's own training steps (without its accounting), and the validation phase
        "train_seconds": t_train - t0,
        "site_train_seconds_max": max(site_seconds) if site_seconds else math.nan,
        "evaluate_seconds": t_end - t_train,
    }


def _finite(arrays: ArrayRecord) -> bool:
    return all(
        np.isfinite(a).all()
        for a in (np.asarray(v.numpy()) for v in arrays.values())
        if a.dtype.kind == "f"
    )


def _timed_out(
    sent: list[Message], replies: list[Message], timeout: float, identity: SiteIdentity
) -> list[str]:
    """One 'failed' entry per site that did not answer within the round's timeout."""
    answered = {m.metadata.reply_to_message_id for m in replies}  # errors included
    return [
        f"{identity.who(m.metadata.dst_node_id)}: no reply within federated.round_timeout = "
        f"{timeout:g} s"
        for m in sent
        if m.metadata.message_id not in answered
    ]
