"""Every training reply is checked before it counts (fail closed: a doubtful reply is refused).

A reply counts only when its metrics are exactly the keys a site sends (``num-examples`` and
``declined`` present, no other key), ``num-examples`` is a positive integer no larger than the
site's registered training size, and its weights are finite floating-point arrays with the
model's exact names, shapes and dtypes (:class:`ModelSpec`) whose update (new - global weights)
stays within the norm bound (:func:`update_norm_bound`).

The registered size is what the site's first accepted reply said in this run (after a resume:
in the run's history); a later, larger count is refused. Under DP the count is **public**, not
noised: a site's training-set size is assumed to be no secret (it is also in results.json).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from privseg.config import FederatedConfig
from privseg.federated import messages as M


class Refused(ValueError):
    """Why one reply does not count (the caller names the site)."""


@dataclass(frozen=True)
class ModelSpec:
    """The model's wire form: per array key, its shape and dtype (see ``M.pack``)."""

    arrays: dict[str, tuple[tuple[int, ...], np.dtype]]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> ModelSpec:
        return cls({k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in arrays.items()})

    def cast(self, record: ArrayRecord) -> ArrayRecord:
        """Aggregated weights in the model's dtypes (FedAdam and the median compute in
        float64; the sites, and the next round's checks, expect the model's own)."""
        return M.array_record(
            {
                k: np.asarray(v.numpy()).astype(self.arrays[k][1], copy=False)
                for k, v in record.items()
            }
        )

    def check(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        """The reply's arrays, or Refused when they are not the model's."""
        got = {k: np.asarray(v.numpy()) for k, v in record.items()}
        if set(got) != set(self.arrays):
            raise Refused(
                f"its weights are not the model's: missing {sorted(set(self.arrays) - set(got))}, "
                f"unexpected {sorted(set(got) - set(self.arrays))}"
            )
        for key, (shape, dtype) in self.arrays.items():
            arr = got[key]
            if arr.shape != shape or arr.dtype != dtype:
                raise Refused(
                    f"its weights {key!r} are {arr.dtype} {list(arr.shape)}, the model's "
                    f"{dtype} {list(shape)}"
                )
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise Refused(
                    f"its weights hold {int((~np.isfinite(arr)).sum())} non-finite values"
                )
        return got


def check_metrics(content: RecordDict, *, dp: bool, train: bool = True) -> dict[str, float]:
    """The reply's metrics, or Refused when keys are missing or unexpected (``train``: a
    training reply; else an evaluation reply, whose keys are all optional)."""
    if train:
        allowed = M.DP_TRAIN_KEYS if dp else M.TRAIN_KEYS
    else:
        allowed = M.DP_EVAL_KEYS if dp else M.EVAL_KEYS
    try:
        metrics = M.reply_metrics(content)
    except (TypeError, ValueError) as exc:
        raise Refused(f"its metrics are not scalars ({exc})") from None
    missing = {M.NUM_EXAMPLES, M.DECLINED} - set(metrics) if train else set()
    extra = set(metrics) - allowed
    if missing or extra:
        why = [f"lack {sorted(missing)}"] * bool(missing) + [f"carry {sorted(extra)}"] * bool(extra)
        raise Refused(f"its metrics {' and '.join(why)} (allowed: {', '.join(sorted(allowed))})")
    if train and metrics[M.DECLINED] not in (0.0, 1.0):
        raise Refused(f"its {M.DECLINED!r} is {metrics[M.DECLINED]}, not 0 or 1")
    for key, value in metrics.items() if not train else ():  # a training reply: see strategy
        rule = _value_rule(key)
        if rule is not None and not (math.isnan(value) or rule[0](value)):
            raise Refused(f"its {key!r} is {value}, not {rule[1]}")
    return metrics


def _count(v: float) -> bool:
    return math.isfinite(v) and v >= 0 and v == int(v)


# What a value may be (NaN is always allowed: a refused or unknown answer). Training sizes
# have their own check (check_size); a DP site's epsilon may be infinite (its patients were
# released without DP before).
_RULES: dict[str, tuple] = {
    M.DICE: (lambda v: 0 <= v <= 1, "a Dice in [0, 1]"),
    M.DICE_SD: (lambda v: 0 <= v <= 1, "a Dice spread in [0, 1]"),
    M.HD95: (lambda v: v >= 0, "a distance >= 0 mm"),
    M.N_PATIENTS: (_count, "a count of patients"),
    M.EPSILON: (lambda v: v > 0, "an epsilon > 0"),
    M.DELTA: (lambda v: 0 < v < 1, "a delta in (0, 1)"),
    M.NOISE_MULTIPLIER: (lambda v: 0 <= v < math.inf, "a noise multiplier >= 0"),
    M.SAMPLE_RATE: (lambda v: 0 < v <= 1, "a sample rate in (0, 1]"),
    M.STEPS: (_count, "a count of steps"),
    M.MAX_GRAD_NORM: (lambda v: 0 < v < math.inf, "a clipping norm > 0"),
}


def _value_rule(key: str) -> tuple | None:
    if key in M.CLASS_DICE:
        return _RULES[M.DICE]
    return _RULES.get(key)


def check_releases(releases: object) -> list[dict[str, Any]]:
    """A DP site's release list as the ledger's rows would give it, or Refused: a malformed
    list must never reach results.json as the site's account of what it spent."""
    from privseg.privacy.history import RELEASE_KEYS, row_problem
    from privseg.privacy.ledger import KINDS, UNITS

    if not isinstance(releases, list):
        raise Refused("its release list is not a list")
    for k, release in enumerate(releases):
        if not isinstance(release, dict) or not set(RELEASE_KEYS) <= set(release):
            raise Refused(f"release {k} of its list lacks fields of {', '.join(RELEASE_KEYS)}")
        try:
            problem = row_problem({**release, "patients": "[]"}, kinds=KINDS, units=UNITS)
        except (KeyError, TypeError, ValueError) as exc:
            problem = ("a field", f"is malformed ({exc})")
        if problem is None and not all(
            isinstance(release[f], str) for f in ("run_id", "site", "time")
        ):
            problem = ("run_id, site, time", "must be text")
        if problem is not None:
            raise Refused(f"release {k} of its list: {problem[0]} {problem[1]}")
    return releases


def check_size(site: str, n: float, registered: dict[str, int], most: int) -> int:
    """``num-examples`` as an int; registers a site's first size, refuses a larger one (and
    any over ``most``, ``federated.max_examples``)."""
    if not (math.isfinite(n) and 1 <= n <= most and n == int(n)):
        raise Refused(
            f"its {M.NUM_EXAMPLES!r} is {n}, not a positive integer up to "
            f"federated.max_examples = {most}"
        )
    known = registered.get(site)
    if known is not None and n > known:
        raise Refused(f"its {M.NUM_EXAMPLES!r} {int(n)} is over its registered size {known}")
    registered.setdefault(site, int(n))
    return int(n)


def update_norm(new: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]) -> float:
    """The norm of ``new - start`` over the floating-point arrays."""
    total = 0.0
    for key, arr in new.items():
        if arr.dtype.kind == "f":
            total += float(np.sum((arr.astype(np.float64) - start[key]) ** 2))
    return math.sqrt(total)


def model_norm(state: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of a model's floating-point weights."""
    return math.sqrt(sum(float(np.sum(a**2)) for a in state.values() if a.dtype.kind == "f"))


def update_norm_bound(
    fed: FederatedConfig, start: Mapping[str, np.ndarray], first: float | None = None
) -> float:
    """The largest update norm a site may send: ``max_update_ratio`` x the global model's norm
    (no bound from it while that norm is 0), and ``max_update_norm`` when set. One site's
    update is bounded on its own, so the bound holds with 2 sites. With ``first`` (the norm of
    the run's first global model in this server process) the smaller of the two norms is
    used: a bound relative to the current model alone let a site grow it by a factor every
    round (a review measured 4.6e37 after 50 rounds with 2 sites)."""
    model = model_norm(start)
    if first is not None and first > 0:
        model = min(model, first)
    bounds = [fed.max_update_ratio * model] if model > 0 else []
    if fed.max_update_norm is not None:
        bounds.append(fed.max_update_norm)
    return min(bounds, default=math.inf)
