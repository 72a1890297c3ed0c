"""`privseg attack` and `privseg audit`: gradient inversion and the empirical privacy audit."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from privseg.cli.common import DeviceOption, OverwriteOption, SetOption, console, user_errors
from privseg.report.format import fmt, fmt_bool, fmt_eps


def register(app: typer.Typer) -> None:
    app.command("attack")(attack)
    app.command("audit")(audit)


@user_errors
def attack(
    run_dir: Path = typer.Argument(..., help="A finished run folder (checkpoint, config)."),
    site: str = typer.Option(..., "--site", help="Site whose update is attacked."),
    threat: str | None = typer.Option(None, "--threat", help="T1 | T2 | T3"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Slices per update (1-32)."),
    iterations: int | None = typer.Option(None, "--iterations", help="Optimiser iterations."),
    restarts: int | None = typer.Option(None, "--restarts", help="Random restarts."),
    mask: str | None = typer.Option(None, "--mask", help="given | joint | predicted"),
    targets: int | None = typer.Option(None, "--targets", help="Attacked updates."),
    epsilon: float | None = typer.Option(None, "--epsilon", help="Attack DP-SGD at this epsilon."),
    round_: str | None = typer.Option(
        None, "--round", help="last | first: the global model the attacked update is computed on."
    ),
    overrides: list[str] | None = SetOption,
    output: str = typer.Option("table", "--format", help="table | json"),
    overwrite: bool = OverwriteOption,
    device: str | None = DeviceOption,
) -> None:
    """Reconstruct a site's slices from its update (Inverting Gradients); write RUN/attack/."""
    from privseg.cli.common import progress_bar
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
            overrides=[*(overrides or []), *([f"attack.round={round_}"] if round_ else [])],
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
    console.print(f"[bold]threat model[/] {tm.describe()}")
    console.print(f"[bold]attacked global model[/] {res['weights']}")
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
    from privseg.run_folder import ATTACK_JSON, ATTACK_PNG, RunFolder

    folder = RunFolder(run_dir).attack
    console.print(f"wrote {folder / ATTACK_JSON} and {ATTACK_PNG}")


@user_errors
def audit(
    run_dir: Path = typer.Argument(..., help="A finished run folder (checkpoint, config)."),
    site: str = typer.Option(..., "--site", help="Site whose DP mechanism is audited."),
    trials: int | None = typer.Option(None, "--trials", help="Games played."),
    candidates: int | None = typer.Option(None, "--candidates", help="K candidates per game."),
    epsilon: float | None = typer.Option(None, "--epsilon", help="Audit DP-SGD at this epsilon."),
    output: str = typer.Option("table", "--format", help="table | json"),
    overwrite: bool = OverwriteOption,
) -> None:
    """Empirical K-way identification game against one DP-SGD release; write RUN/attack/."""
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
    console.print(f"[bold]game[/] {res['mechanism']}; adjacency {res['adjacency']}")
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
    from privseg.run_folder import AUDIT_JSON, RunFolder

    eps = "∞ (no DP)" if res["epsilon"] is None else fmt_eps(res["epsilon"])
    console.print(
        f"ε = {eps}, δ = {fmt(res['delta'], 'g')}, σ = {fmt(res['noise_multiplier'], '.4g')}, "
        f"C = {fmt(res['max_grad_norm'], 'g')}; wrote {RunFolder(run_dir).attack / AUDIT_JSON}"
    )
