"""Shared fixtures and fakes.

A small phantom task, its slice cache, and two real CTs as an MSD task; a tiny model and
ellipse phantom for the attack tests; a fake SiteTrainer, configs and an in-process Grid for
the Flower tests. Test modules import the plain helpers with ``from conftest import ...``.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import nibabel as nib
import numpy as np
import pytest
import torch
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from privseg.config import Config, DataConfig
from privseg.core.errors import PrivacyBudgetExceeded
from privseg.core.io import read_json, write_json
from privseg.data.cache import SliceCache
from privseg.data.msd import write_dataset_json
from privseg.data.phantom import synth_task
from privseg.data.prepare import prepare_cache
from privseg.federated import client_app as ca
from privseg.privacy.plan import DPPlan

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = Path(os.environ.get("PRIVSEG_TESTDATA", ROOT / ".cache" / "testdata"))
# Two chest CTs from different scanners (pyradiomics 3.0.1 test data, BSD-3).
REAL_CASES = {"lung1": "site-a", "lung2": "site-b"}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def plan(*, noise_multiplier: float, target_epsilon: float | None = None) -> DPPlan:
    """A site's DP-SGD plan with the given noise (C = 1, delta = 1e-5, 100 slices, q = 0.1)."""
    return DPPlan(
        noise_multiplier=noise_multiplier,
        sample_rate=0.1,
        steps=10,
        max_grad_norm=1.0,
        delta=1e-5,
        unit="slice",
        accountant="rdp",
        n_units=100,
        expected_batch_size=10,
        target_epsilon=target_epsilon,
    )


@pytest.fixture(scope="session", autouse=True)
def _few_threads() -> None:
    """The test machine is shared: at most two torch threads."""
    torch.set_num_threads(min(2, torch.get_num_threads()))


class Bright(nn.Module):
    """Logits from the input alone (bright pixels; with two channels, brighter ones too): a
    deterministic stand-in for a trained model, sensitive to orientation and resampling."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = torch.tensor([0.55, 0.7][: self.channels]).view(1, -1, 1, 1)
        return (x - levels) * 40.0


class TinyNet(nn.Module):
    """Conv + GroupNorm + conv: a tiny per-sample segmenter (no batch coupling), covered by
    every per-sample gradient path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.norm(self.conv1(x))))


def per_sample_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE averaged per sample: one loss value per slice."""
    return torch.nn.functional.binary_cross_entropy_with_logits(
        logits, target, reduction="none"
    ).mean((1, 2, 3))


@pytest.fixture(scope="session", autouse=True)
def _session_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Module- and session-scoped fixtures that train (a study, a run folder) record into a
    data home of the test session, never the machine user's ledger store."""
    home = tmp_path_factory.mktemp("xdg-session")
    saved = {k: os.environ.get(k) for k in ("XDG_DATA_HOME", "PRIVSEG_LEDGER_DIR")}
    os.environ["XDG_DATA_HOME"] = str(home)
    os.environ.pop("PRIVSEG_LEDGER_DIR", None)
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _own_ledger_store(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Each test gets its own per-user data folder (ledger store and store registry): a test
    never sees another's releases, nor the machine user's."""
    home = tmp_path_factory.mktemp("xdg")
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    monkeypatch.delenv("PRIVSEG_LEDGER_DIR", raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One site, three 16 x 16 x 4 phantom patients: fast enough to copy and break per test."""
    root = tmp_path_factory.mktemp("tiny") / "task"
    return synth_task(root, sites=1, patients_per_site=3, seed=0, size=16, slices=4)


@pytest.fixture
def task(tiny_task: Path, tmp_path: Path) -> Path:
    """A copy of ``tiny_task`` this test may break."""
    return Path(shutil.copytree(tiny_task, tmp_path / "task"))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom MSD task: 3 sites x 4 patients, 64 x 64 x 16 voxels, labels 1 liver / 2 lesion."""
    out = tmp_path_factory.mktemp("phantom") / "Task_Phantom"
    return synth_task(out, sites=3, patients_per_site=4, seed=0, size=64, slices=16)


@pytest.fixture(scope="session")
def phantom_cache(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SliceCache:
    """The phantom prepared at resolution 32 with the default settings (sites from sites.json)."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    return prepare_cache(phantom_dir, out, DataConfig(resolution=32), seed=0)


@pytest.fixture(scope="session")
def real_msd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real CTs (NRRD, LPS) converted to an MSD task folder; one site per scanner."""
    nrrd = pytest.importorskip("nrrd")
    src = TESTDATA / "pyradiomics"
    missing = [n for n in REAL_CASES if not (src / f"{n}_label.nrrd").is_file()]
    if missing:
        message = f"real CT test data missing in {src}: run scripts/fetch_test_data.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("real") / "Task_RealCT"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    for case in REAL_CASES:
        for kind, folder in (("image", "imagesTr"), ("label", "labelsTr")):
            data, header = nrrd.read(str(src / f"{case}_{kind}.nrrd"), index_order="F")
            dtype = np.int16 if kind == "image" else np.uint8
            img = nib.Nifti1Image(data.astype(dtype), nrrd_affine(header))
            nib.save(img, root / folder / f"{case}.nii.gz")
    write_dataset_json(
        root,
        name="RealCT",
        labels={0: "background", 1: "tumour"},
        case_ids=list(REAL_CASES),
        licence="BSD-3-Clause (pyradiomics)",
    )
    write_json(root / "sites.json", REAL_CASES)
    return root


def nrrd_affine(header: dict) -> np.ndarray:
    """NRRD ``space directions`` (one row per axis) and ``space origin`` -> a RAS NIfTI affine."""
    if header.get("space") not in ("left-posterior-superior", "LPS"):
        raise ValueError(f"unsupported NRRD space {header.get('space')!r}")
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(header["space directions"], dtype=float).T
    lps[:3, 3] = header["space origin"]
    return LPS_TO_RAS @ lps


# ---- attack tests: a tiny model with a dense layer and an ellipse phantom ------------------
R = 32


def phantom(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Ellipse bodies with a disk 'organ' (the mask), noise inside the body."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, R), torch.linspace(-1, 1, R), indexing="ij")
    imgs, labs = [], []
    for _ in range(n):
        a, b, cx, cy, r = torch.rand(5, generator=g)
        body = (xx**2 / (0.5 + 0.4 * a) + yy**2 / (0.4 + 0.3 * b)) < 1
        organ = body & (
            ((xx - (cx - 0.5) * 0.6) ** 2 + (yy - (cy - 0.5) * 0.5) ** 2) < (0.15 + 0.15 * r) ** 2
        )
        im = body * 0.45 + organ * 0.3 + 0.03 * torch.randn(R, R, generator=g) * body
        imgs.append(im.clamp(0, 1))
        labs.append(organ.float())
    return torch.stack(imgs)[:, None], torch.stack(labs)[:, None]


class TinySeg(nn.Module):
    """conv-GroupNorm-ReLU with a dense global-context branch, 1x1 head: [B,1,R,R] -> logits."""

    def __init__(self, r: int = R, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, c, 3, padding=1)
        self.norm = nn.GroupNorm(2, c)
        self.ctx = nn.Linear(r * r, c)
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(x)) + self.ctx(x.flatten(1))[:, :, None, None]
        return self.head(torch.relu(h))


# ---- a fake SiteTrainer with exactly the lead's interface ------------------------------------
SIZES = {"a": 10, "b": 30, "c": 20, "tight": 5}
DELTAS = {"a": 1.0, "b": 2.0, "c": 3.0, "tight": 4.0}
DICE = {"a": 0.5, "b": 0.7, "c": 0.9, "tight": 0.1}


class FakeTrainer:
    """Adds a per-site constant to every float weight; a JSON file plays the ledger."""

    def __init__(self, cfg: Config, *, name: str, ledger: Path, budget_steps: int | None) -> None:
        self.cfg, self.name, self.ledger, self.budget_steps = cfg, name, ledger, budget_steps
        self.global_states: list[Any] = []
        self.privacy = None  # no DP engine: a DP fake refuses evaluation queries
        self.local_val: list[dict[str, Any]] = []

    @property
    def num_examples(self) -> int:
        return SIZES[self.name]

    def _spent(self) -> int:
        return int(read_json(self.ledger)["steps"]) if self.ledger.is_file() else 0

    def epsilon(self) -> float:
        return 0.1 * self._spent() if self.cfg.privacy.enabled else math.nan

    def fit(self, state_dict, steps, *, run_id, global_state=None):
        spent = self._spent()
        if self.budget_steps is not None and spent + steps > self.budget_steps:
            raise PrivacyBudgetExceeded(f"{self.name}: {spent} + {steps} > {self.budget_steps}")
        write_json(self.ledger, {"steps": spent + steps, "epsilon": 0.1 * (spent + steps)})
        self.global_states.append(global_state)
        d = DELTAS[self.name]
        new = {k: (v + d if v.is_floating_point() else v.clone()) for k, v in state_dict.items()}
        return new, {
            "train_loss": d,
            "num_examples": float(self.num_examples),
            "steps": float(steps),
            "epsilon": self.epsilon(),
            "seconds": 0.01,
        }

    def evaluate(self, state_dict, split="val"):
        dice = DICE[self.name] + (0.01 if split == "test" else 0.0)
        return {
            "dice": dice,
            "dice_sd": 0.0,
            "hd95": 2.0,
            "n_patients": 2,
            "patients": [{"id": f"{self.name}-{i}", "dice": dice, "hd95": 2.0} for i in range(2)],
            "classes": {n: {"dice": dice - 0.1 * k} for k, n in enumerate(self._class_names())},
        }

    def _class_names(self) -> tuple[str, ...]:
        from privseg.core.classes import Classes

        return Classes.of(self.cfg.data).names

    def privacy_summary(self):
        if not self.cfg.privacy.enabled:
            return None
        return {
            "epsilon": self.epsilon(),
            "delta": 1e-5,
            "noise_multiplier": 1.1,
            "sample_rate": 0.1,
            "steps": self._spent(),
            "max_grad_norm": 1.0,
            "accountant": self.cfg.privacy.accountant,
            "releases": [  # one release as the ledger's rows give it (RELEASE_KEYS)
                {
                    "kind": "dp-sgd",
                    "noise_multiplier": 1.1,
                    "sample_rate": 0.1,
                    "steps": self._spent(),
                    "unit": "slice",
                    "accountant": self.cfg.privacy.accountant,
                    "delta": 1e-5,
                    "time": "2026-01-01T00:00:00+00:00",
                    "run_id": "fake",
                    "site": self.name,
                }
            ],
        }


BUILT: list[str] = []


def handle(msg, settings: ca.SiteSettings, factory=None):
    """Any server message, by its type, as the ClientApp's handlers take it (a test grid)."""
    factory = factory or fake_factory
    kind = msg.metadata.message_type
    if kind == "query":
        return ca.handle_done(msg, settings)
    return (ca.handle_train if kind == "train" else ca.handle_evaluate)(msg, settings, factory)


def fake_ledger(out_dir: Path, site: str) -> Path:
    """Where a FakeTrainer keeps its JSON stand-in ledger."""
    return Path(out_dir) / "ledgers" / f"{site}.json"


def fake_factory(cfg: Config, settings: ca.SiteSettings, *, planned_steps: int, run_id: str):
    """Site 'tight' can afford exactly one round of local steps."""
    BUILT.append(settings.site)
    budget = cfg.federated.local_steps if settings.site == "tight" else None
    ledger = fake_ledger(settings.out_dir, settings.site)
    return FakeTrainer(cfg, name=settings.site, ledger=ledger, budget_steps=budget)


def small_cfg(**fed: Any) -> Config:
    return Config.from_dict(
        {
            "model": {"features": 4, "groups": 1},
            "privacy": {"enabled": True, "noise_multiplier": 1.0},
            "federated": {
                "rounds": 2,
                "local_steps": 3,
                "min_sites": 2,
                "round_timeout": 5.0,
                "max_update_ratio": 1e6,  # FakeTrainer adds 1-4 to every weight
                **fed,
            },
        }
    )


def e2e_config(sites: int | None = None, **fed: Any) -> Config:
    """The smallest config the end-to-end tests train for real (32², 4 features, DP on)."""
    data: dict[str, Any] = {"resolution": 32, **({"sites": sites} if sites else {})}
    return Config.from_dict(
        {
            "data": data,
            "model": {"features": 4, "groups": 1},
            "train": {"batch_size": 4, "threads": 1},
            "privacy": {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": None},
            "federated": {
                "rounds": 2,
                "local_steps": 2,
                "min_sites": 2,
                "round_timeout": 300.0,
                **fed,
            },
        }
    )


@pytest.fixture
def flower_task_identity() -> Iterator[None]:
    """Messages need a task identity (Flower sets it inside a run)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    ca._TRAINERS.clear()
    BUILT.clear()
    yield
    ca._TRAINERS.clear()


# ---- an in-process Grid: node i is the i-th site ------------------------------------------------
class InProcessGrid(Grid):
    """A Grid whose sites answer in this process: ``answer(msg)`` gives the reply (``None``: the
    node is gone and never replies). ``push_messages`` answers at once and keeps the replies
    in an outbox for ``pull_messages``, as the server's own poll loop expects."""

    def __init__(self) -> None:
        self._outbox: dict[str, Message] = {}

    def answer(self, msg: Message) -> Message | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def create_message(self, *a: Any, **k: Any) -> Message:  # pragma: no cover
        raise NotImplementedError

    def set_run(self, run: Any) -> None:  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self) -> Any:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        return [r for m in messages if (r := self.answer(m)) is not None]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
            reply = self.answer(msg)
            if reply is not None:
                self._outbox[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._outbox.pop(i) for i in list(message_ids) if i in self._outbox]


def store_worst(cache: Any, site: str, *, delta: float, accountant: str) -> tuple[float, list]:
    """(epsilon, releases) of ``site``'s training patient who has spent most, from this test's
    per-user ledger store (what results.json must report for the site)."""
    from privseg.privacy.ledger import PrivacyLedger
    from privseg.privacy.stores import LEDGER_FILE, store_dir

    patients = SliceCache.open(Path(cache)).contents(site, "train")
    return PrivacyLedger(store_dir() / LEDGER_FILE).worst(
        patients, delta=delta, accountant=accountant
    )
