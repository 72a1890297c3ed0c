"""What a site answers when a server asks it to evaluate a model: which splits it may be asked
about, and, at a DP site, the noised and recorded answer (or a refusal)."""

from __future__ import annotations

import logging
import math
from typing import Any

from privseg.config import Config
from privseg.federated import messages as M

log = logging.getLogger(__name__)

EVALUATED = ("val", "test")
"""The splits a server may ask a site to evaluate on."""


def private_answer(
    cfg: Config, trainer: Any, result: dict[str, Any], split: str, run_id: str
) -> dict[str, Any]:
    """A DP site's metric scalars: noised and recorded on the split's patients, or NaN when
    refused (no ``privacy.eval_noise``, queries spent, or a run the site has not trained in:
    only the current run's global model is scored)."""
    from privseg.privacy.metric_release import release_metrics

    names = list(result.get("classes", {}))
    refused = {M.DICE: math.nan, **{k: math.nan for k, _ in zip(M.CLASS_DICE, names, strict=False)}}
    privacy = trainer.privacy
    if privacy is None or not privacy.trained:
        log.warning(
            "site %s refuses to evaluate for run %s: it has not trained in it", trainer.name, run_id
        )
        return refused
    answer = release_metrics(
        cfg.privacy,
        privacy.ledger,
        result,
        list(trainer.splits[split].contents),
        site=trainer.name,
        run_id=run_id,
        classes=names,
        unit=privacy.plan.unit,
    )
    if answer is None:
        return refused
    return {
        M.DICE: answer["dice"],
        **dict(zip(M.CLASS_DICE, (answer[c] for c in names), strict=False)),
    }


def record_exact_answer(cfg: Config, trainer: Any, split: str, run_id: str) -> None:
    """A site without DP answers exactly: a release without DP on the evaluated patients
    (epsilon infinite), recorded once per run and split before the answer leaves."""
    from privseg.privacy.engine import record_nonprivate
    from privseg.privacy.stores import open_store

    split_data = getattr(trainer, "splits", {}).get(split)
    patients = list(getattr(split_data, "contents", None) or [])
    if not patients:
        return
    ledger = open_store(cfg.privacy.ledger_dir, patients)
    note = f"exact {split} metrics sent to the server"
    if any(r["run_id"] == run_id and r["note"] == note for r in ledger.rows()):
        return
    record_nonprivate(
        cfg.privacy, ledger, {trainer.name: patients}, site=trainer.name, steps=1,
        run_id=run_id, note=note,
    )  # fmt: skip
