"""`privseg attack` and `privseg audit`: gradient inversion and the empirical privacy audit."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from privseg.cli.common import console, load_config, progress_bar, say, user_errors
from privseg.cli.options import DeviceOption, OverwriteOption, SetOption
from privseg.config.sections import AttackRound, MaskMode, Threat
from privseg.core.choices import OutputFormat
from privseg.report.format import fmt, fmt_bool, fmt_eps


def register(app: typer.Typer) -> None:
    app.command("attack")(attack)
    app.command("audit")(audit)


@user_errors
def attack(
    run_dir: Path = typer.Argument(..., help="A finished run folder (checkpoint, config)."),
    site: str = typer.Option(..., "--site", help="Site whose update is attacked."),
    threat: Threat | None = typer.Option(
        None, "--threat", help="What the attacker knows (README, threat models)."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Slices per update (1-32)."),
    iterations: int | None = typer.Option(None, "--iterations", help="Optimiser iterations."),
    restarts: int | None = typer.Option(None, "--restarts", help="Random restarts."),
    mask: MaskMode | None = typer.Option(
        None, "--mask", help="Where the attacker's labels come from."
    ),
    targets: int | None = typer.Option(None, "--targets", help="Attacked updates."),
    epsilon: float | None = typer.Option(None, "--epsilon", help="Attack DP-SGD at this epsilon."),
    round_: AttackRound | None = typer.Option(
        None, "--round", help="The global model the attacked update is computed on."
    ),
    overrides: list[str] | None = SetOption,
    output: OutputFormat = typer.Option("table", "--format", help="How to print the result."),
    overwrite: bool = OverwriteOption,
    device: str | None = DeviceOption,
) -> None:
    """Reconstruct a site's slices from its update (Inverting Gradients); write RUN/attack/."""
    overrides = [*(overrides or []), *([f"attack.round={round_}"] if round_ else [])]
    load_config(None, overrides)  # field and value rules before torch loads; the run's own
    # config gets the overrides in run_attack
    from privseg.runs.attack import run_attack

    with progress_bar(transient=True) as progress:
        res = run_attack(
            run_dir,
            site=site,
            threat=threat,
            batch_size=batch_size,
            iterations=iterations,
            restarts=restarts,
            mask=mask,
            targets=targets,
            epsilon=epsilon,
            overrides=overrides,
            progress=progress,
            overwrite=overwrite,
            device=device or "auto",
        )
    if output == "json":
        console.print_json(json.dumps({k: v for k, v in res.items() if k != "targets"}))
        return
    from privseg.attack.threat import ThreatModel

    tm = ThreatModel(
        **{
            k: v
            for k, v in res["threat_model"].items()
            if k in ThreatModel.__dataclass_fields__ and k != "sees"
        }
    )
    say(tm.describe(), label="threat model")
    say(str(res["weights"]), label="attacked global model")
    table = Table(
        title=f"gradient inversion, {res['threat']}, "
        + (
            f"DP ε={fmt_eps(res['epsilon'])}"
            if res["dp"] and res["epsilon"]
            else "DP"
            if res["dp"]
            else "no DP"
        )
    )
    for col in (
        "target",
        "PSNR",
        "PSNR body",
        "SSIM",
        "prior PSNR",
        "chance PSNR",
        "re-id",
        "match loss",
    ):
        table.add_column(col)
    for r in res["targets"]:
        table.add_row(
            str(r["target"] + r["batch"] * res["batch_size"]),
            fmt(r["psnr"], ".2f"),
            fmt(r["psnr_body"], ".2f"),
            fmt(r["ssim"], ".3f"),
            fmt(r["prior_psnr"], ".2f"),
            fmt(r["chance_psnr"], ".2f"),
            fmt_bool(r["reidentified"]),
            fmt(r["matching_loss"], ".4f"),
        )
    table.add_row(
        "median",
        fmt(res["psnr_median"], ".2f"),
        fmt(res["psnr_body_median"], ".2f"),
        fmt(res["ssim_median"], ".3f"),
        fmt(res["prior_psnr_median"], ".2f"),
        fmt(res["chance_psnr_median"], ".2f"),
        fmt(res["reidentification_rate"], ".0%"),
        fmt(res["matching_loss_median"], ".4f"),
    )
    console.print(table)
    from privseg.core.run_folder import ATTACK_JSON, ATTACK_PNG, RunFolder

    folder = RunFolder(run_dir).attack
    say(f"wrote {folder / ATTACK_JSON} and {ATTACK_PNG}")


@user_errors
def audit(
    run_dir: Path = typer.Argument(..., help="A finished run folder (checkpoint, config)."),
    site: str | None = typer.Option(None, "--site", help="Site whose DP mechanism is audited."),
    whole_run: bool = typer.Option(
        False, "--whole-run", help="Audit the run's own training from its canaries: audit_run.json."
    ),
    trials: int | None = typer.Option(None, "--trials", help="Games played."),
    candidates: int | None = typer.Option(None, "--candidates", help="K candidates per game."),
    epsilon: float | None = typer.Option(None, "--epsilon", help="Audit DP-SGD at this epsilon."),
    output: OutputFormat = typer.Option("table", "--format", help="How to print the result."),
    overwrite: bool = OverwriteOption,
) -> None:
    """Empirical K-way identification game against one DP-SGD release; write RUN/attack/.
    With --whole-run: the one-run audit of the training itself (exit code 1 if it fails)."""
    if whole_run:
        _audit_whole_run(run_dir, output)
        return
    if site is None:
        raise typer.BadParameter("--site is required (or --whole-run)", param_hint="--site")
    from privseg.runs.attack import run_audit

    res = run_audit(
        run_dir,
        site=site,
        trials=trials,
        candidates=candidates,
        epsilon=epsilon,
        overwrite=overwrite,
    )
    if output == "json":
        console.print_json(json.dumps(res))
        return
    say(f"{res['mechanism']}; adjacency {res['adjacency']}", label="game")
    table = Table(title=f"privacy audit, site {site}")
    for col in ("trials", "K", "success", "95% CI", "bound (ε,δ)", "bound GDP", "held"):
        table.add_column(col)
    lo, hi = res["ci"]
    table.add_row(
        str(res["trials"]),
        str(res["candidates"]),
        fmt(res["success_rate"]),
        f"[{fmt(lo)}, {fmt(hi)}]",
        fmt(res["bound"]),
        fmt(res["bound_gdp"]),
        fmt_bool(res["held"], "[green]yes[/]", "[red]NO[/]"),
    )
    console.print(table)
    from privseg.core.run_folder import AUDIT_JSON, RunFolder

    eps = "∞ (no DP)" if res["epsilon"] is None else fmt_eps(res["epsilon"])
    say(
        f"ε = {eps}, δ = {fmt(res['delta'], 'g')}, σ = {fmt(res['noise_multiplier'], '.4g')}, "
        f"C = {fmt(res['max_grad_norm'], 'g')}; wrote {RunFolder(run_dir).attack / AUDIT_JSON}"
    )


def _audit_whole_run(run_dir: Path, output: str) -> None:
    """Print the one-run audit (reported epsilon, lower bounds, ceiling); exit 1 on a failure."""
    from privseg.runs.audit_run import audit_whole_run

    res = audit_whole_run(run_dir)
    if output == "json":
        console.print_json(json.dumps(res))
    else:
        table = Table(title="one-run audit (95 % lower bounds on epsilon)")
        cols = (
            "trainer",
            "threat",
            "m",
            "reported ε",
            "bound",
            "bound f-DP",
            "ceiling",
            "estimate",
        )
        for col in cols:
            table.add_column(col)
        for t in res["trainers"]:
            for threat, a in t["threat_models"].items():
                bad = not a["passed"]
                table.add_row(
                    t["trainer"],
                    threat,
                    str(a["m"]),
                    fmt(t["claim"]["epsilon_run"], ".3g"),
                    f"[red]{a['epsilon_lower']:.2f}[/]" if bad else f"{a['epsilon_lower']:.2f}",
                    fmt(a["epsilon_lower_fdp"], ".2f"),
                    f"{a['ceiling']:.2f}",
                    f"{a['estimate']['epsilon']:.2f}",
                )
        console.print(table)
        console.print(
            f"{res['note']}; the estimate (Andrew et al.) is no bound; wrote "
            f"{run_dir}/audit_run.json"
        )
    if not res["passed"]:
        console.print(
            "[red]audit FAILED[/]: a lower bound exceeds the reported epsilon: the training "
            "leaked more than it accounted"
        )
        raise typer.Exit(1)
