"""Benchmark (issue 18): the paper's preset as a federated DP study on the phantom, on a device.

The preset (``privseg run --preset paper``; Ziller et al. 2021): MoNet, 256 x 256, federated
averaging after every batch (``federated.local_steps = 1``), unweighted FedAvg, batch 32 (the
Poisson mean), clip norm 1.2, noise multiplier 0.38, Adam lr 1e-3 decayed to 1e-4, RDP
accounting, one slice per privacy unit, delta 1e-5. It runs privseg's own federated training
(``privseg.runs.train.train``, mode federated) on the built-in phantom, so the numbers are
those of ``privseg train``.

Printed (and with ``--json`` written): training slices per second (``sites x local_steps x
batch`` expected slices per round over the rounds' train phase, Flower's in-process message
passing included; the first round, which warms up the device, is left out when there are
more), seconds per round (train + the sites' validation), and the test Dice. ``--work``
keeps the phantom and its slice cache, so a second device reuses them.

    python bench/study_gpu.py --device cuda [--sites 3 --patients 40 --rounds 20] [--json F]
    python bench/study_gpu.py --device cpu --rounds 3 --work W     # the CPU, for the ratio
    python bench/study_gpu.py --tiny                               # 32 px smoke test, ~1 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any


def paper() -> Any:
    """The paper preset (one place: ``privseg.runs.study.paper_preset``) with DP on."""
    from privseg.config import Config
    from privseg.runs.study import paper_preset

    return paper_preset(Config()).replace(**{"privacy.enabled": True})


#: --tiny: the same code path in about a minute on two CPU cores
TINY = {"sites": 2, "patients": 5, "slices": 8, "size": 32, "resolution": 32, "rounds": 2,
        "batch": 8, "features": 8}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--patients", type=int, default=40, help="phantom patients per site")
    ap.add_argument("--slices", type=int, default=32, help="phantom slices per patient")
    ap.add_argument("--size", type=int, default=128, help="phantom in-plane voxels")
    ap.add_argument("--resolution", type=int, default=256, help="paper: 256")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32, help="paper: 32")
    ap.add_argument("--features", type=int, default=16, help="MoNet's first level (paper: 16)")
    ap.add_argument(
        "--simulation",
        choices=["in-process", "ray", "auto"],
        default="in-process",
        help="where Flower runs the sites (in-process: no Ray, as on the GPU image)",
    )
    ap.add_argument("--work", type=Path, default=None, help="keep phantom, cache, runs here")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    ap.add_argument("--tiny", action="store_true", help="a 32 px smoke test (sets the sizes)")
    return ap


def config(args: argparse.Namespace) -> Any:
    """The paper preset at this benchmark's sizes and device (a validated privseg Config)."""
    return paper().replace(
        **{
            "data.resolution": args.resolution,
            "data.sites": args.sites,
            "train.batch_size": args.batch,
            "model.features": args.features,
            "federated.rounds": args.rounds,
            "federated.min_sites": args.sites,
            "train.device": args.device,
        }
    )


def prepare(args: argparse.Namespace, cfg: Any, work: Path) -> tuple[Path, float]:
    """The phantom's slice cache in ``work`` (built once, reused by later runs) and the
    seconds it took (0 when reused)."""
    from privseg.data.phantom import synth_task
    from privseg.data.prepare import prepare_cache

    started = time.perf_counter()
    task = work / "task"
    if not (task / "dataset.json").is_file():
        synth_task(task, sites=args.sites, patients_per_site=args.patients, size=args.size,
                   slices=args.slices)  # fmt: skip
    cache = work / f"cache-{args.resolution}"
    reused = (cache / "manifest.json").is_file()
    prepare_cache(task, cache, cfg.data, seed=cfg.seed)
    return cache, 0.0 if reused else time.perf_counter() - started


def summarise(results: dict[str, Any], cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """slices/s, s/round and Dice of one federated run's ``results.json``."""
    history = results["history"]
    steady = history[1:] if len(history) > 1 else history  # round 1 warms the device up
    per_round = args.sites * cfg.federated.local_steps * cfg.train.batch_size
    train_s = sum(h["train_seconds"] for h in steady)
    return {
        "device": results.get("device"),
        "slices_per_second": per_round * len(steady) / train_s if train_s > 0 else None,
        "seconds_per_round": statistics.mean(h["seconds"] for h in steady),
        "train_seconds_per_round": train_s / len(steady),
        "evaluate_seconds_per_round": statistics.mean(h["evaluate_seconds"] for h in steady),
        "rounds_timed": len(steady),
        "dice": results["dice_mean"],
        "dice_sd": results["dice_sd"],
        "epsilon_max": results["epsilon_max"],
        "wall_seconds": results["wall_seconds"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One study on ``args.device``; prints the summary table, returns the summary."""
    from privseg.core.device import resolve_device
    from privseg.runs.train import train

    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    cfg = config(args)
    resolve_device(cfg.train.device, field="--device")  # before any work
    work = args.work or Path(tempfile.mkdtemp(prefix="privseg-study-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    cache, prep_s = prepare(args, cfg, work)
    out = work / f"run-{args.device.replace(':', '')}-{uuid.uuid4().hex[:8]}"
    simulation = None if args.simulation == "auto" else args.simulation
    results = train(cfg, data=cache, out=out, mode="federated", simulation=simulation)
    summary = {
        **summarise(results, cfg, args),
        "prepare_seconds": prep_s,
        "config": cfg.to_dict(),
        "sites": args.sites,
        "patients_per_site": args.patients,
        "rounds": args.rounds,
        "simulation": args.simulation,
        "run_dir": str(out),
    }
    s = summary
    print(f"{'device':>24} {'slices/s':>9} {'s/round':>8} {'train s':>8} {'eval s':>7} {'Dice':>6}")
    print(
        f"{s['device']:>24} {s['slices_per_second']:>9.1f} {s['seconds_per_round']:>8.2f} "
        f"{s['train_seconds_per_round']:>8.2f} {s['evaluate_seconds_per_round']:>7.2f} "
        f"{s['dice']:>6.3f}",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    try:
        summary = run(args)
    except ValueError as exc:  # ConfigError (a GPU this machine lacks, a bad size) included
        ap.error(str(exc))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
