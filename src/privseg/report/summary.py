"""The report's plain-language summary: one paragraph, every sentence derived from the numbers.

Each claim is conditioned on the numbers it reports, so the summary never says more than the
study shows (e.g. it does not credit DP with stopping an attack that fails without DP too).
"""

from __future__ import annotations

from typing import Any

from privseg.core.results import CENTRAL, FEDERATED, LOCAL
from privseg.report.format import fmt, fmt_eps, fmt_pm, is_num
from privseg.report.study_view import (
    DID_NOT_LEARN_DICE,
    baseline_for,
    federated_beats_local_cross_site,
    learned,
    not_learned_label,
    run_epsilon,
    run_label,
    sorted_runs,
    time_per_unit,
)

RECONSTRUCTION_MARGIN_DB = 3.0
"""An attack counts as reconstructing when its median PSNR beats the better of the two
baselines (prior-only and a random other slice) by at least this many dB."""


def attack_reconstructs(attack: dict[str, Any]) -> bool | None:
    """True when median PSNR beats the best baseline by the margin; None when unknown."""
    psnr = attack.get("psnr_median")
    baselines = [attack.get(k) for k in ("prior_psnr_median", "chance_psnr_median")]
    baselines = [b for b in baselines if is_num(b)]
    if not is_num(psnr) or not baselines:
        return None
    return psnr - max(baselines) >= RECONSTRUCTION_MARGIN_DB


def _best_baseline(attack: dict[str, Any]) -> float | None:
    vals = [attack.get(k) for k in ("prior_psnr_median", "chance_psnr_median")]
    vals = [v for v in vals if is_num(v)]
    return max(vals) if vals else None


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _eps_phrase(eps: float | None) -> str:
    return f"ε = {fmt_eps(eps)}" if eps is not None else "unknown ε"


def is_quick(study: dict[str, Any]) -> bool:
    """A smoke test (``privseg run --quick``), whose numbers are no results."""
    return bool(study.get("quick")) or study.get("preset") == "quick"


def smoke_test_note(study: dict[str, Any]) -> str:
    """The warning at the top of a quick run's report."""
    cfg = study.get("config") or {}
    tiny = [
        f"{k} {v}"
        for k, v in (
            ("resolution", (cfg.get("data") or {}).get("resolution")),
            ("epochs", (cfg.get("train") or {}).get("epochs")),
            ("rounds", (cfg.get("federated") or {}).get("rounds")),
        )
        if v is not None
    ]
    size = f" ({', '.join(tiny)})" if tiny else ""
    return (
        f'Smoke test: this is "privseg run --quick", a tiny grid{size} that checks every '
        "part runs end to end. Its numbers are not results, and this report compares none "
        'of them. Run "privseg run" without --quick for a study.'
    )


def summarise(study: dict[str, Any]) -> str:
    """One paragraph of findings; each statement is conditioned on the numbers it reports.

    A smoke test gets what ran and nothing compared; a setting that did not learn (mean test
    Dice below :data:`DID_NOT_LEARN_DICE`) is named as such and left out of every comparison.
    """
    runs = [r for r in study.get("runs") or [] if isinstance(r, dict)]
    if is_quick(study):
        return " ".join(
            p for p in (_smoke_summary(study, runs), _total_privacy_sentence(study)) if p
        )
    comparable = [r for r in runs if learned(r) is not False]
    parts = _not_learned_sentences(runs)
    if comparable or not runs:
        failed_dp = any(r.get("dp") and learned(r) is False for r in runs)
        parts = (
            _utility_sentences(comparable) + _dp_sentences(comparable, failed_dp=failed_dp) + parts
        )
    parts.append(_attack_sentence(study.get("attack") or []))
    parts.append(_audit_sentence(study.get("audit") or []))
    parts.append(_total_privacy_sentence(study))
    return " ".join(p for p in parts if p)


def _total_privacy_sentence(study: dict[str, Any]) -> str:
    """What each site's data spent over the whole study (its DP settings compose)."""
    spent = [s for s in (study.get("privacy") or {}).get("spent") or [] if isinstance(s, dict)]
    if not spent:
        return ""
    rows = [f"{s.get('name')} {_eps_phrase(s.get('epsilon'))}" for s in spent]
    first = spent[0]
    return (
        "Every DP setting trained on the same patients, so their releases compose: over the "
        f"whole study (and any earlier run on this data) each site's data spent {_join(rows)} "
        f"(δ = {fmt(first.get('delta'), '.0e')}, {first.get('accountant')}, {first.get('unit')} "
        "unit; recomputed from its ledger, every release listed in results.json)."
    )


def _not_learned_sentences(runs: list[dict[str, Any]]) -> list[str]:
    failed = [r for r in sorted_runs(runs) if learned(r) is False]
    if not failed:
        return []
    dice = _join([f"{run_label(r)} {fmt(r['dice_mean'])}" for r in failed])
    if len(failed) == len(runs):
        return [
            f"No setting learned (mean test Dice {dice}; all below {DID_NOT_LEARN_DICE:g}), "
            "so nothing is compared."
        ]
    verb = "does" if len(failed) == 1 else "do"
    return [
        f"Did not learn (mean test Dice below {DID_NOT_LEARN_DICE:g}): {dice}; "
        f"{'this setting' if len(failed) == 1 else 'these settings'} {verb} not enter any "
        "comparison."
    ]


def _smoke_summary(study: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """What a smoke test ran, with no comparison and no verdict on privacy."""
    parts = [
        "Smoke test: every setting below ran end to end on a tiny grid; the numbers only "
        "show that the pipeline works and are not compared."
    ]
    if runs:
        parts.append(
            "Settings run (mean test Dice): "
            + _join(
                [f"{not_learned_label(r)} {fmt(r.get('dice_mean'))}" for r in sorted_runs(runs)]
            )
            + "."
        )
    attacks, audits = study.get("attack") or [], study.get("audit") or []
    if attacks or audits:
        parts.append(
            f"The gradient-inversion attack ran in {len(attacks)} setting(s) and the empirical "
            f"audit in {len(audits)}; their results are in the tables, without verdict."
        )
    return " ".join(parts)


def _utility_sentences(runs: list[dict[str, Any]]) -> list[str]:
    """The best non-private Dice, and whether federation beat sites training alone."""
    plain = [r for r in runs if not r.get("dp") and is_num(r.get("dice_mean"))]
    if not plain:
        if runs:
            return ["No non-private run has a test Dice."]
        return ["This study contains no training runs."]
    best = max(plain, key=lambda r: r["dice_mean"])
    parts = [
        f"The best non-private model was {run_label(best)} with a test Dice of "
        f"{fmt_pm(best['dice_mean'], best.get('dice_sd'))} (mean ± sd over patient "
        "volumes)."
    ]
    local = next((r for r in plain if r.get("mode") == LOCAL), None)
    fed = next((r for r in plain if r.get("mode") == FEDERATED), None)
    if local and fed:
        verb = "above" if fed["dice_mean"] > local["dice_mean"] else "not above"
        parts.append(
            f"Federated training ({fmt(fed['dice_mean'])}) was {verb} sites "
            f"training alone ({fmt(local['dice_mean'])}, each on its own test split)"
        )
        beats = federated_beats_local_cross_site(runs)
        if beats is not None:
            parts[-1] += (
                "; on each site's test split it was "
                + ("above" if beats else "not above")
                + " every other site's local-only model."
            )
        else:
            parts[-1] += "."
    central = next((r for r in plain if r.get("mode") == CENTRAL), None)
    if central and fed:
        gap = fed["dice_mean"] - central["dice_mean"]
        parts.append(
            f"Federated training was {fmt(abs(gap))} Dice {'above' if gap > 0 else 'below'} "
            f"centralised training ({fmt(central['dice_mean'])})."
        )
    return parts


def _dp_sentences(runs: list[dict[str, Any]], *, failed_dp: bool = False) -> list[str]:
    """DP Dice per spent ε, its cost against the non-private baseline, and the time ratio."""
    dp_runs = [r for r in sorted_runs(runs) if r.get("dp") and is_num(r.get("dice_mean"))]
    if not dp_runs:
        if runs:
            return (
                []
                if failed_dp
                else ["No DP run is in this study, so the cost of privacy is not measured."]
            )
        return []
    deltas = {
        s.get("delta") for r in dp_runs for s in r.get("sites") or [] if is_num(s.get("delta"))
    }
    delta = f"; δ = {fmt(deltas.pop(), '.0e')}" if len(deltas) == 1 else ""
    return [
        "With DP-SGD, test Dice was "
        + _join([f"{fmt(r['dice_mean'])} at {_eps_phrase(run_epsilon(r))}" for r in dp_runs])
        + f" (ε spent by the worst site{delta}).",
        _dp_dice_cost_sentence(dp_runs, runs),
        _dp_time_sentence(dp_runs, runs),
    ]


def _dp_dice_cost_sentence(dp_runs: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    cost = []
    for r in dp_runs:
        base = baseline_for(r, runs)
        if base and is_num(base.get("dice_mean")):
            d = (base["dice_mean"] - r["dice_mean"]) * 100
            cost.append(
                (
                    base,
                    f"{abs(d):.1f} points {'lower' if d >= 0 else 'higher'} at "
                    f"{_eps_phrase(run_epsilon(r))}",
                )
            )
    if not cost:
        return ""
    base = cost[0][0]
    return (
        f"Against non-private {run_label(base)} training "
        f"({fmt(base['dice_mean'])}), Dice was "
        f"{_join([c[1] for c in cost])}."
    )


def _dp_time_sentence(dp_runs: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    ratios = []
    for r in dp_runs:
        base = baseline_for(r, runs)
        sec, unit = time_per_unit(r)
        base_sec = time_per_unit(base)[0] if base else None
        if is_num(sec) and is_num(base_sec) and base_sec > 0:
            ratios.append((sec / base_sec, unit))
    if not ratios:
        return ""
    lo, hi = min(x[0] for x in ratios), max(x[0] for x in ratios)
    span = f"{lo:.1f}×" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}–{hi:.1f}×"
    return f"A DP {ratios[0][1]} took {span} as long as a non-private one."


def _attack_sentence(attacks: list[dict[str, Any]]) -> str:
    if not attacks:
        return "No gradient-inversion attack was run."
    plain = [a for a in attacks if not a.get("dp")]
    priv = [a for a in attacks if a.get("dp")]

    def psnr(a: dict[str, Any]) -> str:
        return (
            f"median PSNR {fmt(a.get('psnr_median'), '.1f')} dB vs "
            f"{fmt(_best_baseline(a), '.1f')} dB for the best baseline"
        )

    out = []
    plain_ok = [attack_reconstructs(a) for a in plain]
    if plain:
        a = plain[0]
        if any(plain_ok):
            out.append(
                f"The gradient-inversion attack reconstructed training slices from "
                f"non-private updates ({psnr(a)})."
            )
        elif all(v is False for v in plain_ok):
            out.append(
                f"The gradient-inversion attack did not reconstruct training slices "
                f"beyond the baselines even without DP ({psnr(a)}), so this study cannot "
                "show that DP is what prevents reconstruction."
            )
        else:
            out.append("The attack on non-private updates has no PSNR or baseline to judge it.")
    if priv:
        verdicts = [(a, attack_reconstructs(a)) for a in priv]
        broke = [a for a, v in verdicts if v]
        held = [a for a, v in verdicts if v is False]
        if broke:
            out.append(
                "It also reconstructed slices from DP updates at "
                + _join([_eps_phrase(a.get("epsilon")) for a in broke])
                + f" ({psnr(broke[0])}): DP at this budget did not prevent "
                "reconstruction."
            )
        if held:
            lead = (
                "With DP it failed"
                if any(plain_ok) and not broke
                else "It did not reconstruct slices from DP updates"
            )
            out.append(
                f"{lead} at "
                + _join([_eps_phrase(a.get("epsilon")) for a in held])
                + f" ({psnr(held[0])})."
            )
        if not broke and not held:
            out.append("The attack on DP updates has no PSNR or baseline to judge it.")
    elif plain:
        out.append("No attack on DP updates was run.")
    return " ".join(out)


def _audit_sentence(audits: list[dict[str, Any]]) -> str:
    if not audits:
        return "No empirical privacy audit was run."
    judged = [a for a in audits if a.get("held") is not None]
    failed = [a for a in judged if not a.get("held")]

    def detail(a: dict[str, Any], rel: str) -> str:
        return (
            f"membership success rate {fmt(a.get('success_rate'), '.4g')} {rel} the bound "
            f"{fmt(a.get('bound'), '.4g')} that {_eps_phrase(a.get('epsilon'))} allows"
        )

    if failed:
        return (
            f"The empirical audit FAILED in {len(failed)} of {len(judged)} test(s) "
            f"({detail(failed[0], 'above')}), so the claimed guarantee is in doubt."
        )
    if len(judged) == 1:
        return f"The empirical audit held ({detail(judged[0], 'at or below')})."
    if judged:
        return (
            f"The empirical audit held in all {len(judged)} tests (membership success "
            "rate at or below the bound implied by ε)."
        )
    return (
        "The empirical audit does not apply: the reported ε does not cover the audited "
        "release (no DP, or a release whose own ε is larger)."
    )
