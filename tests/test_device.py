"""`train.device` / `--device`: one resolver, the CPU path unchanged, CUDA where there is one.

CUDA-only tests skip on machines without a GPU; everything else runs the device code path on
the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import TinyNet, per_sample_loss
from privseg.cli.app import app
from privseg.config import Config
from privseg.core.device import describe_device, resolve_device
from privseg.core.errors import ConfigError
from privseg.privacy.dp_sgd import (
    AUTO_GRAD_PATH,
    GRAD_PATHS,
    DPGradient,
    chunk_slices_for,
    resolve_grad_path,
)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
runner = CliRunner()


# ---- the resolver ---------------------------------------------------------------------------
def test_auto_is_the_first_gpu_or_the_cpu() -> None:
    expected = torch.device("cuda", 0) if CUDA else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert Config().train.device == "auto"


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:0 ", "mps", ""])
def test_bad_device_names_are_refused_naming_the_field(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.device = .* is invalid: allowed values"):
        Config().replace(**{"train.device": bad})
    with pytest.raises(ConfigError, match=r"--device = .* is invalid"):
        resolve_device(bad, field="--device")


def test_cuda_is_refused_clearly_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(ConfigError, match=f"train.device = '{name}' is invalid on this mac"):
            resolve_device(name)
    assert resolve_device("auto") == torch.device("cpu")


def test_gpu_index_is_checked_and_always_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"it has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    assert describe_device(torch.device("cuda", 1)) == "cuda:1 (Fake GPU 1)"
    assert describe_device(torch.device("cpu")) == "cpu"


def test_grad_path_auto_by_device() -> None:
    assert Config().privacy.grad_path == "auto"
    assert resolve_grad_path("auto", torch.device("cpu")) == "batched"  # the measured CPU one
    assert resolve_grad_path("auto", torch.device("cuda", 0)) == AUTO_GRAD_PATH["cuda"]
    assert set(AUTO_GRAD_PATH.values()) <= set(GRAD_PATHS)
    for path in GRAD_PATHS:  # an explicit path is kept on any device
        assert resolve_grad_path(path, torch.device("cuda", 0)) == path
    with pytest.raises(ConfigError, match="privacy.grad_path = 'fast'"):
        Config().replace(**{"privacy.grad_path": "fast"})


# ---- the CPU path is the old one ------------------------------------------------------------
def _dp_grads(
    device: str, path: str, *, sigma: float = 0.0, gen: torch.Generator | None = None
) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = TinyNet().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 8, 8, generator=g).to(device)
    y = (torch.rand(6, 1, 8, 8, generator=g) > 0.6).float().to(device)
    dp = DPGradient(
        max_grad_norm=0.05,
        noise_multiplier=sigma,
        expected_batch_size=4.0,
        grad_path=path,
        generator=gen,
    )
    dp(model, per_sample_loss, x, y, np.array([0, 0, 1, 2, 2, 3]))
    return [p.grad.detach().cpu() for p in model.parameters()]


def test_auto_on_cpu_is_the_batched_path_bit_for_bit() -> None:
    auto = _dp_grads("cpu", "auto", sigma=1.0, gen=torch.Generator().manual_seed(5))
    batched = _dp_grads("cpu", "batched", sigma=1.0, gen=torch.Generator().manual_seed(5))
    for a, b in zip(auto, batched, strict=True):
        assert torch.equal(a, b)


def test_own_noise_generator_lives_on_the_parameters_device() -> None:
    """Without a given generator, the noise comes from an OS-seeded one on the parameters'
    device: never the same twice, never the experiment seed's."""
    dp = DPGradient(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=1.0)
    ref = torch.zeros(10_000)
    a, b = dp._noise(1.0, ref), dp._noise(1.0, ref)
    assert not torch.equal(a, b) and abs(float(a.std()) - 1.0) < 0.05
    assert list(dp._own_generators) == [torch.device("cpu")]
    assert dp._own_generators[torch.device("cpu")].device == torch.device("cpu")
    other = DPGradient(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=1.0)
    assert not torch.equal(other._noise(1.0, ref), a)


def test_trainer_moves_to_its_device_and_hands_out_cpu_weights(phantom_cache) -> None:
    cfg = Config().replace(**{"data.resolution": 32, "model.features": 8, "train.batch_size": 4})
    split = phantom_cache.split(phantom_cache.sites[0], "train")
    from privseg.training.trainer import SiteTrainer

    runs = {}
    for device in ("cpu", "auto"):
        trainer = SiteTrainer(cfg.replace(**{"train.device": device}), name="a", train=split)
        state, _ = trainer.fit(None, 2)
        assert trainer.device == resolve_device(device)
        assert all(v.device == torch.device("cpu") for v in state.values())
        runs[device] = state
    if not CUDA:  # auto is the CPU here: the same numbers
        assert all(torch.equal(runs["cpu"][k], runs["auto"][k]) for k in runs["cpu"])


def _checkpoint_and_volume(tmp_path):
    import nibabel as nib

    from privseg.models import build_model
    from privseg.models.checkpoint import save_checkpoint

    cfg = Config().replace(**{"data.resolution": 32, "model.features": 8})
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "c.pt", build_model(cfg.model).state_dict(), cfg)
    data = np.random.default_rng(0).normal(0, 300, size=(40, 36, 5)).astype(np.float32)
    image = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), image)
    return ckpt, image


def test_predict_on_the_cpu_device_is_the_default_prediction(tmp_path) -> None:
    import nibabel as nib

    from privseg.inference import segment_nifti

    ckpt, image = _checkpoint_and_volume(tmp_path)
    masks = []
    for name, kwargs in (("default", {}), ("cpu", {"device": "cpu"})):
        segment_nifti(ckpt, image, tmp_path / f"{name}.nii.gz", **kwargs)
        masks.append(np.asarray(nib.load(tmp_path / f"{name}.nii.gz").dataobj))
    np.testing.assert_array_equal(masks[0], masks[1])


# ---- the CLI ---------------------------------------------------------------------------------
@no_cuda
@pytest.mark.parametrize("command", ["train", "run", "predict", "attack"])
def test_cli_device_cuda_exits_2_without_a_gpu(command: str, tmp_path) -> None:
    args = {
        "train": ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r")],
        "run": ["run", "--data", str(tmp_path), "--out", str(tmp_path / "s")],
        "predict": [
            "predict",
            "--checkpoint",
            str(tmp_path / "c.pt"),
            "--image",
            str(tmp_path / "ct.nii.gz"),
            "--out",
            str(tmp_path / "m.nii.gz"),
        ],
        "attack": ["attack", str(tmp_path / "run"), "--site", "a"],
    }[command]
    result = runner.invoke(app, [*args, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "'cuda' is invalid on this machine: torch sees no CUDA GPU" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_cli_bad_device_name_exits_2_naming_the_field(tmp_path) -> None:
    args = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--device", "gpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "train.device = 'gpu' is invalid" in result.output


@no_cuda
def test_site_refuses_a_gpu_it_lacks_before_starting(tmp_path) -> None:
    from privseg.federated.site import site_policy

    with pytest.raises(ConfigError, match="train.device = 'cuda:0' is invalid on this machine"):
        site_policy(tmp_path / "site", None, 4.0, "cuda:0")
    assert not (tmp_path / "site").exists()
    path = site_policy(tmp_path / "site", None, 4.0, "cpu")
    assert Config.load(path).train.device == "cpu"


def test_a_deployed_site_trains_on_its_own_device(tmp_path, flower_task_identity) -> None:
    """The server's config names a device; the site's own (site-privacy.toml) wins."""
    from privseg.federated import client_app as ca
    from privseg.federated import messages as M

    own = tmp_path / "site-privacy.toml"
    own.write_text(
        Config().replace(**{"train.device": "cpu", "privacy.budget_epsilon": 5.0}).to_toml()
    )
    server = Config().replace(**{"train.device": "cuda:3"})
    settings = ca.SiteSettings(site="a", data_dir=tmp_path, out_dir=tmp_path, privacy_config=own)
    seen = []

    def factory(cfg, settings, *, planned_steps, run_id):
        seen.append(cfg.train.device)
        return object()

    config = {M.CFG_TOML: server.to_toml(), M.CFG_RUN_ID: "r", M.CFG_PLANNED_STEPS: 4}
    cfg, _ = ca.get_trainer(config, settings, factory)
    assert cfg.train.device == "cpu" and seen == ["cpu"]
    ca.release_trainers("r")
    assert not [k for k in ca._TRAINERS if k[0] == "r"]


# ---- CUDA (skipped without a GPU) ------------------------------------------------------------
@pytest.fixture
def exact_cuda():
    """Full float32 on the GPU (no TF32 in convolutions), to compare with the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@needs_cuda
@pytest.mark.parametrize("path", GRAD_PATHS)
def test_cuda_dp_gradient_equals_the_cpu_one(path: str, exact_cuda) -> None:
    gen = {"cpu": torch.Generator().manual_seed(7), "cuda": torch.Generator().manual_seed(7)}
    cpu = _dp_grads("cpu", path, sigma=0.5, gen=gen["cpu"])  # the same CPU noise, copied
    gpu = _dp_grads("cuda", path, sigma=0.5, gen=gen["cuda"])
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@needs_cuda
def test_cuda_noise_is_drawn_on_the_gpu() -> None:
    dp = DPGradient(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=1.0)
    ref = torch.zeros(100_000, device="cuda")
    noise = dp._noise(2.0, ref)
    assert noise.device == ref.device
    assert abs(float(noise.std()) - 2.0) < 0.05 and abs(float(noise.mean())) < 0.05
    assert dp._own_generators[ref.device].device.type == "cuda"
    assert chunk_slices_for(torch.zeros(1, 1, 256, 256, device="cuda")) >= 1


@needs_cuda
def test_cuda_training_evaluation_and_checkpoint(phantom_cache, tmp_path, exact_cuda) -> None:
    from privseg.models.checkpoint import load_checkpoint, save_checkpoint
    from privseg.training.trainer import SiteTrainer

    cfg = Config().replace(**{"data.resolution": 32, "model.features": 8})
    site = phantom_cache.sites[0]
    split = phantom_cache.split(site, "train")
    states, dice = {}, {}
    for device in ("cpu", "cuda"):
        trainer = SiteTrainer(
            cfg.replace(**{"train.device": device}),
            name="a",
            train=split,
            test=phantom_cache.split(site, "test"),
        )
        states[device], _ = trainer.fit(None, 2)
        dice[device] = trainer.evaluate(None, "test")["dice"]
    for k in states["cpu"]:
        torch.testing.assert_close(states["cuda"][k], states["cpu"][k], rtol=1e-3, atol=1e-5)
    assert dice["cuda"] == pytest.approx(dice["cpu"], abs=0.02)
    path = save_checkpoint(tmp_path / "c.pt", states["cuda"], cfg)
    model, _, _ = load_checkpoint(path, torch.device("cuda", 0))
    assert next(model.parameters()).device.type == "cuda"


@needs_cuda
def test_cuda_prediction_equals_the_cpu_one(tmp_path, exact_cuda) -> None:
    import nibabel as nib

    from privseg.inference import segment_nifti

    ckpt, image = _checkpoint_and_volume(tmp_path)
    for device in ("cpu", "cuda"):
        segment_nifti(ckpt, image, tmp_path / f"{device}.nii.gz", device=device)
    cpu, gpu = (np.asarray(nib.load(tmp_path / f"{d}.nii.gz").dataobj) for d in ("cpu", "cuda"))
    assert (cpu != gpu).mean() < 1e-3  # a logit at the threshold may flip
