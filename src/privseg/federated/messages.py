"""What travels between the server and a site: record keys, config keys, metric keys.

A site's reply carries exactly three things: the model weights (an ``ArrayRecord`` whose keys
are the model's ``state_dict`` keys), scalar metrics (a ``MetricRecord`` whose keys are listed
below) and the site's public name (a ``ConfigRecord``, so the server can report per site).
Nothing else ever leaves a site: per-patient results stay in the site's own report file.

With ``federated.secure_aggregation`` the training reply carries no weights: it uses Flower's
legacy ``fitres.*`` layout (below), and Flower's ``secaggplus_mod`` replaces the site's update
by a masked, quantised vector that only means something once summed over the sites
(see :mod:`privseg.federated.secagg`). Metrics and the site name still travel in the clear.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

# ---- record keys (FedAvg's defaults for arrays and config) ---------------------------------
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"  # ConfigRecord {"name": site name} in replies

# ---- config keys sent by the server ---------------------------------------------------------
CFG_TOML = "privseg-config"  # the run's Config as TOML
CFG_RUN_ID = "run-id"
CFG_LOCAL_STEPS = "local-steps"
CFG_PLANNED_STEPS = "planned-steps"
CFG_ROUND = "server-round"  # set by Flower's strategies; we pass the absolute round
CFG_SPLIT = "split"  # evaluate: "val" or "test"
CFG_FINAL = "final"  # evaluate: 1 on the final test evaluation (the site writes its report)
CFG_PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx

# ---- SecAgg+ rounds: Flower's legacy FitIns / FitRes record names (flwr.compat recorddict_compat)
FITINS_ARRAYS = "fitins.parameters"  # the global weights, unnamed, in state_dict order
FITINS_CONFIG = "fitins.config"
FITRES_ARRAYS = "fitres.parameters"  # the site's update; secaggplus_mod masks it, then empties it
FITRES_WEIGHT = "fitres.num_examples"  # {"num_examples": the site's SecAgg+ weight}
FITRES_METRICS = "fitres.metrics"
FITRES_STATUS = "fitres.status"
CFG_ARRAY_KEYS = "array-keys"  # newline-joined state_dict keys of the unnamed legacy arrays

# ---- metric keys sent by a site ------------------------------------------------------------
NUM_EXAMPLES = "num-examples"  # training slices (the FedAvg weight)
TRAIN_LOSS = "train_loss"
STEPS = "steps"
EPSILON = "epsilon"  # cumulative over all rounds of this site, from its ledger
SECONDS = "seconds"
DECLINED = "declined"  # 1.0: the site refused the round (privacy budget exhausted)
DICE = "dice"
DICE_SD = "dice_sd"
HD95 = "hd95"
N_PATIENTS = "n_patients"
DELTA = "delta"
NOISE_MULTIPLIER = "noise_multiplier"
SAMPLE_RATE = "sample_rate"
CLIP_NORM = "clip_norm"
AGG_WEIGHT = "agg-weight"  # added by the server before averaging, never sent by a site
SECAGG_CLIPPED = "secagg_clipped"  # SecAgg+: update coordinates clipped to +-secagg_clip

TRAIN_KEYS = frozenset(
    {NUM_EXAMPLES, TRAIN_LOSS, STEPS, EPSILON, SECONDS, DECLINED, SECAGG_CLIPPED}
)
PRIVACY_SCALARS = (EPSILON, DELTA, NOISE_MULTIPLIER, SAMPLE_RATE, STEPS, CLIP_NORM)
EVAL_KEYS = frozenset({NUM_EXAMPLES, DICE, DICE_SD, HD95, N_PATIENTS, *PRIVACY_SCALARS})


def scalar(value: Any) -> float:
    """A metric value as a float (``None`` and non-numbers become NaN)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def metric_record(values: Mapping[str, Any], allowed: frozenset[str]) -> MetricRecord:
    """A MetricRecord of the allowed keys only, every value a float scalar."""
    unknown = set(values) - allowed
    if unknown:
        raise ValueError(f"metric keys {sorted(unknown)} may not leave a site")
    return MetricRecord({k: scalar(v) for k, v in values.items()})


def array_record(state: Mapping[str, Any]) -> ArrayRecord:
    """Weights (torch tensors or numpy arrays) as an ArrayRecord, keys unchanged."""
    out = {}
    for key, value in state.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        out[key] = Array(np.asarray(value, order="C"))
    return ArrayRecord(out)


def site_reply(
    site: str, metrics: Mapping[str, Any], allowed: frozenset[str], arrays: ArrayRecord | None
) -> RecordDict:
    """The content of a site's reply: weights (optional), scalar metrics, the site's name."""
    content: dict[str, Any] = {
        METRICS: metric_record(metrics, allowed),
        SITE: ConfigRecord({"name": site}),
    }
    if arrays is not None:
        content[ARRAYS] = arrays
    return RecordDict(content)


def reply_site(content: RecordDict) -> str:
    """The site name of a reply ("?" when absent)."""
    rec = content.config_records.get(SITE)
    return str(rec["name"]) if rec is not None and "name" in rec else "?"


def reply_metrics(content: RecordDict) -> dict[str, float]:
    """The scalar metrics of a reply as a plain dict."""
    rec = content.metric_records.get(METRICS)
    return {k: float(v) for k, v in rec.items()} if rec is not None else {}  # type: ignore[arg-type]
