"""DP-SGD gradient: clipping, noise, loop == opacus == naive reference, empty batches, sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from conftest import TinyNet, per_sample_loss
from privseg.privacy.dp_sgd import GRAD_PATHS, DPGradient, chunk_slices_for
from privseg.privacy.per_sample import per_sample_grads
from privseg.privacy.sampling import PoissonUnitSampler, secure_generator
from privseg.privacy.unit_grads import chunks as _chunks


def zero_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.0 * logits.sum((1, 2, 3))


def make_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = (torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64) > 0.6).double()
    return images, labels


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().double()


def unit_grads(model, images, labels, groups) -> list[list[torch.Tensor]]:
    """Naive micro-batch reference: one separate backward per unit, summed slice losses."""
    out = []
    for u in np.unique(groups):
        model.zero_grad()
        sel = torch.as_tensor(np.flatnonzero(groups == u))
        per_sample_loss(model(images[sel]), labels[sel]).sum().backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
    model.zero_grad()
    return out


def flat_norm(grads: list[torch.Tensor]) -> float:
    return float(torch.cat([g.reshape(-1) for g in grads]).norm())


def reference(model, images, labels, groups, *, clip: float, expected: float) -> list[torch.Tensor]:
    total = [torch.zeros_like(p) for p in model.parameters()]
    for grads in unit_grads(model, images, labels, groups):
        factor = min(1.0, clip / (flat_norm(grads) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    return [t / expected for t in total]


def dp_grads(
    model, path, images, labels, groups, *, clip, sigma=0.0, expected=1.0, gen=None, chunk=8
):
    dp = DPGradient(
        max_grad_norm=clip,
        noise_multiplier=sigma,
        expected_batch_size=expected,
        grad_path=path,
        chunk_slices=chunk,
        generator=gen,
    )
    stats = dp(model, per_sample_loss, images, labels, groups)
    return [p.grad.detach().clone() for p in model.parameters()], stats


GROUPINGS = {
    "slice": np.arange(10),
    "patient": np.array([7, 3, 7, 1, 3, 3, 9, 7, 1, 4]),  # 5 patients, interleaved, non-dense ids
}


@pytest.mark.parametrize("unit", list(GROUPINGS))
@pytest.mark.parametrize("path", GRAD_PATHS)
def test_paths_match_naive_reference(unit: str, path: str) -> None:
    model = make_model()
    images, labels = make_batch(10)
    groups = GROUPINGS[unit]
    norms = [flat_norm(g) for g in unit_grads(model, images, labels, groups)]
    clip = float(np.median(norms))  # some units clipped, some not
    assert min(norms) < clip < max(norms) or min(norms) == clip
    ref = reference(model, images, labels, groups, clip=clip, expected=4.0)
    got, stats = dp_grads(model, path, images, labels, groups, clip=clip, expected=4.0)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-8)
    assert stats["units"] == len(np.unique(groups))
    expected_loss = float(per_sample_loss(model(images), labels).mean().detach())
    assert stats["loss"] == pytest.approx(expected_loss, rel=1e-10)
    assert stats["clipped_fraction"] == pytest.approx(np.mean(np.array(norms) > clip))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("path", "chunk"), [("loop", 1)] + [("batched", c) for c in (1, 2, 3, 64)])
def test_sharded_paths_are_exact_and_restore_threads(path: str, threads: int, chunk: int) -> None:
    """The loop and batched paths shard work over torch's thread count: same result for any
    count and any chunk size (patients of 1-3 slices, so some patients exceed a chunk;
    partial sums are added in a fixed order), and the caller's thread setting survives."""
    saved = torch.get_num_threads()
    model = make_model()
    params = list(model.parameters())
    images, labels = make_batch(10)
    groups = GROUPINGS["patient"]
    ref = reference(model, images, labels, groups, clip=0.05, expected=4.0)
    try:
        torch.set_num_threads(threads)
        got, stats = dp_grads(
            model, path, images, labels, groups, clip=0.05, expected=4.0, chunk=chunk
        )
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(saved)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    assert stats["units"] == 5
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]


def test_chunk_size_follows_slice_size() -> None:
    """Chunks of 4 slices at 64x64; from 128x128 on one slice is enough work per pass."""
    sizes = {r: chunk_slices_for(torch.zeros(2, 1, r, r)) for r in (16, 64, 128, 256)}
    assert sizes == {16: 64, 64: 4, 128: 1, 256: 1}


def test_chunks_hold_whole_units() -> None:
    groups = torch.tensor([0, 1, 1, 1, 1, 1, 2, 2, 3, 4, 4, 4])  # unit 1 (5 slices) > chunk
    chunks = _chunks(groups, 5, 3)
    assert chunks == [[0], [1], [2, 3], [4]]
    counts = torch.bincount(groups)
    assert all(len(c) == 1 or int(counts[c].sum()) <= 3 for c in chunks)
    assert _chunks(torch.arange(5), 5, 8) == [[0, 1, 2, 3, 4]]


class Everything(nn.Module):
    """Every op ``per_sample_grads`` records: strided, dilated, grouped and biased convs, a
    conv used twice, GroupNorm with and without affine, Linear on [B, T, F], a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=2, dilation=2)
        self.b = nn.Conv2d(4, 4, 4, stride=2, padding=1, groups=2, bias=False)
        self.norm = nn.GroupNorm(2, 4)
        self.plain_norm = nn.GroupNorm(2, 4, affine=False)
        self.shared = nn.Conv2d(4, 4, 1)
        self.frozen = nn.Conv2d(4, 4, 3, padding=1)
        self.frozen.requires_grad_(False)
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.b(self.a(x))))
        h = self.shared(torch.tanh(self.shared(self.plain_norm(self.frozen(h)))))
        tokens = h.flatten(2).transpose(1, 2)  # [B, T, 4]
        out = self.fc(tokens).transpose(1, 2).reshape(x.shape[0], 1, *h.shape[2:])
        return F.interpolate(out, scale_factor=2.0)


def test_per_sample_grads_equal_single_sample_backward() -> None:
    torch.manual_seed(0)
    model = Everything().double()
    images, labels = make_batch(5, seed=8)
    images.requires_grad_(True)  # another leaf: must not receive a gradient
    params = [p for p in model.parameters() if p.requires_grad]
    grads, losses = per_sample_grads(model, per_sample_loss, images, labels, params)
    assert all(p.grad is None for p in model.parameters())  # nothing summed into p.grad
    assert images.grad is None
    for i in range(5):
        loss = per_sample_loss(model(images[i : i + 1]), labels[i : i + 1]).sum()
        assert float(losses[i]) == pytest.approx(float(loss.detach()), rel=1e-12)
        for g, r in zip(grads, torch.autograd.grad(loss, params), strict=True):
            torch.testing.assert_close(g[i], r, rtol=0, atol=1e-12)


def test_per_sample_grads_refuse_unrecorded_ops_on_parameters() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.scale = nn.Parameter(torch.ones(1, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * self.scale  # a parameter outside conv/norm/linear

    model = Scaled().double()
    images, labels = make_batch(2)
    with pytest.raises(ValueError, match="mul.*grad_path 'loop'"):
        per_sample_grads(model, per_sample_loss, images, labels, list(model.parameters()))
    # the loop path handles any model
    got, _ = dp_grads(model, "loop", images, labels, np.arange(2), clip=1.0)
    assert len(got) == 3


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("path", ["batched", "loop"])
def test_our_paths_equal_opacus_dp_optimizer(path: str) -> None:
    """Slice units, no noise: our gradient is exactly Opacus's DPOptimizer gradient."""
    images, labels = make_batch(6, seed=1)
    model = make_model(1)
    ours, _ = dp_grads(model, path, images, labels, np.arange(6), clip=0.05, expected=5.0)
    gsm = GradSampleModule(make_model(1), loss_reduction="sum")
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=0.05,
        expected_batch_size=5,
        loss_reduction="mean",
    )
    # loss_reduction "mean": Opacus divides the clipped sum by expected_batch_size.
    gsm_loss = per_sample_loss(gsm(images), labels).sum()
    gsm_loss.backward()
    opt.pre_step()
    for o, p in zip(ours, gsm.parameters(), strict=True):
        torch.testing.assert_close(o, p.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("path", GRAD_PATHS)
def test_each_unit_clipped_to_c_and_small_untouched(path: str) -> None:
    model = make_model(2)
    images, labels = make_batch(8, seed=2)
    groups = np.array([0, 0, 1, 2, 2, 2, 3, 4])
    raw = unit_grads(model, images, labels, groups)
    clip = 0.3 * min(flat_norm(g) for g in raw)  # every unit is clipped
    for u in np.unique(groups):
        sel = np.flatnonzero(groups == u)
        got, stats = dp_grads(model, path, images[sel], labels[sel], groups[sel], clip=clip)
        assert flat_norm(got) <= clip * (1 + 1e-9)
        assert flat_norm(got) == pytest.approx(clip, rel=1e-5)  # clipped *to* C
        assert stats["clipped_fraction"] == 1.0
    got, _ = dp_grads(model, path, images, labels, groups, clip=clip)
    assert flat_norm(got) <= 5 * clip * (1 + 1e-9)
    # a huge C leaves the gradients untouched: the sum of the raw unit gradients
    got, stats = dp_grads(model, path, images, labels, groups, clip=1e6, expected=8.0)
    for i, g in enumerate(got):
        torch.testing.assert_close(g, sum(r[i] for r in raw) / 8.0, rtol=0, atol=1e-12)
    assert stats["clipped_fraction"] == 0.0


@pytest.mark.parametrize("path", GRAD_PATHS)
def test_noise_std_and_mean(path: str) -> None:
    sigma, clip, expected = 1.5, 0.8, 4.0
    model = make_model(3)
    images, labels = make_batch(3, seed=3)
    dp = DPGradient(
        max_grad_norm=clip,
        noise_multiplier=sigma,
        expected_batch_size=expected,
        grad_path=path,
        generator=torch.Generator().manual_seed(0),
    )
    draws = []
    for _ in range(120 if path == "loop" else 60):
        dp(model, zero_loss, images, labels, np.arange(3))
        draws.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    x = torch.stack(draws)
    want = sigma * clip / expected
    assert float(x.std()) == pytest.approx(want, rel=0.04)
    assert abs(float(x.mean())) < 4 * want / x.numel() ** 0.5
    # one independent draw per coordinate: coordinates are uncorrelated
    c = torch.corrcoef(x[:, :2].T)[0, 1]
    assert abs(float(c)) < 0.35


@pytest.mark.parametrize("path", GRAD_PATHS)
def test_empty_batch_is_pure_noise(path: str) -> None:
    model = make_model(4)
    images, labels = make_batch(0)
    dp = DPGradient(
        max_grad_norm=2.0,
        noise_multiplier=1.0,
        expected_batch_size=5.0,
        grad_path=path,
        generator=torch.Generator().manual_seed(1),
    )
    stats = dp(model, per_sample_loss, images, labels, np.zeros(0, dtype=np.int64))
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert stats["units"] == 0
    assert float(g.abs().min()) > 0  # every coordinate got noise
    assert float(g.std()) == pytest.approx(2.0 * 1.0 / 5.0, rel=0.25)  # ~90 coordinates
    # the same generator state gives exactly noise / expected
    gen = torch.Generator().manual_seed(1)
    noise = [
        torch.normal(0.0, 2.0, size=p.shape, generator=gen, dtype=torch.float64) / 5.0
        for p in model.parameters()
    ]
    torch.testing.assert_close(g, torch.cat([n.reshape(-1) for n in noise]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("path", ["opacus", "functorch"])
def test_opacus_paths_leave_model_untouched(path: str) -> None:
    model = make_model(5)
    params = list(model.parameters())
    images, labels = make_batch(4, seed=5)
    for _ in range(2):  # a second call must not be refused as a double wrap
        dp_grads(model, path, images, labels, np.arange(4), clip=1.0)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
        assert not hasattr(m, "activations") and not hasattr(m, "autograd_grad_sample_hooks")
        assert not hasattr(m, "ft_compute_sample_grad")
    for p in params:
        assert not hasattr(p, "grad_sample") and not hasattr(p, "_forward_counter")
    # the model is still plain: ordinary training works and Opacus can wrap it again
    per_sample_loss(model(images), labels).mean().backward()
    GradSampleModule(model).remove_hooks()


def test_secure_generator_is_not_reproducible() -> None:
    a = torch.normal(0.0, 1.0, size=(4,), generator=secure_generator())
    b = torch.normal(0.0, 1.0, size=(4,), generator=secure_generator())
    assert not torch.equal(a, b)


def test_poisson_sampler_slices() -> None:
    n, q = 400, 0.05
    sampler = PoissonUnitSampler(np.arange(n), sample_rate=q)
    sizes = []
    for _ in range(1000):
        idx, groups = sampler.sample()
        sizes.append(len(idx))
        assert np.array_equal(groups, np.arange(len(idx)))
    # mean q*n = 20, sd of the mean sqrt(n q (1-q) / 1000) ~ 0.14
    assert np.mean(sizes) == pytest.approx(q * n, abs=0.7)
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.2)


def test_poisson_sampler_patients_whole() -> None:
    rng = np.random.default_rng(0)
    patients = rng.integers(0, 60, size=900)  # unit id per slice, unordered
    sampler = PoissonUnitSampler(patients, sample_rate=0.1)
    counts = []
    for _ in range(400):
        idx, groups = sampler.sample()
        chosen = np.unique(patients[idx])
        counts.append(len(chosen))
        # every slice of every selected patient, and nothing else
        assert np.array_equal(np.sort(idx), np.flatnonzero(np.isin(patients, chosen)))
        # one dense group id per patient
        assert np.array_equal(np.unique(groups), np.arange(len(chosen)))
        for g in np.unique(groups):
            assert len(np.unique(patients[idx[groups == g]])) == 1
    assert np.mean(counts) == pytest.approx(6.0, abs=0.5)


@pytest.mark.parametrize("name", ["unet", "monet"])
def test_paths_agree_on_project_models(name: str) -> None:
    """Every path on the real networks (every layer type they have) equals the naive
    micro-batch reference (float64, 16x16, patient units, chunks of 2 slices), no noise."""
    models = pytest.importorskip("privseg.models")
    from privseg.config import ModelConfig

    torch.manual_seed(0)
    model = models.build_model(ModelConfig(name=name, features=4, groups=2)).double()
    g = torch.Generator().manual_seed(6)
    images = torch.rand(5, 1, 16, 16, generator=g, dtype=torch.float64)
    labels = (images > 0.6).double()
    groups = np.array([0, 1, 0, 2, 1])
    assert model.training  # Opacus hooks capture activations only in train mode
    ref = reference(model, images, labels, groups, clip=0.01, expected=3.0)
    for path in GRAD_PATHS:
        got, _ = dp_grads(model, path, images, labels, groups, clip=0.01, expected=3.0, chunk=2)
        for a, b in zip(got, ref, strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-10), path
        assert flat_norm(got) <= 3 * 0.01 / 3.0 * (1 + 1e-9)


@pytest.mark.parametrize("path", GRAD_PATHS)
def test_batchnorm_refused(path: str) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2)).double()
    images, labels = make_batch(2)
    dp = DPGradient(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=2, grad_path=path)
    with pytest.raises(ValueError, match="BatchNorm"):
        dp(model, per_sample_loss, images, labels[:, :, :, :], np.arange(2))
