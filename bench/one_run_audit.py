"""The one-run audit's controls (docs/PRIVACY.md, "One-run audit"): the same canaries on a
correct DP-SGD run, a run without noise (clipping on) and a run with one unnoised step accounted
as noised. A tiny model (Linear 100 -> 100) through privseg's real DPGradient.

    PYTHONPATH=src python bench/one_run_audit.py [--canaries 200] [--steps 20] [--q 0.25]

Prints one line per control and the summary JSON last.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

from privseg.attack.one_run import audit_scores
from privseg.privacy.accounting import calibrate_noise
from privseg.privacy.canaries import GradientCanaries
from privseg.privacy.dp_sgd import DPGradient
from privseg.privacy.sampling import PoissonUnitSampler


def control(noise: str, *, m: int, q: float, steps: int, n: int, epsilon: float) -> dict:
    """One run with canaries; ``noise``: "calibrated", "none" or "broken" (one step unnoised)."""
    torch.manual_seed(0)
    x, y = torch.randn(n, 100), torch.randn(n, 100)
    model = nn.Linear(100, 100)
    sigma = calibrate_noise(
        target_epsilon=epsilon, delta=1e-5, sample_rate=q, steps=steps, accountant="prv"
    )
    grad = DPGradient(
        max_grad_norm=1.0,
        noise_multiplier=0.0 if noise == "none" else sigma,
        expected_batch_size=n * q,
        grad_path="loop",
        generator=torch.Generator().manual_seed(1),
    )
    dim = sum(p.numel() for p in model.parameters())
    canaries = GradientCanaries(
        count=m, dim=dim, max_grad_norm=1.0, sample_rate=q, seed=123, rng=np.random.default_rng(5)
    )
    grad.canaries = canaries
    sampler = PoissonUnitSampler(np.arange(n), sample_rate=q, rng=np.random.default_rng(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    started = time.perf_counter()
    for step in range(steps):
        if noise == "broken":
            grad.noise_multiplier = 0.0 if step == steps // 2 else sigma
        idx, groups = sampler.sample()
        opt.zero_grad()
        grad(model, lambda o, t: ((o - t) ** 2).mean(1), x[idx], y[idx], groups)
        opt.step()
    trained = time.perf_counter()
    res = audit_scores(canaries.step_scores, canaries.included, delta=1e-5)
    return {
        "control": noise,
        "reported_epsilon": epsilon,
        "sigma": 0.0 if noise == "none" else sigma,
        "m": m,
        "n": n,
        "q": q,
        "steps": steps,
        "params": dim,
        **{k: res[k] for k in ("k_plus", "k_minus", "r", "v", "epsilon_lower")},
        "epsilon_lower_fdp": res["epsilon_lower_fdp"],
        "ceiling": res["ceiling"],
        "train_seconds": trained - started,
        "audit_seconds": time.perf_counter() - trained,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canaries", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--q", type=float, default=0.25)
    ap.add_argument("--records", type=int, default=100)
    ap.add_argument("--epsilon", type=float, default=1.0)
    args = ap.parse_args()
    rows = []
    for noise in ("calibrated", "none", "broken"):
        row = control(
            noise, m=args.canaries, q=args.q, steps=args.steps, n=args.records, epsilon=args.epsilon
        )
        print(
            f"{noise:10s} bound {row['epsilon_lower']:.2f} (f-DP {row['epsilon_lower_fdp']:.2f}) "
            f"ceiling {row['ceiling']:.2f} reported {args.epsilon:g} r {row['r']} v {row['v']} "
            f"audit {row['audit_seconds']:.1f} s"
        )
        rows.append(row)
    print(json.dumps({"controls": rows}))


if __name__ == "__main__":
    main()
