"""The one-run audit of a training run: canary scores -> guesses -> epsilon lower bounds.

The guessing rule is fixed before any score is seen (:data:`GUESS_RULES`): each rule guesses
"in" for the top ``k+`` scores and "out" for the bottom ``k-`` (fractions of m), and every rule
is tested at significance 0.05 / len(GUESS_RULES) (Bonferroni), so reporting the best rule's
bound keeps the 95 % confidence. Rules with ``k- = 0`` catch a leak that shows in a few steps
only (a broken step reveals only the canaries sampled in it); the two-sided rule catches a leak
of the whole run. The ceiling is the largest bound these rules can show on m canaries (every
guess right): a bound far below it says little about the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from privseg.attack.audit import gaussian_epsilon
from privseg.privacy.audit_bounds import SIGNIFICANCE, one_run_epsilon, one_run_epsilon_fdp

#: (k+, k-) as fractions of m, chosen a priori; see the module docstring.
GUESS_RULES: tuple[tuple[float, float], ...] = ((0.05, 0.0), (0.1, 0.0), (0.2, 0.0), (0.4, 0.4))


def _counts(m: int, rule: tuple[float, float]) -> tuple[int, int]:
    return max(1, round(rule[0] * m)), round(rule[1] * m)


def guesses(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int) -> tuple[int, int]:
    """(r, v): guess "in" for the top ``k_plus`` scores, "out" for the bottom ``k_minus``."""
    order = np.argsort(-scores, kind="stable")
    right = int(included[order[:k_plus]].sum())
    if k_minus:
        right += int((~included[order[len(order) - k_minus :]]).sum())
    return k_plus + k_minus, right


def audit_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    delta: float,
    significance: float = SIGNIFICANCE,
    fdp: bool = True,
) -> dict[str, Any]:
    """The audit of one set of canary scores: every rule's guesses and bounds, the best bound
    (Steinke et al.; and the Gaussian f-DP one of Mahloujifar et al. with ``fdp``), and the
    ceiling, all at ``significance`` Bonferroni-corrected over :data:`GUESS_RULES`."""
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1 or len(s) < 2:
        raise ValueError(f"need one score per canary (>= 2), got {s.shape} and {inc.shape}")
    m = len(s)
    alpha = significance / len(GUESS_RULES)
    rules = []
    for rule in GUESS_RULES:
        k_plus, k_minus = _counts(m, rule)
        r, v = guesses(s, inc, k_plus, k_minus)
        rules.append(
            {
                "k_plus": k_plus,
                "k_minus": k_minus,
                "r": r,
                "v": v,
                "epsilon_lower": one_run_epsilon(m=m, r=r, v=v, delta=delta, significance=alpha),
                "epsilon_lower_fdp": (
                    one_run_epsilon_fdp(m=m, r=r, v=v, delta=delta, significance=alpha)
                    if fdp
                    else None
                ),
                "ceiling": one_run_epsilon(m=m, r=r, v=r, delta=delta, significance=alpha),
            }
        )
    best = max(rules, key=lambda x: x["epsilon_lower"])
    return {
        "m": m,
        "significance": significance,
        "rule": "Bonferroni over a priori (k+, k-) = fractions of m: "
        + ", ".join(f"({a:g}, {b:g})" for a, b in GUESS_RULES),
        "rules": rules,
        "k_plus": best["k_plus"],
        "k_minus": best["k_minus"],
        "r": best["r"],
        "v": best["v"],
        "epsilon_lower": best["epsilon_lower"],
        "epsilon_lower_fdp": max(x["epsilon_lower_fdp"] for x in rules) if fdp else None,
        "ceiling": max(x["ceiling"] for x in rules),
    }


def one_shot_estimate(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    delta: float,
    resamples: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Andrew et al. (ICLR 2024) one-shot estimate: the included and excluded canaries' scores
    read as two Gaussians of the excluded ones' spread, mu = (mean in - mean out) / sd out, and
    epsilon of mu-GDP at ``delta``; with a bootstrap 95 % interval. An *estimate* of the run's
    epsilon under that model, not a bound."""
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    if inc.sum() < 2 or (~inc).sum() < 2:
        raise ValueError("need at least two included and two excluded canaries")

    def eps(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
        sd = float(np.std(scores_out, ddof=1))
        mu = (float(np.mean(scores_in)) - float(np.mean(scores_out))) / sd if sd > 0 else np.inf
        return gaussian_epsilon(max(mu, 0.0), delta)

    s_in, s_out = s[inc], s[~inc]
    rng = np.random.default_rng(seed)
    boot = [
        eps(rng.choice(s_in, len(s_in)), rng.choice(s_out, len(s_out))) for _ in range(resamples)
    ]
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"epsilon": eps(s_in, s_out), "interval_95": [float(lo), float(hi)]}
