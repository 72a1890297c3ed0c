"""The plug-in tables (core.plugins): the config allows exactly their names, and a toy plug-in
of each kind, registered here, works through the same path as a built-in."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import FedMedian
from torch import nn
from typer.testing import CliRunner

from conftest import small_cfg
from privseg.cli.app import app
from privseg.config import Config, FederatedConfig, ModelConfig, PrivacyConfig
from privseg.config.typed import choices
from privseg.core.errors import ConfigError
from privseg.core.plugins import (
    ACCOUNTANTS,
    AGGREGATIONS,
    GRAD_PATHS,
    MODELS,
    READERS,
    STRATEGIES,
    input_formats,
)
from privseg.core.registry import Registry
from privseg.data.prepare import prepare_cache
from privseg.data.sources import load_volume, read_source
from privseg.data.task import Case, Reader, Task, Volume
from privseg.federated.strategy import SiteAggregation, make_strategy
from privseg.inference.folder import find_inputs
from privseg.inference.volume import read_ct
from privseg.models import build_model
from privseg.privacy import accounting
from privseg.privacy.dp_sgd import DPGradient, loop_path
from privseg.privacy.unit_grads import PathResult, UnitBatch

SRC = Path(__file__).resolve().parents[1] / "src"
TABLES = [MODELS, READERS, ACCOUNTANTS, GRAD_PATHS, STRATEGIES, AGGREGATIONS]


@contextmanager
def registered(table: Registry[Any], name: str, plugin: Any, **info: Any) -> Iterator[None]:
    """``plugin`` registered as ``name`` for the block only (other tests see the built-ins)."""
    table.add(name, plugin, help="a toy", **info)
    try:
        yield
    finally:
        table.remove(name)


def _allowed(section: type, name: str) -> tuple[Any, ...] | None:
    return choices({f.name: f for f in dataclasses.fields(section)}[name].metadata)


@pytest.mark.parametrize(
    ("section", "name", "table", "also"),
    [
        (ModelConfig, "name", MODELS, ()),
        (PrivacyConfig, "accountant", ACCOUNTANTS, ()),
        (PrivacyConfig, "grad_path", GRAD_PATHS, ("auto",)),
        (FederatedConfig, "strategy", STRATEGIES, ()),
        (FederatedConfig, "aggregation", AGGREGATIONS, ()),
    ],
)
def test_the_config_allows_exactly_the_registered_names(
    section: type, name: str, table: Registry[Any], also: tuple[str, ...]
) -> None:
    assert _allowed(section, name) == (*also, *table.names())
    with registered(table, "toy", object()):  # read at validation time: a plug-in counts
        assert _allowed(section, name) == (*also, *table.names()) and "toy" in table


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.field)
def test_every_builtin_plugin_loads(table: Registry[Any]) -> None:
    for name in table:
        assert table.get(name) is not None, name


def test_an_unknown_name_names_the_field_the_closest_and_every_choice() -> None:
    want = r"privacy\.accountant = 'rdpp' is invalid \(did you mean 'rdp'\?\): allowed values"
    with pytest.raises(ConfigError, match=want + " are 'prv', 'rdp'"):
        Config.from_dict({"privacy": {"accountant": "rdpp"}})
    with pytest.raises(ConfigError, match=r"model\.name = 'unett'.*did you mean 'unet'"):
        MODELS.get("unett")
    with pytest.raises(ValueError, match="already registered"):
        MODELS.add("unet", object())


def test_a_toy_model_builds_from_a_config_that_names_it() -> None:
    def toy(cfg: ModelConfig, classes: int) -> nn.Module:
        return nn.Conv2d(1, classes, 1)

    with registered(MODELS, "toy", toy, widths=(1,)):
        cfg = Config.from_dict({"model": {"name": "toy"}})
        model = build_model(cfg.model, classes=2)
        assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 2, 8, 8)
        shown = CliRunner().invoke(app, ["config", "show", "--set", "model.name=toy"])
        assert shown.exit_code == 0 and 'name = "toy"' in shown.output
    with pytest.raises(ConfigError, match=r"model\.name = 'toy' is invalid"):
        Config.from_dict({"model": {"name": "toy"}})


# ---- a toy input format: a folder with toy.txt and one .npy pair per case ------------------
def _toy_task(root: Path) -> Task:
    cases = [
        Case(p.stem, p, p.with_name(f"{p.stem}.label.npy"))
        for p in sorted(root.glob("c*.npy"))
        if not p.name.endswith(".label.npy")
    ]
    return Task(root, "toy", {0: "background", 1: "organ"}, cases, index=root / "toy.txt")


def _toy_case(case: Case, max_voxels: int) -> Volume:
    image = np.load(case.image).astype(np.float32)
    return Volume(case.case_id, image, np.load(case.label), np.eye(4), (1.0, 1.0, 1.0))


TOY_READER = Reader(
    finds=lambda p: (p / "toy.txt").is_file(),
    read_task=_toy_task,
    load_case=_toy_case,
    is_ct=lambda p: p.suffix == ".npy",
    read_ct=lambda p, max_voxels: nib.Nifti1Image(np.load(p).astype(np.float32), np.eye(4)),
)


def _write_toy(root: Path, cases: int = 6) -> None:
    root.mkdir()
    (root / "toy.txt").write_text("toy\n")
    rng = np.random.default_rng(0)
    for i in range(cases):
        label = np.zeros((16, 16, 4), np.uint8)
        label[4:12, 4:12, :] = 1
        np.save(root / f"c{i}.npy", (rng.normal(size=label.shape) * 50 + 100 * label))
        np.save(root / f"c{i}.label.npy", label)


def test_a_toy_reader_feeds_prepare_and_predict(tmp_path: Path) -> None:
    _write_toy(tmp_path / "task")
    with registered(READERS, "toy", TOY_READER, ct="a .npy file"):
        assert "a toy" in input_formats()
        task = read_source(tmp_path / "task")
        assert task.kind == "toy" and len(task.cases) == 6
        assert load_volume(task, task.cases[0], 10**6).image.shape == (16, 16, 4)
        cfg = Config.from_dict({"data": {"sites": 1, "resolution": 16, "slice_policy": "all"}})
        cache = prepare_cache(tmp_path / "task", tmp_path / "cache", cfg.data, seed=0)
        assert sum(len(cache.split(s, "train")) for s in cache.sites) > 0
        cts = tmp_path / "cts"  # predict: a folder of toy CTs
        cts.mkdir()
        for name in ("a", "b"):
            np.save(cts / f"{name}.npy", np.zeros((16, 16, 4)))
        assert find_inputs(cts) == [cts / "a.npy", cts / "b.npy"]
        assert read_ct(cts / "a.npy", None).hu.shape == (16, 16, 4)


# ---- a toy accountant: epsilon = steps * q / sigma --------------------------------------------
class ToyAccountant:
    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []

    def get_epsilon(self, *, delta: float) -> float:
        return sum(n * q / s for s, q, n in self.history)


def test_a_toy_accountant_computes_and_calibrates_epsilon() -> None:
    with registered(ACCOUNTANTS, "toy", ToyAccountant):
        cfg = Config.from_dict({"privacy": {"accountant": "toy"}})
        name = cfg.privacy.accountant
        assert (
            accounting.epsilon([(2.0, 0.1, 10), (2.0, 0.1, 10)], delta=1e-5, accountant=name) == 1.0
        )
        sigma = accounting.calibrate_noise(
            target_epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=100, accountant=name
        )
        assert 10.0 <= sigma <= 10.2  # eps = 100 * 0.1 / sigma <= 1


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_the_noise_search_is_opacus_own() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    for q, steps, eps in [(0.01, 1000, 3.0), (0.1, 50, 8.0)]:
        ours = accounting._noise_multiplier(eps, 1e-5, q, steps, "rdp")
        theirs = get_noise_multiplier(
            target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps, accountant="rdp"
        )
        assert ours == theirs


# ---- a toy gradient path: the loop path, counted -------------------------------------------
def test_a_toy_grad_path_runs_the_dp_step_a_config_names() -> None:
    calls: list[int] = []

    def toy(dp: DPGradient, batch: UnitBatch) -> PathResult:
        calls.append(batch.units)
        return loop_path(dp, batch)

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((logits - target) ** 2).mean(dim=(1, 2, 3))

    torch.manual_seed(0)
    images, labels = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    grads = {}
    with registered(GRAD_PATHS, "toy", toy):
        for path in ("toy", "loop"):
            cfg = Config.from_dict({"privacy": {"grad_path": path}})
            model = nn.Conv2d(1, 1, 3, padding=1)
            nn.init.constant_(model.weight, 0.1)
            nn.init.constant_(model.bias, 0.0)
            dp = DPGradient(
                max_grad_norm=1.0,
                noise_multiplier=0.0,
                expected_batch_size=2,
                grad_path=cfg.privacy.grad_path,
            )
            dp(model, loss_fn, images, labels, [0, 0, 1, 1])
            grads[path] = model.weight.grad.clone()
    assert calls == [2]
    assert torch.equal(grads["toy"], grads["loop"])


# ---- a toy strategy and a toy aggregation rule -------------------------------------------------
def test_a_toy_strategy_is_built_by_the_strategy_factory() -> None:
    with registered(STRATEGIES, "toy", lambda cfg: (FedMedian, {})):
        strategy = make_strategy(small_cfg(strategy="toy"))
        assert isinstance(strategy, FedMedian) and isinstance(strategy, SiteAggregation)


def test_a_toy_aggregation_brings_its_own_site_rule() -> None:
    with registered(AGGREGATIONS, "toy", lambda fed: (FedMedian, {}), sites_per_malicious=5):
        fed = {"aggregation": "toy", "malicious_sites": 1}
        with pytest.raises(ConfigError, match="it needs at least 8 sites"):
            Config.from_dict({"federated": {**fed, "min_sites": 3}})
        strategy = make_strategy(small_cfg(**fed, min_sites=8))
        assert isinstance(strategy, FedMedian) and not strategy.weighted


# ---- imports: light config, Opacus only for DP ------------------------------------------------
def _loaded(modules: str, *, probe: tuple[str, ...]) -> list[str]:
    code = (
        f"import sys\nimport {modules}\nprint(' '.join(m for m in {probe!r} if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_the_ledger_and_the_non_dp_federated_path_do_not_load_opacus() -> None:
    # the ledger alone: privacy/__init__ imports nothing, so no cycle and no DP-SGD through it
    ledger = ("opacus", "torch", "privseg.privacy.dp_sgd")
    assert _loaded("privseg.privacy.ledger, privseg.privacy.budget", probe=ledger) == []
    federated = "privseg.federated.client_app, privseg.federated.server_app"
    assert _loaded(federated, probe=("opacus",)) == []


def test_the_config_and_the_cli_load_neither_torch_nor_opacus() -> None:
    assert _loaded("privseg.config, privseg.cli.app", probe=("torch", "opacus", "flwr")) == []
