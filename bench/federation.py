"""Seconds per federated round for the same local work: plain loop, Flower simulation, and a
loopback deployment (SuperLink + one SuperNode per site, TLS, separate processes).

    python bench/federation.py [--rounds 4] [--local-steps 5] [--sites 3] [--resolution 32]
                               [--repeats 1]

The last line is JSON with ``simulation_overhead`` (simulation s/round over plain s/round,
minus 1) and ``deployment_seconds_per_round_overhead`` (deployment s/round minus plain).
Rounds after the first are "steady"; the first round also pays process start and imports.
``--repeats N`` runs plain and simulation N times, alternating, and reports the median of the
N paired overheads (each pair measured back to back, so slow drifts of the machine cancel;
``simulation_overhead_runs`` lists them all); the deployment runs once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, median

import torch

from privseg.config import Config
from privseg.data.cache import SliceCache
from privseg.data.phantom import synth_task
from privseg.data.prepare import prepare_cache
from privseg.federated.certs import make_certs
from privseg.federated.processes import free_port
from privseg.federated.simulation import run_federated
from privseg.federated.state import initial_state
from privseg.privacy import accounting
from privseg.training.trainer import build_site_trainer

CLI = [sys.executable, "-c", "from privseg.cli.app import main; main()"]


def make_config(args: argparse.Namespace) -> Config:
    return Config.from_dict(
        {
            "data": {"resolution": args.resolution, "sites": args.sites},
            "model": {"features": 8, "groups": 2},
            "train": {"batch_size": 8, "threads": args.threads},
            "privacy": {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": None},
            "federated": {
                "rounds": args.rounds,
                "local_steps": args.local_steps,
                "min_sites": args.sites,
                "round_timeout": 600.0,
            },
        }
    )


def own_ledgers(cfg: Config, out: Path) -> Config:
    """Each measured run in a data home of its own (its own ledger store and registry: the
    registry refuses a second store for the same patients), so every run pays the same
    accounting. A benchmark's phantom patients are no one's: never do this with real data."""
    os.environ["XDG_DATA_HOME"] = str(out / "data-home")
    os.environ.pop("PRIVSEG_LEDGER_DIR", None)
    return cfg


def plain(cfg: Config, cache: Path, out: Path) -> list[dict]:
    """The same rounds with no engine: fit every site, average, validate every site.

    The accountant's epsilon cache is emptied first: a simulation starts a fresh process, so
    an earlier plain run's cached epsilons would spare the plain loop work the sites do.
    """
    accounting.clear_cache()
    fed = cfg.federated
    sites = SliceCache.open(cache).sites
    cfg = own_ledgers(cfg, out)
    trainers = [
        build_site_trainer(
            cfg, cache, s, planned_steps=fed.rounds * fed.local_steps, run_id="plain"
        )
        for s in sites
    ]
    state = initial_state(cfg)
    history = []
    for _ in range(fed.rounds):
        t0 = time.perf_counter()
        states, weights, fit = [], [], []
        for trainer in trainers:
            new, metrics = trainer.fit(state, fed.local_steps, run_id="plain")
            fit.append(metrics["seconds"])  # as sites report it: the steps, not the accounting
            states.append(new)
            weights.append(trainer.num_examples)
        total = sum(weights)
        state = {
            k: sum(s[k].float() * w / total for s, w in zip(states, weights, strict=True)).to(
                state[k].dtype
            )
            for k in state
        }
        t_train = time.perf_counter()
        for trainer in trainers:
            trainer.evaluate(state, "val")
        t_end = time.perf_counter()
        history.append(
            {
                "seconds": t_end - t0,
                "train_seconds": t_train - t0,
                "site_train_seconds_max": max(fit),
                "evaluate_seconds": t_end - t_train,
            }
        )
    return history


def deployment(cfg: Config, cache: Path, root: Path, worker: bool = True) -> list[dict]:
    sites = SliceCache.open(cache).sites
    certs = root / "certs"
    make_certs(certs, sites)
    cfg_file = root / "cfg.toml"
    cfg_file.write_text(cfg.to_toml())
    port, run = free_port(), root / "deploy"
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    *CLI,
                    "server",
                    "--config",
                    str(cfg_file),
                    "--out",
                    str(run),
                    "--port",
                    str(port),
                    "--certs",
                    str(certs),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        for site in sites:
            procs.append(
                subprocess.Popen(
                    [
                        *CLI,
                        "site",
                        "--data",
                        str(cache),
                        "--site",
                        site,
                        "--server",
                        f"127.0.0.1:{port}",
                        "--certs",
                        str(certs),
                        "--out",
                        str(root / site),
                        "--timeout",
                        "120",
                        "--budget",  # a deployed site trains only under its own budget
                        "1000",
                        "--worker" if worker else "--no-worker",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        if procs[0].wait(1800):
            raise SystemExit("the deployment run failed; see " + str(run / "logs"))
        return json.loads((run / "results.json").read_text())["history"]
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait()


PHASES = ("train_seconds", "site_train_seconds_max", "evaluate_seconds")


def summary(name: str, history: list[dict]) -> dict[str, float]:
    """Mean seconds per round (first round apart) and, for later rounds, per phase: the train
    phase, the slowest site's own training inside it, and the validation phase."""
    seconds = [h["seconds"] for h in history]
    steady = history[1:] or history
    row = {"first": seconds[0], "steady": mean(h["seconds"] for h in steady), "mean": mean(seconds)}
    for key in PHASES:
        if all(key in h for h in steady):
            row[key] = mean(float(h[key]) for h in steady)
    phases = ", ".join(f"{k.removesuffix('_seconds')} {row[k]:.2f}" for k in PHASES if k in row)
    print(
        f"{name:11s} first round {row['first']:6.2f} s, later rounds {row['steady']:6.2f} s, "
        f"mean {row['mean']:6.2f} s ({phases})",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--repeats", type=int, default=1, help="plain/simulation pairs (median overhead)"
    )
    parser.add_argument("--skip-deployment", action="store_true")
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument(
        "--no-worker",
        action="store_true",
        help="sites rebuild torch and the trainer for every message",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep runs and logs here")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} is invalid: must be >= 1")
    torch.set_num_threads(args.threads)
    cfg = make_config(args)
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="privseg-bench-")))
        else:
            root = args.workdir.resolve()
            root.mkdir(parents=True, exist_ok=True)
        task = synth_task(
            root / "task", sites=args.sites, patients_per_site=4, size=args.resolution, slices=8
        )
        cache = prepare_cache(task, root / "cache", cfg.data, seed=0).root
        pairs = []
        for i in range(args.repeats):
            rows = {"plain": summary("plain", plain(cfg, Path(cache), root / f"plain{i}"))}
            if not args.skip_simulation:
                sim = run_federated(
                    own_ledgers(cfg, root / f"sim{i}"),
                    cache_dir=Path(cache),
                    out_dir=root / f"sim{i}",
                    run_id=f"bench{i}",
                )
                rows["simulation"] = summary("simulation", sim.history)
                pairs.append(rows["simulation"]["steady"] / rows["plain"]["steady"] - 1.0)
        if not args.skip_deployment:
            rows["deployment"] = summary(
                "deployment", deployment(cfg, Path(cache), root, worker=not args.no_worker)
            )
    base = rows["plain"]["steady"]
    out = {
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "sites": args.sites,
        "seconds_per_round": {k: v["steady"] for k, v in rows.items()},
        "first_round_seconds": {k: v["first"] for k, v in rows.items()},
        "phases": {k: {p: v[p] for p in PHASES if p in v} for k, v in rows.items()},
        "simulation_overhead": median(pairs) if pairs else None,
        "simulation_overhead_runs": pairs,
        "simulation_seconds_per_round_overhead": (
            rows["simulation"]["steady"] - base if "simulation" in rows else None
        ),
        "deployment_seconds_per_round_overhead": (
            rows["deployment"]["steady"] - base if "deployment" in rows else None
        ),
    }
    if len(pairs) > 1:
        print("simulation overhead per pair: " + ", ".join(f"{p:+.0%}" for p in pairs))
    sim_over = out["simulation_overhead"]
    dep_over = out["deployment_seconds_per_round_overhead"]
    print(
        f"overhead per round: simulation "
        f"{'-' if sim_over is None else f'{sim_over:+.0%}'}, deployment "
        f"{'-' if dep_over is None else f'{dep_over:+.2f} s'}"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
