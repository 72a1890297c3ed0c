"""One GPU session (issue 18): every number docs/GPU.md still lacks, as JSON, in one run.

Sections, most important first; after each one the whole record is rewritten to
``OUT/gpu_session.json`` (``OUT``: ``--out``, else ``$OUT``, else ``./gpu-out``), so a run cut
short by its time limit keeps what it measured. A section that fails records its error and
the next one runs; one that would start after ``--budget-s`` is recorded as skipped.

  env        python, torch, CUDA, the GPU, TF32 flags, which dependencies import
  tests      the CUDA tests of tests/test_device.py (CUDA DP gradients == CPU ones, ...)
  noise      the DP noise of one step: drawn on the CPU and copied vs drawn on the device
             (DPGradient with a CPU generator vs its own generator on the device), ms per
             step for MoNet's and U-Net's parameters, and the device noise's std
  dp_step    bench/dp_step.py's table for MoNet and U-Net at 64/128/256 px, batch 32: the
             non-private baselines and every DP path (batched, loop, opacus, functorch,
             ghost), median step time and extra peak memory
  study      bench/study_gpu.py, the paper preset, on the device and then briefly on the CPU
             (the same phantom and cache): slices/s, s/round, Dice, and the slices/s ratio
  chunks     dp-batched with 4/8/16/32 slices per chunk (CUDA_CHUNK_PIXELS is provisional)

    bash bench/gpu_session.sh                      # on the GPU machine (see docs/GPU.md)
    python bench/gpu_session.py --device cpu --tiny  # the same code path on a CPU, ~2 min
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DP_PATHS = ["dp-batched", "dp-loop", "dp-opacus", "dp-functorch", "dp-ghost"]
BASELINES = ["plain", "micro4", "micro8"]  # shard* are CPU-thread baselines
#: the real run; --tiny replaces it (the same code path in about two minutes on a CPU)
FULL = {
    "models": ["monet", "unet"], "resolutions": [64, 128, 256], "batch": 32, "features": 16,
    "repeats": 5, "warmup": 2, "chunks": [4, 8, 16, 32], "chunk_repeats": 3,
    "noise_repeats": 20, "study": ["--sites", "3", "--patients", "40", "--rounds", "20"],
    "cpu_study": ["--rounds", "2"], "memory": True,
}  # fmt: skip
TINY = {
    "models": ["monet", "unet"], "resolutions": [16], "batch": 4, "features": 4,
    "repeats": 1, "warmup": 0, "chunks": [1, 2], "chunk_repeats": 1, "noise_repeats": 2,
    "study": ["--tiny"], "cpu_study": ["--tiny", "--rounds", "1"], "memory": False,
}  # fmt: skip


def load(name: str) -> Any:
    """A benchmark script of this folder, as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` in ms (the device synchronised around each call)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# ---- sections ------------------------------------------------------------------------------
def env(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    found = {}
    for module in ("opacus", "nibabel", "flwr", "flwr.simulation", "scipy", "ray"):
        try:
            importlib.import_module(module)
            found[module] = "ok"
        except Exception as exc:  # an image without it: record, do not stop
            found[module] = f"{type(exc).__name__}: {exc}"
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "imports": found,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update({"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30,
                    "multiprocessors": props.multi_processor_count})  # fmt: skip
    return out


def tests(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The CUDA tests (they skip without a GPU, and then this records that they skipped)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_device.py"), "-k", "cuda"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"returncode": proc.returncode, "summary": tail[-1] if tail else "", "tail": tail}


def noise(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """What one step's noise costs: drawn on the CPU and copied, or drawn on the device."""
    from privseg.privacy.dp_sgd import DPGradient
    from privseg.privacy.sampling import secure_generator

    dp_step = load("dp_step")
    out = {}
    for name in args.sizes["models"]:
        params = [p for p in dp_step.build(name, 16).to(device).parameters() if p.requires_grad]
        kinds = {"cpu_draw_copy": secure_generator("cpu"), "device_draw": None}
        row: dict[str, Any] = {"parameters": sum(p.numel() for p in params)}
        for kind, gen in kinds.items():
            dp = DPGradient(max_grad_norm=1.2, noise_multiplier=0.38, expected_batch_size=32,
                            generator=gen)  # fmt: skip

            def draw(
                dp: DPGradient = dp, params: list[torch.Tensor] = params
            ) -> list[torch.Tensor]:
                return [dp._noise(0.456, p) for p in params]

            row[f"{kind}_ms"] = timed_ms(draw, device, args.sizes["noise_repeats"])
            drawn = torch.cat([n.flatten() for n in draw()])
            row[f"{kind}_std"] = float(drawn.std())  # sigma * C = 0.456
            row[f"{kind}_on"] = str(drawn.device)
        out[name] = row
        print(f"noise {name}: {row}", flush=True)
    return out


def dp_step_table(
    args: argparse.Namespace, device: torch.device, *, variants: list[str], chunk: int | None
) -> dict[str, Any]:
    """bench/dp_step.py's summaries, one per model (its table printed as it goes)."""
    dp_step = load("dp_step")
    sizes = args.sizes
    out = {}
    for model in sizes["models"]:
        if over_budget(args):
            out[model] = {"skipped": "over the time budget"}
            continue
        repeats = sizes["chunk_repeats"] if chunk else sizes["repeats"]
        argv = ["--model", model, "--device", str(device), "--batch", str(sizes["batch"]),
                "--features", str(sizes["features"]), "--repeats", str(repeats),
                "--warmup", str(sizes["warmup"]), "--resolution", *map(str, sizes["resolutions"]),
                "--variants", *variants]  # fmt: skip
        if chunk:
            argv += ["--chunk", str(chunk)]
        if not sizes["memory"]:
            argv.append("--no-memory")
        out[model] = dp_step.run(dp_step.parser().parse_args(argv))
    return out


def dp_steps(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    return dp_step_table(args, device, variants=BASELINES + DP_PATHS, chunk=None)


def study(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The paper preset on the device, then on the CPU (same phantom and cache)."""
    study_gpu = load("study_gpu")
    # not under OUT: only a few small files may come back from the GPU machine
    work = Path(tempfile.mkdtemp(prefix="privseg-gpu-study-"))
    runs = {}
    plans = [(str(device), args.sizes["study"])]
    if device.type != "cpu":
        plans.append(("cpu", args.sizes["cpu_study"]))
    for name, extra in plans:
        if over_budget(args):
            runs[name] = {"skipped": "over the time budget"}
            continue
        argv = ["--device", name, "--work", str(work), *extra]
        runs[name] = study_gpu.run(study_gpu.parser().parse_args(argv))
    gpu, cpu = runs.get(str(device), {}), runs.get("cpu", {})
    ratio = None
    if gpu.get("slices_per_second") and cpu.get("slices_per_second"):
        ratio = gpu["slices_per_second"] / cpu["slices_per_second"]
    return {"runs": runs, "slices_per_second_ratio": ratio}


def chunks(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    out = {}
    for chunk in args.sizes["chunks"]:
        if over_budget(args):
            out[str(chunk)] = {"skipped": "over the time budget"}
            continue
        out[str(chunk)] = dp_step_table(args, device, variants=["plain", "dp-batched"],
                                        chunk=chunk)  # fmt: skip
    return out


SECTIONS: dict[str, Callable[[argparse.Namespace, torch.device], dict[str, Any]]] = {
    "env": env,
    "tests": tests,
    "noise": noise,
    "dp_step": dp_steps,
    "study": study,
    "chunks": chunks,
}


# ---- the session ---------------------------------------------------------------------------
def over_budget(args: argparse.Namespace) -> bool:
    return time.perf_counter() - args.started > args.budget_s


def write(record: dict[str, Any], out: Path) -> None:
    tmp = out / "gpu_session.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(out / "gpu_session.json")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu or auto")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-out"))
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no section after")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: check the script on a CPU")
    ap.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = ap.parse_args(argv)
    args.started = time.perf_counter()
    args.sizes = TINY if args.tiny else FULL
    from privseg.core.device import resolve_device

    device = resolve_device(args.device, field="--device")
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"device": str(device), "tiny": args.tiny, "sizes": args.sizes,
                              "budget_s": args.budget_s, "sections": {}}  # fmt: skip
    for name in args.only:
        elapsed = time.perf_counter() - args.started
        if elapsed > args.budget_s:
            record["sections"][name] = {"skipped": f"over the {args.budget_s:.0f} s budget"}
            continue
        print(f"== {name} (at {elapsed:.0f} s)", flush=True)
        t = time.perf_counter()
        try:
            result = SECTIONS[name](args, device)
        except Exception as exc:  # record it; the next section still runs
            traceback.print_exc()
            buf = io.StringIO()
            traceback.print_exc(file=buf)
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": buf.getvalue()}
        result["seconds"] = time.perf_counter() - t
        record["sections"][name] = result
        record["wall_seconds"] = time.perf_counter() - args.started
        write(record, args.out)
        print(f"== {name}: {result['seconds']:.0f} s", flush=True)
    print(f"wrote {args.out / 'gpu_session.json'}")
    return record


if __name__ == "__main__":
    main()
