"""Benchmark (issue 22, finding 6): does a DP step's duration reveal the Poisson batch size?

For each resolution and grad path, one process draws ``--steps`` Poisson batches of slice
units (``--units`` units, expected batch ``--batch``) and runs each batch twice, in
alternating order: unpadded (``privacy.constant_time = false``) and padded to the constant
shape (:mod:`privseg.privacy.padding`; ``B_cap`` for a run of ``--run-steps`` steps). A step
is what the trainer times: sample, pad, gather the slices, the DP gradient, the optimizer step.

Printed per setting and mode: the median step time, the Pearson correlation r between the
Poisson batch size and the step time (wall clock, what an observer sees; ``r cpu``: this
process's CPU time, which other processes on a shared machine disturb less), and how many
batch sizes an observer recovers within one from the wall time alone (least-squares line
size ~ time fitted on the same steps: the most favourable case for the observer), next to
what guessing the mean size gets (no information).

    python bench/dp_timing.py --resolution 64 128 --paths loop batched --steps 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def pearson(x: list[float], y: list[float]) -> float:
    if np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def recovered(sizes: list[int], times: list[float]) -> int:
    """Batch sizes recovered within one by the least-squares line size ~ time."""
    s, t = np.asarray(sizes, float), np.asarray(times, float)
    if np.std(t) == 0:
        return guessed(sizes)
    slope, intercept = np.polyfit(t, s, 1)
    return int(np.sum(np.abs(np.rint(slope * t + intercept) - s) <= 1))


def guessed(sizes: list[int]) -> int:
    """Batch sizes within one of the mean size (an observer who learns nothing)."""
    s = np.asarray(sizes, float)
    return int(np.sum(np.abs(np.rint(s.mean()) - s) <= 1))


def bench(args: argparse.Namespace, resolution: int, path: str) -> dict:
    from privseg.config import ModelConfig, PrivacyConfig
    from privseg.models import build_model
    from privseg.privacy.dp_sgd import DPGradient
    from privseg.privacy.padding import ConstantShapeBatches
    from privseg.privacy.sampling import PoissonUnitSampler
    from privseg.training.losses import DiceBCELoss

    q = args.batch / args.units
    units = np.arange(args.units)
    sampler = PoissonUnitSampler(units, sample_rate=q, rng=np.random.default_rng(args.seed))
    pad = ConstantShapeBatches(
        units, sample_rate=q, steps=args.run_steps, rng=np.random.default_rng(args.seed + 1)
    )
    g = torch.Generator().manual_seed(args.seed)
    pool = 64  # slices of synthetic data; slice i reads pool slice i % pool
    images = torch.rand(pool, 1, resolution, resolution, generator=g)
    labels = (torch.rand(pool, 1, resolution, resolution, generator=g) > 0.7).float()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=args.model, features=args.features))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss_fn = DiceBCELoss()
    dp = DPGradient(
        max_grad_norm=PrivacyConfig().max_grad_norm,
        noise_multiplier=1.0,
        expected_batch_size=args.batch,
        grad_path=path,
    )

    def step(idx: np.ndarray, groups: np.ndarray, padded: bool) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        real = None
        if padded:
            idx, groups, real = pad.pad(idx, groups)
        x, y = images[idx % pool], labels[idx % pool]
        opt.zero_grad(set_to_none=True)
        dp(model, loss_fn, x, y, torch.as_tensor(groups), real)
        opt.step()
        return time.perf_counter() - t, time.process_time() - c

    for _ in range(args.warmup):
        batch = sampler.sample()
        step(*batch, False)
        step(*batch, True)
    sizes: list[int] = []
    times: dict[str, list[float]] = {"unpadded": [], "padded": []}
    cpu: dict[str, list[float]] = {"unpadded": [], "padded": []}
    for i in range(args.steps):
        idx, groups = sampler.sample()
        sizes.append(len(idx))
        for padded in (i % 2 == 1, i % 2 == 0):  # alternate which runs first
            wall, used = step(idx, groups, padded)
            times["padded" if padded else "unpadded"].append(wall)
            cpu["padded" if padded else "unpadded"].append(used)
    out = {"resolution": resolution, "path": path, "units_cap": pad.units_cap,
           "expected_batch": args.batch, "overflows": pad.overflows,
           "sizes": [min(sizes), max(sizes)], "guess_mean_within_1": guessed(sizes)}  # fmt: skip
    for mode, ts in times.items():
        out[mode] = {"median_s": statistics.median(ts), "pearson_r": pearson(sizes, ts),
                     "recovered_within_1": recovered(sizes, ts),
                     "pearson_r_cpu": pearson(sizes, cpu[mode])}  # fmt: skip
    out["cost"] = out["padded"]["median_s"] / out["unpadded"]["median_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--paths", nargs="+", default=["loop", "batched"],
                    choices=["loop", "batched", "opacus", "functorch"])  # fmt: skip
    ap.add_argument("--steps", type=int, default=60, help="timed steps (Poisson batches)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--units", type=int, default=1000, help="slice units at the site")
    ap.add_argument("--batch", type=int, default=16, help="expected batch (train.batch_size)")
    ap.add_argument("--run-steps", type=int, default=1000, help="the run's steps, for B_cap")
    ap.add_argument("--model", default="unet")
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"model={args.model} f{args.features} units={args.units} batch={args.batch} "
          f"run_steps={args.run_steps} steps={args.steps} threads={args.threads}")  # fmt: skip
    print(f"{'res':>4} {'path':>8} {'mode':>9} {'median s':>9} {'r':>6} {'recovered':>9} "
          f"{'B_cap':>6} {'cost':>5} {'r cpu':>6}")  # fmt: skip
    results = []
    for res in args.resolution:
        for path in args.paths:
            r = bench(args, res, path)
            results.append(r)
            for mode in ("unpadded", "padded"):
                m = r[mode]
                print(f"{res:>4} {path:>8} {mode:>9} {m['median_s']:>9.3f} {m['pearson_r']:>6.2f} "
                      f"{m['recovered_within_1']:>4}/{args.steps:<4} {r['units_cap']:>6} "
                      f"{r['cost']:>5.2f} {m['pearson_r_cpu']:>6.2f}", flush=True)  # fmt: skip
            print(f"{'':>4} {'':>8} {'guess':>9} {'':>9} {'':>6} "
                  f"{r['guess_mean_within_1']:>4}/{args.steps:<4}", flush=True)  # fmt: skip
    print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
