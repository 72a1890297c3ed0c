"""The site side: a Flower ClientApp that only adapts messages to a :class:`SiteTrainer`.

The same handlers run in one-machine simulation (site chosen by the node's ``partition-id``)
and in deployment (site named in the SuperNode's ``--node-config``). The trainer is kept
between rounds in a module-level cache keyed by ``(run_id, site)``; the site's privacy ledger
file, not this cache, is the record of the privacy spent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tomllib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from privseg.config import Config
from privseg.core.errors import DataError, PrivacyBudgetExceeded, PrivsegError
from privseg.core.io import atomic_write_text, read_json, write_json
from privseg.core.plugins import STRATEGIES
from privseg.core.run_folder import RunFolder
from privseg.federated import messages as M
from privseg.federated import replay, secagg
from privseg.federated.answers import EVALUATED, private_answer, record_exact_answer
from privseg.federated.site_settings import SiteSettings, site_settings
from privseg.privacy.policy import apply_floor

log = logging.getLogger(__name__)


TrainerFactory = Callable[..., Any]
"""``factory(cfg, settings, *, planned_steps, run_id) -> SiteTrainer``."""


def default_trainer_factory(
    cfg: Config, settings: SiteSettings, *, planned_steps: int, run_id: str
) -> Any:
    """Build the real :class:`~privseg.training.trainer.SiteTrainer` of one site."""
    from privseg.training.trainer import build_site_trainer

    if not settings.data_dir.is_dir():
        raise DataError(f"site {settings.site!r}: data folder {settings.data_dir} does not exist")
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    return build_site_trainer(
        cfg,
        settings.data_dir,
        settings.site,
        planned_steps=planned_steps,
        run_id=run_id,
    )


_TRAINERS: dict[tuple[str, str], tuple[str, Any]] = {}


def get_trainer(
    config: Mapping[str, Any], settings: SiteSettings, factory: TrainerFactory
) -> tuple[Config, Any]:
    """The site's trainer for this run, built once and reused across rounds."""
    toml = str(config[M.CFG_TOML])
    run_id = str(config[M.CFG_RUN_ID])
    key = (run_id, settings.site)
    cached = _TRAINERS.get(key)
    cfg = Config.from_dict(tomllib.loads(toml))
    if settings.privacy_config is not None:
        own = Config.load(settings.privacy_config)  # the site's floor and its device
        privacy, changed = apply_floor(cfg.privacy, own.privacy)
        if changed and cached is None:
            log.warning(
                "site %s applies its privacy floor (%s) to the server's request: %s",
                settings.site,
                settings.privacy_config,
                "; ".join(changed),
            )
        # the site's hardware is its own business: it trains on its own train.device
        train = dataclasses.replace(cfg.train, device=own.train.device)
        cfg = dataclasses.replace(cfg, privacy=privacy, train=train)
    if cached is None or cached[0] != toml:
        trainer = factory(
            cfg, settings, planned_steps=int(config[M.CFG_PLANNED_STEPS]), run_id=run_id
        )
        _TRAINERS[key] = (toml, trainer)
    return cfg, _TRAINERS[key][1]


def release_trainers(run_id: str | None = None) -> None:
    """Forget the trainers of ``run_id`` (None: all) held in this process: their models,
    device memory and ledger handles (a simulation run in this process is over)."""
    for key in [k for k in _TRAINERS if run_id is None or k[0] == run_id]:
        del _TRAINERS[key]


# ---- the site's work, independent of Flower (also run by the deployment worker) -------------
def site_train(
    config: Mapping[str, Any],
    state: dict[str, Any],
    settings: SiteSettings,
    factory: TrainerFactory = default_trainer_factory,
) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """Train from the global weights; ``(None, metrics)`` when the site declines the round.

    With ``evaluate-incoming`` set, the incoming global model (the previous round's result) is
    first scored on the val split and its Dice sent along (scalar only, like an evaluate
    reply), so a round needs one exchange with the server instead of two.

    A request the site already answered (a resumed server redoing the round it lost) gets the
    stored reply again, untrained (:mod:`privseg.federated.replay`).
    """
    kept = RunFolder(settings.out_dir).site_reply(settings.site)
    digest = replay.request_digest(config, state)
    stored = replay.stored_reply(kept, config, digest)
    if stored is not None:
        return stored
    cfg, trainer = get_trainer(config, settings, factory)
    incoming: dict[str, float] = {}
    if cfg.privacy.enabled and trainer.privacy is not None and trainer.privacy.trained:
        # a DP site keeps its own val curve (its report); the server never gets it exactly
        dice = trainer.evaluate(state, "val").get("dice")
        trainer.local_val.append({"round": int(config.get(M.CFG_ROUND, 0)), "dice": dice})
    elif int(config.get(M.CFG_EVAL_INCOMING, 0)):
        record_exact_answer(cfg, trainer, "val", str(config[M.CFG_RUN_ID]))
        incoming[M.VAL_DICE] = M.scalar(trainer.evaluate(state, "val").get("dice"))
    proximal = STRATEGIES.info(cfg.federated.strategy).get("proximal")
    global_state = state if proximal else None
    try:
        new_state, metrics = trainer.fit(
            state,
            int(config[M.CFG_LOCAL_STEPS]),
            run_id=str(config[M.CFG_RUN_ID]),
            global_state=global_state,
        )
    except PrivacyBudgetExceeded as exc:
        log.warning("site %s declines round %s: %s", settings.site, config.get(M.CFG_ROUND), exc)
        summary = trainer.privacy_summary() or {}
        metrics = {M.DECLINED: 1.0, M.EPSILON: summary.get("epsilon", math.nan), M.STEPS: 0.0}
        return None, _train_metrics(cfg, trainer, metrics, incoming)
    if set(new_state) != set(state):
        raise RuntimeError(f"site {settings.site!r}: trainer returned other weights than it got")
    reply = new_state, _train_metrics(cfg, trainer, {**metrics, M.DECLINED: 0.0}, incoming)
    replay.keep_reply(kept, config, digest, reply)  # before it is sent
    return reply


def _train_metrics(
    cfg: Config, trainer: Any, metrics: Mapping[str, float], incoming: dict[str, float]
) -> dict[str, float]:
    """What a train reply carries: in a DP run only :data:`M.DP_TRAIN_KEYS`."""
    out = {
        M.TRAIN_LOSS: metrics.get("train_loss", math.nan),
        M.NUM_EXAMPLES: trainer.num_examples,
        M.STEPS: metrics.get("steps", metrics.get(M.STEPS, 0.0)),
        M.EPSILON: metrics.get("epsilon", metrics.get(M.EPSILON, math.nan)),
        M.SECONDS: metrics.get("seconds", 0.0),
        M.DECLINED: metrics[M.DECLINED],
        **incoming,
    }
    if cfg.privacy.enabled:
        return {k: v for k, v in out.items() if k in M.DP_TRAIN_KEYS}
    return out


def site_evaluate(
    config: Mapping[str, Any],
    state: dict[str, Any],
    settings: SiteSettings,
    factory: TrainerFactory = default_trainer_factory,
) -> dict[str, float]:
    """Dice of the global weights on a local split (scalars only).

    On the final test evaluation the site also writes its full report (per-patient results,
    privacy summary) to its own folder; that file stays at the site.
    """
    cfg, trainer = get_trainer(config, settings, factory)
    split = str(config.get(M.CFG_SPLIT, "val"))
    if split not in EVALUATED:
        raise DataError(
            f"site {settings.site!r} refuses to evaluate on split {split!r}: a server may ask "
            f"for {' or '.join(EVALUATED)} only (never the training patients)"
        )
    result = trainer.evaluate(state, split)
    out: dict[str, Any] = {
        M.DICE: result.get("dice"),
        M.DICE_SD: result.get("dice_sd"),
        M.HD95: result.get("hd95"),
        M.N_PATIENTS: result.get("n_patients", len(result.get("patients", []))),
    }
    for key, metrics in zip(M.CLASS_DICE, result.get("classes", {}).values(), strict=False):
        out[key] = metrics.get("dice")
    out[M.NUM_EXAMPLES] = out[M.N_PATIENTS]
    if cfg.privacy.enabled:
        out.update(private_answer(cfg, trainer, result, split, str(config[M.CFG_RUN_ID])))
    else:
        record_exact_answer(cfg, trainer, split, str(config[M.CFG_RUN_ID]))
    if int(config.get(M.CFG_FINAL, 0)):
        privacy = trainer.privacy_summary()
        for key in M.PRIVACY_SCALARS:
            out[key] = (privacy or {}).get(key, math.nan)
        write_json(
            settings.report,
            {
                "site": settings.site,
                "split": split,
                "n_train": trainer.num_examples,
                "run_id": str(config[M.CFG_RUN_ID]),
                "test": result,
                "val_curve": trainer.local_val,
                "privacy": privacy,  # after the answer's own release
            },
        )
    if cfg.privacy.enabled:
        out = {k: v for k, v in out.items() if k in M.DP_EVAL_KEYS}
    return {k: M.scalar(v) for k, v in out.items()}


def site_releases(
    config: Mapping[str, Any], settings: SiteSettings, factory: TrainerFactory
) -> list[dict[str, Any]] | None:
    """A DP site's release list, sent with its final test reply (None otherwise)."""
    _, trainer = get_trainer(config, settings, factory)
    if not int(config.get(M.CFG_FINAL, 0)):
        return None
    summary = trainer.privacy_summary()
    return None if summary is None else list(summary.get("releases", []))


# ---- message adapters -----------------------------------------------------------------------
def handle_train(
    msg: Message, settings: SiteSettings, factory: TrainerFactory = default_trainer_factory
) -> Message:
    """Train from the global weights; reply with new weights and scalar metrics only."""
    if secagg.is_secure_fit(msg):
        return handle_secure_train(msg, settings, factory)
    config = dict(msg.content[M.CONFIG])
    layout = M.layout_of(config)
    state = M.unpack_torch(msg.content[M.ARRAYS], layout)
    new_state, metrics = site_train(config, state, settings, factory)
    arrays = None if new_state is None else M.pack_record(new_state, layout)
    return Message(M.site_reply(settings.site, metrics, M.TRAIN_KEYS, arrays), reply_to=msg)


def handle_secure_train(
    msg: Message, settings: SiteSettings, factory: TrainerFactory = default_trainer_factory
) -> Message:
    """SecAgg+'s fit request: train as usual; reply with the clipped update and the weight,
    which Flower's ``secaggplus_mod`` (wrapped around this handler) masks before it leaves.

    A site that declines the round takes part with a zero update and weight 0.
    """
    config, global_state = secagg.fit_request(msg)
    state = M.unpack_torch({k: v.copy() for k, v in global_state.items()}, None)  # named
    new_state, metrics = site_train(config, state, settings, factory)
    fed = Config.from_dict(tomllib.loads(str(config[M.CFG_TOML]))).federated
    n = int(metrics[M.NUM_EXAMPLES])
    if fed.weighted and n > fed.max_examples:
        raise DataError(
            f"site {settings.site!r} has {n} training slices, more than "
            f"federated.max_examples = {fed.max_examples}; raise it"
        )
    weight = 0 if new_state is None else (n if fed.weighted else 1)
    update, clipped = secagg.site_update(global_state, new_state, fed.secagg_clip)
    metrics = {**metrics, M.SECAGG_CLIPPED: float(clipped)}
    content = M.site_reply(settings.site, metrics, M.TRAIN_KEYS, None)
    return Message(secagg.fit_reply(content, update, weight), reply_to=msg)


def handle_evaluate(
    msg: Message, settings: SiteSettings, factory: TrainerFactory = default_trainer_factory
) -> Message:
    """Evaluate the global weights at the site; reply with scalar metrics only.

    The final test answer is kept and replayed when the same request comes again (a server
    that died before it kept the answers): a second answer would be a second release."""
    config = dict(msg.content[M.CONFIG])
    if int(config.get(M.CFG_REFUSED, 0)):  # before the report, which `privseg site` waits for
        log.error("site %s: the server refused every training reply of this site", settings.site)
        atomic_write_text(settings.refused, f"{config[M.CFG_RUN_ID]}\n")
    state = M.unpack_torch(msg.content[M.ARRAYS], M.layout_of(config))
    final = bool(int(config.get(M.CFG_FINAL, 0)))
    kept = RunFolder(settings.out_dir).site_answer(settings.site)
    digest = replay.request_digest(config, state) if final else ""  # only the final is kept
    answer = replay.stored_answer(kept, config, digest) if final else None
    if answer is None:
        answer = (
            site_evaluate(config, state, settings, factory),
            site_releases(config, settings, factory),
        )
        if final:
            replay.keep_answer(kept, config, digest, answer)  # before it is sent
    metrics, releases = answer
    return Message(M.site_reply(settings.site, metrics, M.EVAL_KEYS, None, releases), reply_to=msg)


def handle_done(msg: Message, settings: SiteSettings) -> Message:
    """The server kept every final answer of run R: the site may leave, once its own report
    is R's (``privseg site`` waits for this; a server cannot end it with an older report)."""
    run_id = str(dict(msg.content[M.CONFIG])[M.CFG_RUN_ID])
    with contextlib.suppress(OSError, ValueError, TypeError):
        if read_json(settings.report).get("run_id") == run_id:
            atomic_write_text(settings.done, f"{run_id}\n")
    return Message(M.site_reply(settings.site, {}, M.EVAL_KEYS, None), reply_to=msg)


@contextlib.contextmanager
def named(site: str) -> Iterator[None]:
    """A site's error, as the server will log it, names the site (never only a node id)."""
    try:
        yield
    except PrivsegError as exc:
        if str(exc).startswith("site "):
            raise
        raise type(exc)(f"site {site!r}: {exc}") from exc


def make_client_app(
    defaults: Mapping[str, Any] | None = None, trainer_factory: TrainerFactory | None = None
) -> ClientApp:
    """A ClientApp; ``defaults`` fill node-config keys (simulation passes the site list).

    The same app serves plain and SecAgg+ rounds: ``secagg_mod`` runs Flower's SecAgg+
    protocol for SecAgg+ messages and passes every other message through.
    """
    defaults = dict(defaults or {})
    factory = trainer_factory or default_trainer_factory
    app = ClientApp(mods=[secagg.secagg_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        settings = site_settings(context.node_config, defaults)
        with named(settings.site):
            return handle_train(msg, settings, factory)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        settings = site_settings(context.node_config, defaults)
        with named(settings.site):
            return handle_evaluate(msg, settings, factory)

    @app.query()
    def done(msg: Message, context: Context) -> Message:
        settings = site_settings(context.node_config, defaults)
        with named(settings.site):
            return handle_done(msg, settings)

    return app


app = make_client_app()
