"""`privseg server`, `privseg site`, `privseg certs`: a real multi-site federation on Flower."""

from __future__ import annotations

from pathlib import Path

import typer

from privseg.cli.common import load_config, say, user_errors
from privseg.cli.options import ConfigOption, DeviceOption, SetOption
from privseg.report.format import fmt, fmt_eps

INSECURE_HELP = "No TLS and no site authentication: for tests on one machine only."
INSECURE_WARNING = "--insecure: no TLS, no site authentication; never use this across a network"


@user_errors
def server(
    out: Path = typer.Option(..., "--out", "-o", help="Run folder to write."),
    port: int = typer.Option(9092, "--port", "-p", help="Port of the SuperLink (one for all)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    certs: Path | None = typer.Option(None, "--certs", help="Folder made by `privseg certs`."),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue after the last round done."),
    config: Path | None = ConfigOption,
    set_: list[str] | None = SetOption,
) -> None:
    """Start the SuperLink, submit the federated run, wait for the sites, write OUT."""
    cfg = load_config(config, set_)
    from privseg.federated.deployment import serve  # Flower loads only for a valid config

    if insecure:
        say(INSECURE_WARNING, label="warning:", style="bold yellow", err=True)
    serve(cfg, out=out, port=port, certs=certs, insecure=insecure, host=host, resume=resume)
    from privseg.core.results import RunResult
    from privseg.core.run_folder import RunFolder

    path = RunFolder(out).results
    result = RunResult.load(path)
    say(
        f"federation done: {len(result.sites)} sites, Dice {fmt(result.dice_mean)}, "
        f"max epsilon {fmt_eps(result.epsilon_max)}, "
        f"{fmt(result.seconds_per_round, '.1f')} s/round; wrote {path}"
    )


@user_errors
def site(
    data: Path = typer.Option(..., "--data", "-d", help="This site's prepared slice cache."),
    name: str = typer.Option(..., "--site", help="This site's name (as in the cache)."),
    server_address: str = typer.Option(..., "--server", help="SuperLink address HOST:PORT."),
    certs: Path | None = typer.Option(
        None, "--certs", help="Folder with ca.crt and sites/<site>.key."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Site folder (its privacy floor and test report; the ledger stays with the "
        "data); default ./privseg-<site>.",
    ),
    timeout: float = typer.Option(
        60.0, "--timeout", help="Seconds to keep trying to reach the server before giving up."
    ),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
    worker: bool = typer.Option(
        True,
        "--worker/--no-worker",
        help="Keep torch and the trainer loaded between rounds (a local worker process).",
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="TOML whose [privacy] section is this site's floor (merged, only ever stricter).",
    ),
    budget: float | None = typer.Option(
        None,
        "--budget",
        help="This site's lifetime epsilon budget over every run on its data (required here "
        "or as privacy.budget_epsilon in --config).",
    ),
    device: str | None = DeviceOption,
) -> None:
    """Join a federation as one site; return when the server has finished."""
    if config is not None:
        load_config(config, None)  # a bad floor file is refused before Flower loads
    from privseg.federated.site import join

    if insecure:
        say(INSECURE_WARNING, label="warning:", style="bold yellow", err=True)
    report = join(
        data=data,
        site=name,
        server=server_address,
        certs=certs,
        insecure=insecure,
        out=out,
        timeout=timeout,
        worker=worker,
        privacy_config=config,
        budget_epsilon=budget,
        device=device,
    )
    say(f"site {name}: done; local report {report}")


@user_errors
def certs(
    out: Path = typer.Argument(..., help="Folder to create."),
    sites: int = typer.Option(3, "--sites", "-n", min=1, help="Number of sites (site-0...)."),
    names: str | None = typer.Option(
        None, "--names", help="Comma-separated site names (instead of site-0, site-1, ...)."
    ),
    host: list[str] | None = typer.Option(
        None, "--host", help="Extra server host name or IP for the certificate (repeatable)."
    ),
    days: int = typer.Option(365, "--days", min=1, help="Validity in days."),
) -> None:
    """Make a CA, the server's TLS certificate and one authentication key per site."""
    from privseg.data.sites import site_names
    from privseg.federated.certs import make_certs

    site_list = [s.strip() for s in names.split(",")] if names else site_names(sites)
    files = make_certs(out, site_list, hosts=host or [], days=days)
    say(
        f"wrote {files.root}: ca.crt (everyone), server.pem/server.key (server), "
        f"sites/<name>.key (each site its own), sites/<name>.pub (server); "
        f"keep ca.key offline"
    )


def register(app: typer.Typer) -> None:
    """Add `server`, `site` and `certs` to the root command."""
    app.command("server")(server)
    app.command("site")(site)
    app.command("certs")(certs)
