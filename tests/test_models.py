"""Models: shapes, Opacus compatibility (validator, per-sample-gradient oracle), config errors."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct
from opacus.validators import ModuleValidator
from torch import nn

from privseg.config import ModelConfig
from privseg.core.errors import ConfigError
from privseg.models import MODELS, MoNet, build_model

NAMES = sorted(MODELS)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and far faster on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small(name: str, **kw: object) -> nn.Module:
    return build_model(ModelConfig(name=name, features=4, groups=2, **kw))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("res", [32, 64])
def test_output_is_one_logit_map_per_input(name: str, res: int) -> None:
    model = build_model(ModelConfig(name=name))
    x = torch.rand(2, 1, res, res)
    y = model(x)
    assert y.shape == (2, 1, res, res)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_models_pass_the_opacus_validator(name: str) -> None:
    assert ModuleValidator.validate(build_model(ModelConfig(name=name)), strict=True) == []


def test_validator_rejects_batchnorm_so_the_check_can_fail() -> None:
    bad = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
    assert ModuleValidator.validate(bad, strict=False)
    with pytest.raises(Exception, match="BatchNorm"):
        ModuleValidator.validate(bad, strict=True)


@pytest.mark.parametrize("name", NAMES)
def test_every_trainable_layer_has_a_fast_opacus_grad_sampler(name: str) -> None:
    # A layer without one (ConvTranspose2d, PReLU) falls back to functorch: slower and it
    # crashes on empty Poisson batches.
    model = build_model(ModelConfig(name=name))
    kinds = {
        type(m)
        for m in model.modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    }
    assert kinds <= set(GradSampleModule.GRAD_SAMPLERS), kinds - set(GradSampleModule.GRAD_SAMPLERS)
    assert not any(
        isinstance(m, nn.ConvTranspose2d | nn.PReLU | nn.BatchNorm2d) for m in model.modules()
    )


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_gradients_match_the_microbatch_oracle(name: str) -> None:
    torch.manual_seed(0)
    model = small(name).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert check_per_sample_gradients_are_correct(x, model, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_empty_poisson_batch_runs_under_opacus_hooks(name: str) -> None:
    gsm = GradSampleModule(small(name))
    out = gsm(torch.zeros(0, 1, 16, 16))
    out.sum().backward()
    assert out.shape == (0, 1, 16, 16)


@pytest.mark.parametrize("name", NAMES)
def test_skip_connections_carry_information(name: str) -> None:
    # Cut the path through the bottleneck: the output must still depend on the input.
    torch.manual_seed(0)
    model = small(name).eval()
    with torch.no_grad():
        for p in model.bottleneck.parameters():
            p.zero_()
    a, b = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    assert not torch.allclose(model(a), model(b))


def test_monet_matches_the_paper_size_and_uses_dilated_blocks() -> None:
    model = build_model(ModelConfig(name="monet", features=16))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == 401_665  # authors' Keras model: 401,666 (its head BatchNorm scale is dropped)
    dilations = [m.dilation[0] for m in model.enc[0].modules() if isinstance(m, nn.Conv2d)]
    assert dilations == [4, 3, 2, 1]


def test_monet_dropout_comes_from_config_and_defaults_to_the_paper() -> None:
    p = {m.p for m in small("monet", dropout=0.1).modules() if isinstance(m, nn.Dropout2d)}
    assert p == {0.1}
    assert {m.p for m in MoNet().modules() if isinstance(m, nn.Dropout2d)} == {0.2}


def test_unknown_model_name_raises_config_error_with_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"model\.name = 'unett'.*did you mean 'unet'"):
        build_model(ModelConfig(name="unett"))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_groups_that_do_not_divide_the_channels_raise_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.groups = 3"):
        build_model(ModelConfig(name=name, features=16, groups=3))
