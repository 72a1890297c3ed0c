"""Benchmark (issue 7): cost of one DP-SGD optimizer step vs the fastest non-private step.

Variants, all one optimizer step on one batch of ``--batch`` slices (slice units):
  plain         batched forward/backward
  micro4/8      the same gradient, accumulated over micro-batches of 4 / 8 slices
  shard4        micro-batches of 4 sharded over the torch threads, each thread single-threaded
                (the loop path's parallelism without clipping: data parallel over the cores)
  shard1        the same with single slices: the DP loop's passes without its clipping, so
                dp-loop / shard1 is the cost of clipping and bookkeeping, shard1 / the fastest
                the cost of batch-1 passes (not a candidate for the fastest non-private step)
  dp-batched    DPGradient(grad_path="batched") + step (the default): per-sample gradients
                from one batched pass per chunk of slices (4 at 64 px, 1 from 128 px on, or
                --chunk), chunks sharded over the torch threads; one slice per privacy unit
  dp-loop       DPGradient(grad_path="loop") + step: per-unit backward passes, sharded over
                the torch threads
  dp-loop-u4    the same with privacy units of 4 slices (privacy.unit = "patient": all slices
                of a sampled patient form one unit, so each backward pass is batched)
  dp-opacus     DPGradient(grad_path="opacus") + step: Opacus hooks, one batched pass
  dp-functorch  DPGradient(grad_path="functorch") + step: Opacus with vmap(grad) everywhere
  dp-ghost      Opacus fast gradient clipping (GradSampleModuleFastGradientClipping: ghost
                norms where Opacus has them, i.e. Linear; conv layers instantiate per-sample
                gradients), two backward passes, + noise + step

Time: variants interleaved round-robin in one process, median after warm-up.
Memory: each variant alone in a fresh subprocess; extra peak RSS = the kernel's peak-RSS mark
(VmHWM, reset via /proc/self/clear_refs once model and data are built) minus RSS at that point,
so imports and weights are not counted (falls back to ru_maxrss where the reset is refused).

On ``--device cuda`` (or ``cuda:N``, ``auto``) the timings synchronise the GPU, the default
DP path is ``privacy.grad_path = "auto"`` resolved for the device, and memory is the extra peak
of ``torch.cuda.max_memory_allocated`` over two steps, measured in this process (the caching
allocator's counters are exact per reset; a fresh process per variant would cost a CUDA start
each). The table is the same on every device.

    python bench/dp_step.py --resolution 64 128 256 --repeats 5 [--variants plain dp-loop ...]
    python bench/dp_step.py --device cuda --model monet --resolution 64 128 256
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

NONPRIVATE = ("plain", "micro4", "micro8", "shard4")
DIAGNOSTIC = ("shard1",)
PRIVATE = ("dp-batched", "dp-loop", "dp-loop-u4", "dp-opacus", "dp-functorch", "dp-ghost")
VARIANTS = NONPRIVATE + DIAGNOSTIC + PRIVATE


def build(model_name: str, features: int) -> nn.Module:
    from privseg.config import ModelConfig
    from privseg.models import build_model

    return build_model(ModelConfig(name=model_name, features=features))


def loss_function() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from privseg.training.losses import DiceBCELoss

    return DiceBCELoss()


def make_step(variant: str, args: argparse.Namespace) -> Callable[[], None]:
    """A closure doing one full optimizer step of ``variant`` on a fixed synthetic batch
    (``step.model`` is the model it trains, for checks of the gradient it leaves)."""
    step, model = _make_step(variant, args)
    step.model = model  # type: ignore[attr-defined]
    return step


def _make_step(variant: str, args: argparse.Namespace) -> tuple[Callable[[], None], nn.Module]:
    from privseg.config import PrivacyConfig
    from privseg.privacy.dp_sgd import DPGradient

    torch.manual_seed(0)
    model = build(args.model, args.features)
    loss_fn = loss_function()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    r, b = args.resolution, args.batch
    images = torch.rand(b, 1, r, r)
    labels = (torch.rand(b, 1, r, r) > 0.7).float()
    groups = torch.arange(b) // (4 if variant == "dp-loop-u4" else 1)
    model, images, labels = model.to(args.device), images.to(args.device), labels.to(args.device)

    if variant == "dp-ghost":
        return ghost_step(model, loss_fn, opt, images, labels), model
    if variant in PRIVATE:
        dp = DPGradient(
            max_grad_norm=PrivacyConfig().max_grad_norm,
            noise_multiplier=1.0,
            expected_batch_size=b,
            grad_path=variant.removeprefix("dp-").removesuffix("-u4"),
            chunk_slices=args.chunk,
        )

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            dp(model, loss_fn, images, labels, groups)
            opt.step()

        return step, model

    if variant in ("shard4", "shard1"):
        micro = int(variant.removeprefix("shard"))
        step = shard_step(model, loss_fn, opt, images, labels, micro=micro, threads=args.threads)
        return step, model
    micro = b if variant == "plain" else int(variant.removeprefix("micro"))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for i in range(0, b, micro):
            loss = loss_fn(model(images[i : i + micro]), labels[i : i + micro]).sum() / b
            loss.backward()
        opt.step()

    return step, model


def shard_step(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    micro: int,
    threads: int,
) -> Callable[[], None]:
    """Non-private data parallelism over the cores: thread ``j`` takes micro-batches
    ``j, j + w, ...`` single-threaded; the partial gradients are summed in shard order."""
    from concurrent.futures import ThreadPoolExecutor

    params = [p for p in model.parameters() if p.requires_grad]
    chunks = [slice(i, i + micro) for i in range(0, len(images), micro)]
    workers = max(1, min(threads, len(chunks)))
    pool = ThreadPoolExecutor(workers)

    def shard(j: int) -> list[torch.Tensor]:
        torch.set_num_threads(1)
        total = [torch.zeros_like(p) for p in params]
        for c in chunks[j::workers]:
            loss = loss_fn(model(images[c]), labels[c]).sum() / len(images)
            for t, g in zip(total, torch.autograd.grad(loss, params), strict=True):
                t.add_(g)
        return total

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        try:
            parts = list(pool.map(shard, range(workers)))
        finally:
            torch.set_num_threads(threads)
        for p, *gs in zip(params, *parts, strict=True):
            p.grad = torch.stack(gs).sum(0)
        opt.step()

    return step


def ghost_step(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> Callable[[], None]:
    """Opacus's fast-gradient-clipping recipe (DPTensorFastGradientClipping.backward), unrolled:
    a backward pass for the per-sample norms, then one on the loss reweighted by the clip
    coefficients; then Gaussian noise on the sum and the average over the batch."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    from privseg.config import PrivacyConfig

    clip = PrivacyConfig().max_grad_norm
    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="sum", max_grad_norm=clip, use_ghost_clipping=True
    )
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        per_sample = loss_fn(gsm(images), labels)
        with warnings.catch_warnings():  # images never require grad
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            per_sample.sum().backward(retain_graph=True)
            coef = gsm.get_clipping_coef()
            opt.zero_grad(set_to_none=True)
            gsm.disable_hooks()
            (coef * per_sample).sum().backward()
        gsm.enable_hooks()
        for p in params:
            p.grad = (p.grad + torch.randn_like(p) * clip) / len(images)
        opt.step()

    return step


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024.0  # kB
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so import/build peaks are not counted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cuda_extra_peak_mb(step: Callable[[], None]) -> float:
    """Extra peak GPU memory (MB) of two steps over what was allocated before them."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def memory_child(variant: str, args: argparse.Namespace) -> None:
    """Run in a fresh process: print the extra peak RSS (MB) of a few steps of ``variant``."""
    import gc

    step = make_step(variant, args)
    gc.collect()
    if _reset_peak():
        base, method = _status_mb("VmRSS"), "VmHWM after clear_refs"
    else:  # ru_maxrss cannot be reset: import peaks may hide the step's own memory
        base, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "ru_maxrss"
    for _ in range(2):
        step()
    peak = (
        _status_mb("VmHWM")
        if method.startswith("VmHWM")
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    )
    print(
        json.dumps({"variant": variant, "extra_mb": peak - base, "base_mb": base, "method": method})
    )


def measure_memory(variant: str, args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--child", variant, *child_args(args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["extra_mb"])


def child_args(args: argparse.Namespace) -> list[str]:
    return [
        "--model", args.model, "--features", str(args.features), "--batch", str(args.batch),
        "--threads", str(args.threads), "--resolution", str(args.resolution),
        "--device", args.device, *(["--chunk", str(args.chunk)] if args.chunk else []),
    ]  # fmt: skip


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_resolution(args: argparse.Namespace) -> dict:
    variants = args.variants
    steps = {v: make_step(v, args) for v in variants}
    for _ in range(args.warmup):
        for v in variants:
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:  # interleaved: load changes hit every variant alike
            _sync(args.device)
            t = time.perf_counter()
            steps[v]()
            _sync(args.device)
            times[v].append(time.perf_counter() - t)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    if args.no_memory:
        mem = {}
    elif args.device.startswith("cuda"):
        mem = {v: cuda_extra_peak_mb(steps[v]) for v in variants}
    else:
        mem = {v: measure_memory(v, args) for v in variants}
    fastest = min((v for v in variants if v in NONPRIVATE), key=med.__getitem__)
    return {"resolution": args.resolution, "median_s": med, "extra_peak_mb": mem,
            "fastest_nonprivate": fastest}  # fmt: skip


def print_table(r: dict) -> None:
    base = r["median_s"][r["fastest_nonprivate"]]
    for v, t in r["median_s"].items():
        mem = r["extra_peak_mb"].get(v, float("nan"))
        mark = " *" if v == r["fastest_nonprivate"] else ""
        print(f"{r['resolution']:>5} {v:>12} {t:>9.3f} {t / base:>9.2f} {mem:>9.1f}{mark}",
              flush=True)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unet")
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--resolution", type=int, nargs="+", default=[64])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads (all cores)"
    )
    ap.add_argument(
        "--chunk", type=int, default=None, help="slices per batched chunk (default: by size)"
    )
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
        help="a subset (at least one non-private and the default DP path)",
    )  # fmt: skip
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return ap


def run(args: argparse.Namespace) -> dict:
    """Print the table for every resolution; return the summary (also bench/gpu_session.py)."""
    from privseg.config import DataConfig, PrivacyConfig
    from privseg.core.device import describe_device, resolve_device
    from privseg.privacy.dp_sgd import resolve_grad_path

    device = resolve_device(args.device, field="--device")
    args.device = str(device)
    default_path = "dp-" + resolve_grad_path(PrivacyConfig().grad_path, device)
    if default_path not in args.variants or not set(args.variants) & set(NONPRIVATE):
        raise ValueError(f"--variants must include {default_path} and a non-private variant")
    results = []
    resolutions = list(args.resolution)
    print(f"model={args.model} batch={args.batch} threads={args.threads} repeats={args.repeats} "
          f"device={describe_device(device)} chunk={args.chunk or 'by size'}")  # fmt: skip
    print(f"{'res':>5} {'variant':>12} {'median s':>9} {'x fastest':>9} {'extra MB':>9}")
    for res in resolutions:
        args.resolution = res
        results.append(bench_resolution(args))
        print_table(results[-1])  # as each resolution finishes: 256^2 takes long
    args.resolution = resolutions
    # the summary is for the default resolution when it was measured
    default_res = DataConfig().resolution
    last = next((r for r in results if r["resolution"] == default_res), results[0])
    fast = last["fastest_nonprivate"]
    mem = last["extra_peak_mb"]
    opacus = last["median_s"].get("dp-opacus")
    return {
        "model": args.model,
        "resolution": last["resolution"],
        "batch": args.batch,
        "threads": args.threads,
        "chunk": args.chunk,
        "default_path": default_path.removeprefix("dp-"),
        "fastest_nonprivate": fast,
        "time_ratio": last["median_s"][default_path] / last["median_s"][fast],
        "device": args.device,
        "device_name": describe_device(device),
        "time_ratio_opacus": None if opacus is None else opacus / last["median_s"][fast],
        "memory_ratio": (mem[default_path] / mem[fast]) if mem and mem[fast] > 0 else None,
        "memory_ratio_opacus": (
            mem["dp-opacus"] / mem[fast] if "dp-opacus" in mem and mem[fast] > 0 else None
        ),
        "results": results,
    }


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        args.resolution = args.resolution[0]
        memory_child(args.child, args)
        return
    try:
        summary = run(args)
    except ValueError as exc:
        ap.error(str(exc))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
