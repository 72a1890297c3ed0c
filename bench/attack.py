"""The privacy audit's acceptance numbers: gradient inversion on a *trained* model, with and
without DP, on the built-in phantom.

    python bench/attack.py [--run RUN_DIR] [--site site-0] [--iterations 300] [--restarts 1]
                           [--targets 3] [--epsilon 8] [--tv-weight W] [--model monet|unet]
                           [--epochs 3] [--audit-trials 50] [--threads 1] [--work DIR]
                           [--round last|first]

Without ``--run`` it makes the phantom (3 sites x 6 patients, 64^2 slices), trains the model
(default MoNet, the seed paper's; ``--model unet`` shows the case that resists inversion)
centrally for ``--epochs`` epochs and attacks that trained global model; with ``--run`` it
attacks a finished run folder (e.g. ``demo/study/runs/federated``). Two settings, both one
site update of one slice (B = 1), mask given (the worst case), computed on the trained global
model (``--round last``) or on the initial one the server broadcast in round 1 (``first``):

* ``no_dp``: T1, the plain averaged gradient;
* ``dp_epsN``: T3, the site's DP-SGD step with sigma calibrated for epsilon = N (the study's
  federated calibration), attacked by the DP-aware attacker with the same budget,
  plus the K-way identification audit against the bound implied by (epsilon, delta).

Prints a table and, as its last line, JSON: per setting ``psnr_median``, ``ssim_median``,
``reidentification_rate``, ``prior_psnr_median``, ``chance_psnr_median`` (and the audit), plus
``seconds_per_iteration`` (one attacker iteration = one differentiable replay of the update).

Defaults are sized for about 13 minutes on this project's shared 2-core machine (MoNet: 0.35 s
an iteration with one thread, 105 s of training).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privseg.attack.runner import attack_setting, attacked_model, audit_setting, dp_plan
from privseg.config import AttackConfig, Config
from privseg.runs.attack import load_run

KEYS = (
    "psnr_median",
    "ssim_median",
    "reidentification_rate",
    "prior_psnr_median",
    "chance_psnr_median",
    "matching_loss_median",
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="attack this finished run folder (else train one)")
    p.add_argument("--site", default="site-0")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--targets", type=int, default=3)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--tv-weight", type=float, default=None, help="default: attack.tv_weight")
    p.add_argument("--lr", type=float, default=None, help="default: attack.lr")
    p.add_argument("--model", default="monet", choices=("monet", "unet"))
    p.add_argument(
        "--round",
        default="last",
        choices=("last", "first"),
        help="attack the update on the trained (last) or the initial (round-1) global model",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--patients", type=int, default=6)
    p.add_argument("--audit-trials", type=int, default=50)
    p.add_argument("--only", choices=("no_dp", "dp"), help="run one setting only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="keep the phantom, run and attack files here")
    p.add_argument("--out", type=Path, help="write <setting>/attack.json|png under this folder")
    return p.parse_args(argv)


def trained_model(args: argparse.Namespace, work: Path) -> tuple[torch.nn.Module, Config, Any]:
    """The model to attack, its config and the site's training split."""
    if args.run is not None:
        model, cfg, _, split = load_run(args.run, args.site)
        return model, cfg, split
    from privseg.data.phantom import synth_task
    from privseg.models.checkpoint import load_checkpoint
    from privseg.runs.train import train

    cfg = Config().replace(
        **{
            "seed": args.seed,
            "model.name": args.model,
            "train.epochs": args.epochs,
            "train.threads": args.threads,
        }
    )
    task = synth_task(work / "phantom", sites=3, patients_per_site=args.patients, seed=args.seed)
    started = time.perf_counter()
    res = train(cfg, data=task, out=work / "run", mode="central", cache_dir=work / "cache")
    print(
        f"trained {args.model} centrally for {args.epochs} epochs in "
        f"{time.perf_counter() - started:.0f} s: test Dice {res['dice_mean']:.3f}",
        flush=True,
    )
    model, cfg, _ = load_checkpoint(work / "run" / "checkpoint.pt")
    from privseg.data.cache import SliceCache

    return model, cfg, SliceCache.open(work / "cache").split(args.site, "train")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="privseg-bench-attack-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model, cfg, split = trained_model(args, work)
        changes: dict[str, Any] = {
            "seed": args.seed,
            "attack.threat": "T1",
            "attack.batch_size": 1,
            "attack.mask": "given",
            "attack.iterations": args.iterations,
            "attack.restarts": args.restarts,
            "attack.targets": args.targets,
            "attack.audit_trials": max(1, args.audit_trials),
            "attack.round": args.round,
        }
        # the attack's current defaults, not those saved with an older run's config.toml
        defaults = AttackConfig()
        changes["attack.tv_weight"] = (
            defaults.tv_weight if args.tv_weight is None else args.tv_weight
        )
        changes["attack.lr"] = defaults.lr if args.lr is None else args.lr
        cfg = cfg.replace(**changes)
        model, weights = attacked_model(cfg, model)
        print(f"attacking the update on {weights}", flush=True)
        settings: dict[str, dict[str, Any]] = {}
        chosen = {"no_dp": [None], "dp": [args.epsilon], None: [None, args.epsilon]}[args.only]
        for eps in chosen:
            started = time.perf_counter()
            dp = None if eps is None else dp_plan(cfg, split, epsilon=eps)
            res = attack_setting(model, split, cfg, dp, out_dir=args.out)
            seconds = time.perf_counter() - started
            key = res["setting"]
            row = {k: res.get(k) for k in KEYS}
            row.update(
                {
                    "threat": res["threat"],
                    "epsilon": res["epsilon"],
                    "noise_multiplier": res["noise_multiplier"],
                    "seconds": seconds,
                    "seconds_per_iteration": seconds
                    / (args.targets * args.restarts * args.iterations),
                    "psnr": [t["psnr"] for t in res["targets"]],
                }
            )
            if dp is not None and args.audit_trials > 0:
                aud = audit_setting(model, split, cfg, dp)
                row["audit"] = {
                    k: aud.get(k) for k in ("trials", "success_rate", "bound", "held", "epsilon")
                }
            settings[key] = row
            print(f"{key}: done in {seconds:.0f} s", flush=True)
    head = (
        f"{'setting':<10} {'PSNR':>6} {'SSIM':>6} {'re-id':>6} {'prior':>6} {'chance':>7} "
        f"{'match':>7} {'s/iter':>7}  audit"
    )
    print(
        f"\n{model.__class__.__name__} ({args.round} round), T1/T3 B=1 mask given, "
        f"{args.targets} targets x {args.restarts} restarts x {args.iterations} iterations, "
        f"lr {cfg.attack.lr:g}, TV {cfg.attack.tv_weight:g}"
    )
    print(head)
    for key, r in settings.items():
        aud = r.get("audit")
        audit = "-"
        if aud:
            held = "held" if aud["held"] else "NOT held"
            audit = f"{aud['success_rate']:.2f} <= {aud['bound']:.4f} ({held})"
        print(
            f"{key:<10} {r['psnr_median']:6.2f} {r['ssim_median']:6.3f} "
            f"{r['reidentification_rate']:6.2f} {r['prior_psnr_median']:6.2f} "
            f"{r['chance_psnr_median']:7.2f} {r['matching_loss_median']:7.4f} "
            f"{r['seconds_per_iteration']:7.3f}  {audit}"
        )
    summary = {
        "model": args.model if args.run is None else str(args.run),
        "round": args.round,
        "iterations": args.iterations,
        "restarts": args.restarts,
        "targets": args.targets,
        "tv_weight": cfg.attack.tv_weight,
        "lr": cfg.attack.lr,
        "seconds_per_iteration": float(
            np.median([r["seconds_per_iteration"] for r in settings.values()])
        ),
        **settings,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
