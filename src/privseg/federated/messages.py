"""What travels between the server and a site: record keys, config keys, metric keys.

A site's reply carries exactly three things: the model weights (an ``ArrayRecord`` holding the
packed weights, see :func:`pack`), scalar metrics (a ``MetricRecord`` whose keys are listed
below) and the site's public name (a ``ConfigRecord``, so the server can report per site).
Nothing else ever leaves a site: per-patient results stay in the site's own report file.

With ``federated.secure_aggregation`` the training reply carries no weights: it uses Flower's
legacy ``fitres.*`` layout (below), and Flower's ``secaggplus_mod`` replaces the site's update
by a masked, quantised vector that only means something once summed over the sites
(see :mod:`privseg.federated.secagg`). Metrics and the site name still travel in the clear.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from privseg.config.sections import MAX_CLASSES

# ---- record keys (FedAvg's defaults for arrays and config) ---------------------------------
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"  # ConfigRecord {"name": site name} in replies

# ---- Flower run config (the ServerApp's; `flwr run --run-config`) ----------------------------
RUN_OUT_DIR = "out-dir"  # the server's run folder
RUN_RESUME = "resume"
RUN_EXPECTED_SITES = "expected-sites"  # wait for this many sites before the first round
RUN_SITE_NODES = "site-nodes"  # node id -> site, from the key registrations (JSON)

# ---- Flower node config (a site's SuperNode, `--node-config`; simulation: the ClientApp's) ---
NODE_SITE = "site"
NODE_DATA_DIR = "data-dir"  # the site's slice cache
NODE_OUT_DIR = "out-dir"  # the site's folder (its report and last reply)
NODE_PRIVACY = "privacy-config"  # the site's privacy floor (site-privacy.toml)
NODE_SITES = "sites"  # simulation: every site, comma-separated, by partition id
NODE_PARTITION = "partition-id"  # set by Flower's simulation

# ---- config keys sent by the server (the first two also in the Flower run config) -----------
CFG_TOML = "privseg-config"  # the run's Config as TOML
CFG_RUN_ID = "run-id"
CFG_LOCAL_STEPS = "local-steps"
CFG_PLANNED_STEPS = "planned-steps"
CFG_ROUND = "server-round"  # set by Flower's strategies; we pass the absolute round
CFG_SPLIT = "split"  # evaluate: "val" or "test"
CFG_FINAL = "final"  # evaluate: 1 on the final test evaluation (the site writes its report)
# final evaluate: 1 = the server accepted none of this node's training replies in this run
CFG_REFUSED = "refused"
# train: 1 = first score the incoming global model (the previous round's) on the val split and
# send its Dice with the training metrics; saves a whole evaluate exchange per round
CFG_EVAL_INCOMING = "evaluate-incoming"
CFG_PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
CFG_LAYOUT = "array-layout"  # how the packed weights unpack (JSON, see state_layout)

# ---- the packed weights ---------------------------------------------------------------------
PACKED = "packed:floats"  # ArrayRecord key of all floating-point weights, one flat vector

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
# the val Dice of the incoming global model, sent with a train reply: computed on the site's val
# split WITHOUT privacy (for learning curves only; no model is selected on it)
VAL_DICE = "val_dice_nonprivate"
DICE_SD = "dice_sd"
HD95 = "hd95"
N_PATIENTS = "n_patients"
# mean test Dice of class k (data.classes order; the server knows the names from the config)
CLASS_DICE = tuple(f"dice_class_{k}" for k in range(MAX_CLASSES))
DELTA = "delta"
NOISE_MULTIPLIER = "noise_multiplier"
SAMPLE_RATE = "sample_rate"
MAX_GRAD_NORM = "max_grad_norm"
AGG_WEIGHT = "agg-weight"  # added by the server before averaging, never sent by a site
SECAGG_CLIPPED = "secagg_clipped"  # SecAgg+: update coordinates clipped to +-secagg_clip

TRAIN_KEYS = frozenset(
    {NUM_EXAMPLES, TRAIN_LOSS, STEPS, EPSILON, SECONDS, DECLINED, SECAGG_CLIPPED, VAL_DICE}
)
PRIVACY_SCALARS = (EPSILON, DELTA, NOISE_MULTIPLIER, SAMPLE_RATE, STEPS, MAX_GRAD_NORM)
EVAL_KEYS = frozenset(
    {NUM_EXAMPLES, DICE, DICE_SD, HD95, N_PATIENTS, *CLASS_DICE, *PRIVACY_SCALARS}
)
# In a DP run nothing unaccounted leaves a site: no raw loss (unclipped, un-noised), no timing
# (it reveals the Poisson batch sizes), no exact metric. The train reply carries the weights,
# the example count (the FedAvg weight: site sizes are public, an assumption the accounting
# shares), the site's epsilon (a function of the release list) and the decline flag (and with
# SecAgg+ the count of clipped update coordinates: a function of the DP-noised update, i.e.
# post-processing, so covered by the guarantee). The val curve stays at the site (its report).
# An evaluation reply carries the mean Dice per class and over classes only through the
# Gaussian mechanism, recorded on the evaluated patients (privacy.eval_noise; refused without
# it: NaN), the patient count and the DP parameters, plus the release list (SITE record) so
# results.json can be re-checked.
DP_TRAIN_KEYS = frozenset({NUM_EXAMPLES, EPSILON, DECLINED, SECAGG_CLIPPED})
DP_EVAL_KEYS = frozenset({NUM_EXAMPLES, DICE, N_PATIENTS, *CLASS_DICE, *PRIVACY_SCALARS})
RELEASES = "releases"  # in the SITE record of a DP site's final test reply: JSON list


def scalar(value: Any) -> float:
    """A metric value as a float (``None`` and non-numbers become NaN)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def round_id(config: Mapping[str, Any]) -> str:
    """A train round's id, ``RUN/ROUND``: the run's id and the round's absolute number."""
    return f"{config[CFG_RUN_ID]}/{int(config[CFG_ROUND])}"


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


# ---- packing: all floating-point weights as ONE array on the wire ------------------------------
# Flower 1.42 sends every Array of a message as its own object, i.e. its own request on every
# hop (each with TLS and node authentication): a 53-tensor state_dict took ~57 requests per
# message. So the weights travel as one flat vector (key ``PACKED``); the names and shapes to
# unpack it travel once per message in the config record (``CFG_LAYOUT``). FedAvg, FedProx and
# FedAdam work elementwise, so aggregating the packed vectors is aggregating the tensors.
# Entries that are not floating point (integer buffers; our models have none) travel unchanged
# as their own arrays, so they stay exact. The packed vector has the widest float dtype of the
# entries (float32 for our models; float64 after FedAdam's server step, as Flower's per-array
# FedAdam also yields) and unpacked entries keep that dtype.
def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, Array):
        return value.numpy()
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def state_layout(state: Mapping[str, Any]) -> str:
    """The layout of ``state`` for :func:`pack` / :func:`unpack` (a JSON string): per entry, in
    order, ``[name, shape]`` when it is packed (floating point), ``[name, null]`` otherwise."""
    if PACKED in state:
        raise ValueError(f"a state_dict key may not be {PACKED!r}")
    rows = []
    for key, value in state.items():
        arr = _numpy(value)
        rows.append([key, list(arr.shape) if np.issubdtype(arr.dtype, np.floating) else None])
    return json.dumps(rows, separators=(",", ":"))


@functools.lru_cache(maxsize=8)
def _parse(layout: str) -> tuple[tuple[str, tuple[int, ...] | None], ...]:
    return tuple((str(k), None if s is None else tuple(s)) for k, s in json.loads(layout))


def pack(state: Mapping[str, Any], layout: str | None) -> dict[str, np.ndarray]:
    """``state`` (torch tensors or numpy arrays) in wire form: the floating-point entries as
    one flat vector under ``PACKED``, the others unchanged; ``layout=None``: unpacked, as is.

    Raises ValueError when ``state`` does not match the layout (names, shapes, float entries).
    """
    arrays = {k: _numpy(v) for k, v in state.items()}
    if layout is None:
        return arrays
    rows = _parse(layout)
    if set(arrays) != {k for k, _ in rows} or len(arrays) != len(rows):
        raise ValueError(
            f"weights do not match the layout: missing {sorted({k for k, _ in rows} - set(arrays))}"
            f", unexpected {sorted(set(arrays) - {k for k, _ in rows})}"
        )
    floats, out = [], {}
    for key, shape in rows:
        arr = arrays[key]
        if shape is None:
            out[key] = arr
            continue
        if arr.shape != shape or not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(
                f"weight {key!r} is {arr.dtype} {list(arr.shape)}; the layout packs a float "
                f"array of shape {list(shape)}"
            )
        floats.append(arr)
    if floats:
        dtype = np.result_type(*floats)
        out[PACKED] = np.concatenate([a.astype(dtype, copy=False).ravel() for a in floats])
    return out


def unpack(arrays: Mapping[str, Any], layout: str | None) -> dict[str, np.ndarray]:
    """The named weights (numpy, in state_dict order) of wire-form ``arrays`` (an ArrayRecord or
    a dict of arrays); ``layout=None``: they are not packed. Raises ValueError on a mismatch."""
    named = {k: _numpy(v) for k, v in arrays.items()}
    if layout is None:
        return named
    rows = _parse(layout)
    flat = named.pop(PACKED, None)
    sizes = [math.prod(s) for _, s in rows if s is not None]
    expected = {k for k, s in rows if s is None}
    if set(named) != expected or (flat is None) != (not sizes):
        raise ValueError(f"packed weights do not match the layout: got keys {sorted(arrays)}")
    if flat is not None and (flat.ndim != 1 or flat.size != sum(sizes)):
        raise ValueError(f"packed weights: {flat.size} values for a layout of {sum(sizes)}")
    if flat is not None and not flat.flags.writeable:
        flat = flat.copy()
    out, offset = {}, 0
    for key, shape in rows:
        if shape is None:
            out[key] = named[key]
            continue
        size = math.prod(shape)
        out[key] = flat[offset : offset + size].reshape(shape)  # type: ignore[index]
        offset += size
    return out


def pack_record(state: Mapping[str, Any], layout: str | None) -> ArrayRecord:
    """:func:`pack` as an ArrayRecord (what a message carries)."""
    return array_record(pack(state, layout))


def unpack_torch(arrays: Mapping[str, Any], layout: str | None) -> dict[str, Any]:
    """:func:`unpack` as a torch state_dict."""
    import torch

    return {
        k: torch.from_numpy(np.asarray(v, order="C")) for k, v in unpack(arrays, layout).items()
    }


def layout_of(config: Mapping[str, Any]) -> str | None:
    """The layout a config record names (None: the weights are not packed)."""
    value = config.get(CFG_LAYOUT)
    return None if value is None else str(value)


def site_reply(
    site: str,
    metrics: Mapping[str, Any],
    allowed: frozenset[str],
    arrays: ArrayRecord | None,
    releases: list[dict[str, Any]] | None = None,
) -> RecordDict:
    """The content of a site's reply: weights (optional), scalar metrics, the site's name
    (and, on a DP site's final test reply, its release list)."""
    record: dict[str, Any] = {"name": site}
    if releases is not None:
        record[RELEASES] = json.dumps(releases)
    content: dict[str, Any] = {
        METRICS: metric_record(metrics, allowed),
        SITE: ConfigRecord(record),
    }
    if arrays is not None:
        content[ARRAYS] = arrays
    return RecordDict(content)


def reply_site(content: RecordDict) -> str:
    """The site name of a reply ("?" when absent)."""
    rec = content.config_records.get(SITE)
    return str(rec["name"]) if rec is not None and "name" in rec else "?"


def reply_releases(content: RecordDict) -> list[dict[str, Any]] | None:
    """The release list a DP site sent with its final test reply (None when absent)."""
    rec = content.config_records.get(SITE)
    if rec is None or RELEASES not in rec:
        return None
    return list(json.loads(str(rec[RELEASES])))


def reply_metrics(content: RecordDict) -> dict[str, float]:
    """The scalar metrics of a reply as a plain dict."""
    rec = content.metric_records.get(METRICS)
    return {k: float(v) for k, v in rec.items()} if rec is not None else {}  # type: ignore[arg-type]
