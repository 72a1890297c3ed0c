"""The benchmarks' contracts: the JSON last line, and that the non-private baselines compute
the same gradient (a faster baseline that computed something else would flatter DP-SGD)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dp_step_prints_the_summary_json_last() -> None:
    cmd = [sys.executable, str(BENCH / "dp_step.py"), "--resolution", "16", "--batch", "4",
           "--features", "4", "--repeats", "1", "--warmup", "0", "--threads", "1",
           "--variants", "plain", "shard4", "dp-loop", "dp-batched"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["default_path"] == "batched" and summary["resolution"] == 16
    assert summary["fastest_nonprivate"] in {"plain", "shard4"}
    assert summary["time_ratio"] > 0 and summary["memory_ratio"] > 0
    assert set(summary["results"][0]["median_s"]) == {"plain", "shard4", "dp-loop", "dp-batched"}


def test_dp_timing_prints_both_modes_json_last() -> None:
    cmd = [sys.executable, str(BENCH / "dp_timing.py"), "--resolution", "16", "--features", "4",
           "--steps", "4", "--warmup", "0", "--units", "40", "--batch", "4", "--run-steps", "20",
           "--threads", "1", "--paths", "loop"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    (result,) = json.loads(out.strip().splitlines()[-1])["results"]
    assert result["path"] == "loop" and result["units_cap"] > 4 and result["cost"] > 0
    for mode in ("unpadded", "padded"):
        assert result[mode]["median_s"] > 0 and 0 <= result[mode]["recovered_within_1"] <= 4


@pytest.mark.parametrize("variant", ["micro4", "shard4", "shard1"])
def test_nonprivate_baselines_compute_the_plain_gradient(variant: str) -> None:
    dp_step = _load("dp_step")
    args = dp_step.argparse.Namespace(
        model="unet",
        features=4,
        resolution=16,
        batch=8,
        threads=torch.get_num_threads(),
        device="cpu",
    )
    grads = {}
    for v in ("plain", variant):
        step = dp_step.make_step(v, args)
        step()  # same seed, same model and batch; the gradient stays in p.grad
        grads[v] = [p.grad.clone() for p in step.model.parameters()]
    for a, b in zip(grads["plain"], grads[variant], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_federation_prints_paired_overheads_json_last() -> None:
    cmd = [sys.executable, str(BENCH / "federation.py"), "--rounds", "2", "--local-steps", "1",
           "--sites", "2", "--resolution", "16", "--repeats", "2", "--skip-deployment"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    runs = summary["simulation_overhead_runs"]
    assert len(runs) == 2 and all(r > -1.0 for r in runs)
    assert summary["simulation_overhead"] == pytest.approx(sum(runs) / 2)  # median of two
    assert summary["deployment_seconds_per_round_overhead"] is None
    assert set(summary["seconds_per_round"]) == {"plain", "simulation"}
    assert "simulation overhead per pair" in out


@pytest.mark.slow
def test_gpu_session_runs_every_section_tiny_on_the_cpu(tmp_path: Path) -> None:
    """The one script a GPU session runs, in its --tiny mode on the CPU, through its shell
    wrapper: a typo must not cost the GPU's few minutes."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "WHEELS": "none"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH.parent / "src"),
                                                      env.get("PYTHONPATH")]))  # fmt: skip
    cmd = ["bash", str(BENCH / "gpu_session.sh"), "--device", "cpu", "--tiny"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900,
                   cwd=BENCH.parent, env=env)  # fmt: skip
    record = json.loads((tmp_path / "gpu_session.json").read_text())
    sections = record["sections"]
    assert list(sections) == ["env", "tests", "noise", "dp_step", "study", "chunks"]
    assert not [name for name, s in sections.items() if "error" in s or "skipped" in s]
    assert sections["tests"]["returncode"] == 0
    for model in ("monet", "unet"):  # sigma * C = 0.38 * 1.2, both ways of drawing
        row = sections["noise"][model]
        assert row["cpu_draw_copy_std"] == pytest.approx(0.456, rel=0.05)
        assert row["device_draw_std"] == pytest.approx(0.456, rel=0.05)
    for model in ("monet", "unet"):
        summary = sections["dp_step"][model]
        assert summary["default_path"] == "batched" and summary["device"] == "cpu"
        assert set(summary["results"][0]["median_s"]) == {
            "plain", "micro4", "micro8", "dp-batched", "dp-loop", "dp-opacus", "dp-functorch",
            "dp-ghost"}  # fmt: skip
        assert sections["chunks"]["2"][model]["chunk"] == 2
    run = sections["study"]["runs"]["cpu"]
    assert run["device"] == "cpu" and run["slices_per_second"] > 0 and 0 <= run["dice"] <= 1
    assert (tmp_path / "gpu_session.log").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_session.json", "gpu_session.log"]
