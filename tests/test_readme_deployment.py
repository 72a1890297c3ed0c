"""The deployment walkthrough (docs/DEPLOYMENT.md, linked from the README), run as written: a
coordinator and two hospitals over TLS on 127.0.0.1, each in its own working folder with relative
paths. Only the documented placeholders ($SERVER, $LISTEN, $PORT, $SITE, $CT) are replaced, so the
test fails when the document and privseg diverge."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import privseg
from conftest import e2e_config
from privseg.config import Config
from privseg.federated.processes import free_port, stop_stale

DOC = Path(__file__).resolve().parents[1] / "docs" / "DEPLOYMENT.md"
CLI = [sys.executable, "-c", "from privseg.cli.app import main; main()"]
# every party runs in its own folder: this privseg, whatever the working folder
SRC = str(Path(privseg.__file__).resolve().parents[1])
HOSPITALS = ["hospital-a", "hospital-b"]
PLACEHOLDERS = {"SERVER", "LISTEN", "PORT", "SITE", "CT"}
# who runs which command, in the walkthrough's order; server and site keep running
STEPS = [
    ("coordinator", "certs"),
    ("hospital", "data"),
    ("coordinator", "server"),
    ("hospital", "site"),
    ("hospital", "budget"),
]


def _block(name: str, lang: str) -> str:
    text = DOC.read_text()
    match = re.search(
        rf"<!-- {name}:start -->\s*```{lang}\n(.*?)```\s*<!-- {name}:end -->", text, re.S
    )
    assert match, f"{DOC.name} has no {name} block"
    return match.group(1)


def walkthrough() -> list[tuple[str, list[str]]]:
    """(party, argv after `privseg`) for every command of the walkthrough; the party
    is read from the comment above it ("# coordinator: ...", "# each hospital...")."""
    steps, party = [], None
    for line in _block("deployment-walkthrough", "bash").replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("#"):
            for who in ("coordinator", "hospital"):
                if line.startswith((f"# {who}", f"# each {who}")):
                    party = who
            continue
        if line:
            argv = shlex.split(line)
            assert argv[0] == "privseg", line
            assert party is not None, f"no '# coordinator' or '# each hospital' above {line!r}"
            steps.append((party, argv[1:]))
    return steps


def substitute(argv: list[str], values: dict[str, str]) -> list[str]:
    out = []
    for arg in argv:
        for name in set(re.findall(r"\$([A-Z]+)", arg)):
            assert name in PLACEHOLDERS, f"${name} is not a documented placeholder"
            arg = arg.replace(f"${name}", values[name])
        out.append(arg)
    return out


def test_the_walkthrough_is_the_documented_procedure() -> None:
    """Fast: the commands, their order and parties, and the example federation.toml."""
    assert [(party, argv[0]) for party, argv in walkthrough()] == STEPS
    text = DOC.read_text()
    for name in PLACEHOLDERS:
        assert f"| `${name}` |" in text, f"${name} is not in {DOC.name}'s placeholder table"
    Config.from_dict(tomllib.loads(_block("federation-config", "toml")))


@pytest.mark.slow
def test_the_deployment_walkthrough_runs_as_written(tmp_path: Path) -> None:
    from privseg.data.phantom import synth_task

    steps = walkthrough()
    settings = e2e_config(rounds=2, round_timeout=300.0).to_toml()  # 32², 2 rounds: fast
    coordinator = tmp_path / "coordinator"
    folders = {site: tmp_path / site for site in HOSPITALS}
    for folder in (coordinator, *folders.values()):
        folder.mkdir()
        (folder / "federation.toml").write_text(settings)
    port = str(free_port())
    common = {"SERVER": "127.0.0.1", "LISTEN": "127.0.0.1", "PORT": port}
    values = {
        site: {
            **common,
            "SITE": site,
            "CT": str(
                synth_task(
                    tmp_path / f"ct-{site}", sites=1, patients_per_site=4, size=32, slices=8, seed=i
                )
            ),
        }  # fmt: skip
        for i, site in enumerate(HOSPITALS)
    }
    running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def run(name: str, argv: list[str], cwd: Path, background: bool = False) -> str:
        log = tmp_path / f"{name}.out"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [*CLI, *argv], cwd=cwd, env={**os.environ, "PYTHONPATH": SRC}, stdout=fh,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        if background:
            running.append((name, proc))
            return ""
        assert proc.wait(300) == 0, f"privseg {shlex.join(argv)}:\n{log.read_text()}"
        return log.read_text()

    t0 = time.perf_counter()
    outputs: dict[str, str] = {}
    try:
        for party, argv in steps:
            cmd = argv[0]
            background = cmd in ("server", "site")
            if party == "coordinator":
                run(f"coordinator-{cmd}", substitute(argv, common), coordinator, background)
                if cmd == "certs":  # "give each hospital certs/ca.crt and its own key"
                    for site, folder in folders.items():
                        (folder / "certs" / "sites").mkdir(parents=True)
                        shutil.copy(coordinator / "certs" / "ca.crt", folder / "certs")
                        key = coordinator / "certs" / "sites" / f"{site}.key"
                        shutil.copy(key, folder / "certs" / "sites")
                continue
            if cmd == "budget":  # after the federation: wait for it to end everywhere
                for name, proc in running:
                    code = proc.wait(600)
                    assert code == 0, (tmp_path / f"{name}.out").read_text()
            for site, folder in folders.items():
                argv_site = substitute(argv, values[site])
                outputs[f"{site}-{cmd}"] = run(f"{site}-{cmd}", argv_site, folder, background)
        print(f"deployment walkthrough: {time.perf_counter() - t0:.1f} s")
    finally:
        for _, proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        for pid_file in tmp_path.rglob("logs/*.pid"):
            stop_stale(pid_file)

    results = json.loads((coordinator / "run" / "results.json").read_text())
    assert sorted(s["name"] for s in results["sites"]) == HOSPITALS
    assert [h["round"] for h in results["history"]] == [1, 2]
    assert results["history"][-1]["sites"] == HOSPITALS
    for site, folder in folders.items():
        report = json.loads((folder / "site" / "sites" / f"{site}.json").read_text())
        assert report["site"] == site and report["test"]["patients"]  # stayed at the hospital
        eps = next(s["epsilon"] for s in results["sites"] if s["name"] == site)
        assert 0 < eps <= 10  # its --budget
        budget = outputs[f"{site}-budget"]  # what its data spent, as its ledger says
        assert site in budget and f"{eps:.3f}" in budget
    assert not (coordinator / "cache").exists()  # the coordinator never holds patient data
