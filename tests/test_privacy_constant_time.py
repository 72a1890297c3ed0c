"""Constant-shape DP steps (issue 22, finding 6): a padded step releases the unpadded step's
gradient, dummy slices cannot change it, the padded size is the binomial tail bound, and every
physical batch the model sees has one shape whatever the Poisson batch size.

No timings here: speed is measured in bench/dp_timing.py (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom
from torch import nn

from conftest import TinyNet, per_sample_loss
from privseg.config import Config, PrivacyConfig
from privseg.core.errors import ConfigError
from privseg.privacy.dp_sgd import GRAD_PATHS, DPGradient
from privseg.privacy.engine import SitePrivacy
from privseg.privacy.ledger import PrivacyLedger
from privseg.privacy.padding import OVERFLOW_PROBABILITY, ConstantShapeBatches, batch_cap
from privseg.privacy.plan import DPPlan, count_units
from privseg.privacy.policy import apply_floor
from privseg.privacy.sampling import PoissonUnitSampler


def model_(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().double()


N_SLICES = 30
#: unit id of each slice: one per slice, or 9 patients of 2 to 7 slices, interleaved
UNITS = {
    "slice": np.arange(N_SLICES),
    "patient": np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4,
                         6, 2, 6, 4, 3, 3, 8, 3, 2, 7]),
}  # fmt: skip


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(N_SLICES, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = (torch.rand(N_SLICES, 1, 8, 8, generator=g, dtype=torch.float64) > 0.6).double()
    return images, labels


#: about the median unit gradient norm of TinyNet on data(): some units clipped, some not
CLIP = {"slice": 0.5, "patient": 1.4}


def dp(path: str, *, chunk: int | None = None, clip: float = 0.5) -> DPGradient:
    """Noise from a fixed seed, so a padded and an unpadded step draw the same noise."""
    return DPGradient(
        max_grad_norm=clip,
        noise_multiplier=0.7,
        expected_batch_size=4.0,
        grad_path=path,
        chunk_slices=chunk,
        generator=torch.Generator().manual_seed(11),
    )


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def padder(unit: str, *, q: float = 0.3, steps: int = 50, seed: int = 5) -> ConstantShapeBatches:
    return ConstantShapeBatches(
        UNITS[unit], sample_rate=q, steps=steps, rng=np.random.default_rng(seed)
    )


PATHS = [(p, None) for p in GRAD_PATHS] + [("batched", 2), ("batched", 5)]


@pytest.mark.parametrize("unit", list(UNITS))
@pytest.mark.parametrize(("path", "chunk"), PATHS)
def test_padded_step_releases_the_unpadded_gradient(unit: str, path: str, chunk: int | None):
    """(a) Same Poisson batch, same noise seed, float64: padded == unpadded, on every path,
    for several batches (an empty one and one larger than the padding included)."""
    images, labels = data()
    sampler = PoissonUnitSampler(UNITS[unit], sample_rate=0.3, rng=np.random.default_rng(2))
    pad = padder(unit)
    batches = [sampler.sample() for _ in range(4)]
    batches.append((np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))  # empty
    fractions = []
    for i, (idx, groups) in enumerate(batches):
        if i == 3:
            pad.units_cap = 1  # this batch overflows: computed in full, never truncated
        model = model_()
        ref_stats = dp(path, chunk=chunk, clip=CLIP[unit])(
            model, per_sample_loss, images[idx], labels[idx], groups
        )
        ref = grads_of(model)
        p_idx, p_groups, real = pad.pad(idx, groups)
        model = model_()
        stats = dp(path, chunk=chunk, clip=CLIP[unit])(
            model, per_sample_loss, images[p_idx], labels[p_idx], torch.as_tensor(p_groups), real
        )
        for got, want in zip(grads_of(model), ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
        assert stats["units"] == ref_stats["units"] == len(np.unique(groups))
        assert stats["clipped_fraction"] == pytest.approx(ref_stats["clipped_fraction"])
        fractions.append(stats["clipped_fraction"])
        if len(idx):
            assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-12)
        else:
            assert math.isnan(stats["loss"]) and math.isnan(ref_stats["loss"])
    assert pad.overflows == 1
    assert any(0 < f < 1 for f in fractions)  # some units clipped, some not


def padded_step(path: str, unit: str, images: torch.Tensor, labels: torch.Tensor, batch):
    model = model_()
    idx, groups, real = batch
    dp(path)(model, per_sample_loss, images[idx], labels[idx], torch.as_tensor(groups), real)
    return grads_of(model)


@pytest.mark.parametrize("unit", list(UNITS))
@pytest.mark.parametrize("path", GRAD_PATHS)
def test_dummy_slices_cannot_change_the_gradient(unit: str, path: str) -> None:
    """(b) Replacing every dummy slice's image and label (with large random values) leaves
    the gradient bit-for-bit the same."""
    images, labels = data()
    sampler = PoissonUnitSampler(UNITS[unit], sample_rate=0.3, rng=np.random.default_rng(3))
    pad = padder(unit)
    for _ in range(3):
        batch = pad.pad(*sampler.sample())
        idx, _, real = batch
        assert (~real).sum() > 0
        x, y = images[idx], labels[idx]
        base = padded_step(path, unit, x, y, (np.arange(len(idx)), batch.groups, real))
        g = torch.Generator().manual_seed(7)
        x2, y2 = x.clone(), y.clone()
        x2[~real] = 1e3 * torch.randn(x2[~real].shape, generator=g, dtype=torch.float64)
        y2[~real] = torch.rand(y2[~real].shape, generator=g, dtype=torch.float64)
        other = padded_step(path, unit, x2, y2, (np.arange(len(idx)), batch.groups, real))
        for a, b in zip(base, other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("unit", list(UNITS))
@pytest.mark.parametrize("path", GRAD_PATHS)
def test_non_finite_dummies_are_selected_out(unit: str, path: str) -> None:
    """Dummy values never reach a sum where they are selected (every path with one slice per
    unit; batched, opacus and functorch per slice with patients too). The loop's pass over one
    patient needs finite dummies (0 x activation): privseg's dummies are real slices."""
    if path == "loop" and unit == "patient":
        pytest.skip("the loop's pass over a patient multiplies a dummy's activations by 0")
    images, labels = data()
    sampler = PoissonUnitSampler(UNITS[unit], sample_rate=0.3, rng=np.random.default_rng(4))
    batch = padder(unit).pad(*sampler.sample())
    idx, groups, real = batch
    x, y = images[idx], labels[idx]
    base = padded_step(path, unit, x, y, (np.arange(len(idx)), groups, real))
    x2 = x.clone()
    x2[~real] = float("nan")
    x2[np.flatnonzero(~real)[:1]] = float("inf")
    got = padded_step(path, unit, x2, y, (np.arange(len(idx)), groups, real))
    for a, b in zip(base, got, strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)


def exact_tail(n: int, q: Fraction, b: int) -> Fraction:
    """P[Binomial(n, q) > b] in exact rational arithmetic (independent of scipy)."""
    return sum(
        (Fraction(math.comb(n, j)) * q**j * (1 - q) ** (n - j) for j in range(b + 1, n + 1)),
        Fraction(0),
    )


@pytest.mark.parametrize(
    ("n", "q", "steps"),
    [(40, Fraction(4, 40), 100), (120, Fraction(16, 120), 750), (200, Fraction(1, 8), 3000),
     (17, Fraction(1, 17), 1), (60, Fraction(1), 10)],
)  # fmt: skip
def test_batch_cap_is_the_smallest_size_the_tail_bound_allows(n: int, q: Fraction, steps: int):
    """(c) B_cap = the smallest b with steps * P[Bin(n, q) > b] <= 1e-9, checked in exact
    arithmetic and against scipy.stats.binom."""
    cap = batch_cap(n, float(q), steps)
    bound = Fraction(OVERFLOW_PROBABILITY)
    assert steps * exact_tail(n, q, cap) <= bound
    assert cap == 0 or steps * exact_tail(n, q, cap - 1) > bound
    assert steps * binom.sf(cap, n, float(q)) <= OVERFLOW_PROBABILITY
    assert cap == 0 or steps * binom.sf(cap - 1, n, float(q)) > OVERFLOW_PROBABILITY
    if q == 1:
        assert cap == n


def test_batch_cap_grows_with_steps_and_stricter_bound() -> None:
    n, q = 2000, 16 / 2000
    caps = [batch_cap(n, q, s) for s in (1, 100, 10_000)]
    assert caps == sorted(caps) and caps[0] < caps[-1]
    assert batch_cap(n, q, 100, overflow=1e-3) < batch_cap(n, q, 100)
    assert batch_cap(n, q, 100) > n * q  # above the mean
    with pytest.raises(ValueError):
        batch_cap(0, 0.5, 10)


class ShapeLog(nn.Module):
    """Wraps TinyNet and records the shape of every physical batch passed to it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet().double()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.net(x)


#: Opacus wraps the model anew each step (slow on 2 shared cores): fewer steps, marked slow
SHAPE_RUNS = [(p, c, 40) for p, c in PATHS if p in ("loop", "batched")] + [
    pytest.param(p, c, 16, marks=pytest.mark.slow) for p, c in PATHS if p in ("opacus", "functorch")
]


@pytest.mark.parametrize("unit", list(UNITS))
@pytest.mark.parametrize(("path", "chunk", "steps"), SHAPE_RUNS)
def test_every_physical_batch_has_one_shape(
    unit: str, path: str, chunk: int | None, steps: int
) -> None:
    """(d) Over many sampled steps (empty and large Poisson batches among them), the model
    sees the same multiset of input shapes every step; without padding it does not."""
    images, labels = data()
    sampler = PoissonUnitSampler(UNITS[unit], sample_rate=0.2, rng=np.random.default_rng(6))
    pad = padder(unit, q=0.2, steps=40)
    torch.manual_seed(0)
    model = ShapeLog()
    step = dp(path, chunk=chunk)
    per_step, sizes, unpadded = set(), set(), set()
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    for idx, groups in [*(sampler.sample() for _ in range(steps)), empty]:
        sizes.add(len(np.unique(groups)))
        model.shapes.clear()
        step(model, per_sample_loss, images[idx], labels[idx], torch.as_tensor(groups))
        unpadded.add(tuple(sorted(Counter(model.shapes).items())))
        p_idx, p_groups, real = pad.pad(idx, groups)
        model.shapes.clear()
        step(model, per_sample_loss, images[p_idx], labels[p_idx], torch.as_tensor(p_groups), real)
        per_step.add(tuple(sorted(Counter(model.shapes).items())))
    assert pad.overflows == 0
    assert len(sizes) >= 4 and 0 in sizes  # the Poisson batch size did vary
    assert len(per_step) == 1, per_step
    assert len(unpadded) > 1
    ((shape, _), *_) = next(iter(per_step))
    assert shape[1:] == (1, 8, 8)


def site(tmp_path: Path, **kw) -> SitePrivacy:
    c = PrivacyConfig(
        enabled=True, unit="patient", accountant="rdp", delta=1e-3, noise_multiplier=1.0,
        target_epsilon=None, **kw,
    )  # fmt: skip
    units = UNITS["patient"]
    plan = DPPlan.build(c, n_units=count_units(units), batch_size=3, steps=60, site="a")
    patients = {"a": [f"{i:064x}" for i in np.unique(units)]}  # content fingerprints
    ledger = PrivacyLedger(tmp_path / "a.sqlite")
    return SitePrivacy(c, plan, site="a", units=units, ledger=ledger, patients=patients, run_id="r")


def test_site_privacy_pads_every_batch_with_constant_time(tmp_path: Path) -> None:
    """SitePrivacy (what the trainer calls) with constant_time: each patient one group padded
    to the largest patient's slices, B_cap from the plan's n, q and steps."""
    sp = site(tmp_path, constant_time=True)
    counts = np.bincount(np.unique(UNITS["patient"], return_inverse=True)[1])
    assert sp.padding is not None and sp.padding.unit_slices == counts.max() == 7
    assert sp.padding.units_cap == batch_cap(9, sp.sample_rate, 60)
    lengths, reals = set(), set()
    for _ in range(60):
        idx, groups, real = sp.sample_batch()
        lengths.add(len(idx))
        reals.add(int(real.sum()))
        # a patient's slices are one group, all real slices of a group are one patient's
        for g in np.unique(groups[real]):
            patients = set(UNITS["patient"][idx[(groups == g) & real]])
            assert len(patients) == 1
            assert (groups == g).sum() == 7
    assert lengths == {sp.padding.units_cap * 7} and len(reals) > 3
    off = site(tmp_path / "off", constant_time=False)
    assert off.padding is None
    assert len({len(off.sample_batch().idx) for _ in range(60)}) > 3


def test_constant_time_config_and_site_floor() -> None:
    with pytest.raises(ConfigError, match="constant_time"):
        Config().replace(**{"privacy.constant_time": "yes"})
    assert Config().replace(**{"privacy.constant_time": False}).privacy.constant_time is False
    own = PrivacyConfig(enabled=True, constant_time=True)
    asked = PrivacyConfig(enabled=True, constant_time=False)
    merged, changed = apply_floor(asked, own)
    assert merged.constant_time is True
    assert any("constant_time" in c for c in changed)


def test_constant_time_is_on_at_a_deployed_site_and_off_in_one_process(tmp_path: Path) -> None:
    """None (the default): a deployed site's floor turns it on (a server in another hospital
    times its replies); simulation, central and local runs stay unpadded (no step time leaves
    the machine). A site may still say false explicitly."""
    from privseg.federated.site import site_policy

    assert PrivacyConfig().constant_time is None
    assert site(tmp_path / "sim").padding is None
    floor = Config.load(site_policy(tmp_path / "site", None, 4.0)).privacy
    assert floor.constant_time is True
    merged, _ = apply_floor(PrivacyConfig(enabled=True, constant_time=False), floor)
    assert merged.constant_time is True  # a server cannot turn it off
    own = tmp_path / "own.toml"
    own.write_text("[privacy]\nconstant_time = false\n")
    assert Config.load(site_policy(tmp_path / "site2", own, 4.0)).privacy.constant_time is False
