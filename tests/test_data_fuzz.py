"""Fuzz `prepare` and `predict` with a broken phantom task (issue 15): every case ends in
success or a clean PrivsegError (exit 2 through the CLI), never a traceback, and nothing is
written outside ``--out``. Seeded; the failing case's mutations are in the assertion message.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from privseg.cli.app import app
from privseg.config import Config, DataConfig
from privseg.core.errors import PrivsegError
from privseg.data.phantom import synth_task
from privseg.data.prepare import prepare_cache
from privseg.inference import segment_nifti
from privseg.models import build_model
from privseg.models.checkpoint import save_checkpoint

CASES = 1000
CLI_EVERY = 15  # every 15th case also runs through the CLI (exit code 0 or 2)
PREDICT_EVERY = 3

Mutation = Callable[[Path, np.random.Generator], None]


def _files(task: Path, rng: np.random.Generator) -> Path:
    """A random image or label file of the task."""
    meta = json.loads((task / "dataset.json").read_text())
    entry = meta["training"][int(rng.integers(len(meta["training"])))]
    return task / entry["image" if rng.random() < 0.6 else "label"]


def _raw(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.name.endswith(".gz") else raw


def _put(path: Path, raw: bytes) -> None:
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)


def _header_field(name: str, values: list) -> Mutation:
    def mutate(task: Path, rng: np.random.Generator) -> None:
        path = _files(task, rng)
        raw = _raw(path)
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
        header[name] = values[int(rng.integers(len(values)))]
        _put(path, header.binaryblock + raw[len(header.binaryblock) :])

    mutate.__name__ = f"header.{name}"
    return mutate


def _data(change: Callable[[np.ndarray, np.random.Generator], np.ndarray], name: str) -> Mutation:
    def mutate(task: Path, rng: np.random.Generator) -> None:
        path = _files(task, rng)
        img = nib.load(path)
        data = change(np.asarray(img.dataobj), rng)
        nib.save(nib.Nifti1Image(data, img.affine), path)

    mutate.__name__ = f"data.{name}"
    return mutate


def _voxel(value: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    def change(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        a = a.astype(np.float32)
        a[tuple(int(rng.integers(n)) for n in a.shape)] = value
        return a

    return change


def _dataset_json(change: Callable[[dict, np.random.Generator], object], name: str) -> Mutation:
    def mutate(task: Path, rng: np.random.Generator) -> None:
        meta = json.loads((task / "dataset.json").read_text())
        new = change(meta, rng)
        (task / "dataset.json").write_text(json.dumps(meta if new is None else new))

    mutate.__name__ = f"dataset_json.{name}"
    return mutate


def _entry(key: str, value: object) -> Callable[[dict, np.random.Generator], None]:
    def change(meta: dict, rng: np.random.Generator) -> None:
        meta["training"][int(rng.integers(len(meta["training"])))][key] = value

    return change


def _sites(value: object) -> Mutation:
    def mutate(task: Path, rng: np.random.Generator) -> None:
        path = task / "sites.json"
        if not path.is_file():
            return
        site_map = json.loads(path.read_text())
        site_map[sorted(site_map)[int(rng.integers(len(site_map)))]] = value
        path.write_text(json.dumps(site_map))

    mutate.__name__ = f"sites_json={value!r}"
    return mutate


def _file(action: str) -> Mutation:
    def mutate(task: Path, rng: np.random.Generator) -> None:
        path = _files(task, rng)
        raw = path.read_bytes()
        if action == "delete":
            path.unlink()
        elif action == "truncate":
            path.write_bytes(raw[: int(rng.integers(1, len(raw)))])
        elif action == "garbage":
            path.write_bytes(rng.bytes(int(rng.integers(1, 600))))
        elif action == "empty":
            path.write_bytes(b"")
        elif action == "folder":
            path.unlink()
            path.mkdir()
        elif action == "flip_byte":
            body = bytearray(_raw(path))
            at = int(rng.integers(len(body)))
            body[at] ^= 0xFF
            _put(path, bytes(body))

    mutate.__name__ = f"file.{action}"
    return mutate


MUTATIONS: list[Mutation] = [
    _header_field(
        "dim",
        [
            [3, 30000, 30000, 30000, 1, 1, 1, 1],
            [3, 17, 16, 4, 1, 1, 1, 1],
            [2, 16, 16, 1, 1, 1, 1, 1],
            [4, 16, 16, 4, 2, 1, 1, 1],
            [3, 0, 16, 4, 1, 1, 1, 1],
            [3, -5, 16, 4, 1, 1, 1, 1],
            [3, 16, 16, 1, 1, 1, 1, 1],
            [9, 16, 16, 4, 1, 1, 1, 1],
        ],
    ),
    _header_field("datatype", [2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 2304, 0, 999]),
    _header_field("bitpix", [0, 7, 64]),
    _header_field("vox_offset", [0, 352, 4000, 1e9, -10]),
    _header_field("scl_slope", [0.0, np.nan, np.inf, 1e30, -1.0]),
    _header_field("scl_inter", [np.nan, np.inf, 1e30]),
    _header_field(
        "pixdim",
        [
            [1, 0, 0, 0, 1, 1, 1, 1],
            [1, np.nan, 1, 1, 1, 1, 1, 1],
            [-1, 1e-30, 1, 1, 1, 1, 1, 1],
            [1, 1e30, 1, 1, 1, 1, 1, 1],
        ],
    ),
    _header_field("srow_x", [[0, 0, 0, 0], [np.nan, 0, 0, 0], [1e30, 0, 0, 0], [0, 1, 0, 0]]),
    _header_field("srow_z", [[0, 0, 0, 0], [0, 0, np.inf, 0], [0, 0, 1e-12, 0]]),
    _header_field("sform_code", [0, 1, 2, 9]),
    _header_field("qform_code", [0, 1, 9]),
    _header_field("quatern_b", [np.nan, 2.0, -1.5]),
    _header_field("magic", [b"n+2\0", b"xxxx", b"ni1\0"]),
    _header_field("sizeof_hdr", [0, 540, 12345]),
    _data(_voxel(np.nan), "nan"),
    _data(_voxel(np.inf), "inf"),
    _data(_voxel(-np.inf), "-inf"),
    _data(_voxel(3e38), "huge"),
    _data(_voxel(7), "seven"),
    _data(_voxel(-1), "minus_one"),
    _data(_voxel(0.5), "half"),
    _data(_voxel(300), "300"),
    _data(lambda a, r: np.zeros_like(a), "zeros"),
    _data(lambda a, r: np.full(a.shape, 2, a.dtype), "all_two"),
    _data(lambda a, r: a.astype(np.float64), "float64"),
    _data(lambda a, r: a.astype(np.int8), "int8"),
    _data(lambda a, r: a.astype(np.uint16), "uint16"),
    _data(lambda a, r: a.astype(np.complex64), "complex"),
    _data(lambda a, r: a.astype(bool).astype(np.uint8), "binary"),
    _data(lambda a, r: a[:, :, :1], "one_slice"),
    _data(lambda a, r: a[:1, :1, :1], "one_voxel"),
    _data(lambda a, r: a[:, :-1], "one_row_less"),
    _data(lambda a, r: a[..., None], "4d"),
    _data(lambda a, r: np.concatenate([a[..., None]] * 2, axis=-1), "4d_two_frames"),
    _data(lambda a, r: a[:, :, 0], "2d"),
    _data(lambda a, r: np.ascontiguousarray(np.swapaxes(a, 0, 2)), "axes_swapped"),
    _dataset_json(lambda m, r: m.pop("training"), "no_training"),
    _dataset_json(lambda m, r: m.update(training={}), "training_dict"),
    _dataset_json(lambda m, r: m.update(training=[]), "training_empty"),
    _dataset_json(lambda m, r: m.update(training=[5, "x"]), "training_junk"),
    _dataset_json(lambda m, r: m.update(labels=["background", "liver"]), "labels_list"),
    _dataset_json(lambda m, r: m.update(labels={"a": "b"}), "labels_bad_key"),
    _dataset_json(lambda m, r: m.update(labels={"0": "background"}), "labels_no_foreground"),
    _dataset_json(lambda m, r: m.update(labels={"0": "bg", "1": "liver"}), "labels_no_cancer"),
    _dataset_json(lambda m, r: m.update(labels={"0": "bg", "1": "l", "2": "c", "-3": "x"}), "neg"),
    _dataset_json(lambda m, r: m.pop("labels"), "labels_missing"),
    _dataset_json(lambda m, r: m.update(name={"x": [1]}), "name_dict"),
    _dataset_json(lambda m, r: m["training"].append(m["training"][0]), "duplicate_case"),
    _dataset_json(lambda m, r: [m], "top_level_list"),
    _dataset_json(_entry("image", "/etc/passwd"), "absolute_image"),
    _dataset_json(_entry("label", "../outside.nii.gz"), "label_outside"),
    _dataset_json(_entry("image", "./imagesTr/../../task/imagesTr/x.nii.gz"), "dotdot_inside"),
    _dataset_json(_entry("image", 5), "image_int"),
    _dataset_json(_entry("image", ""), "image_empty"),
    _dataset_json(_entry("image", "."), "image_dot"),
    _dataset_json(_entry("label", None), "label_null"),
    _dataset_json(_entry("image", "./imagesTr"), "image_is_folder"),
    _sites("../evil"),
    _sites("/tmp/evil"),
    _sites(""),
    _sites(7),
    _sites("site-9"),
    _sites("a b"),
    _file("delete"),
    _file("truncate"),
    _file("garbage"),
    _file("empty"),
    _file("folder"),
    _file("flip_byte"),
]


def _broken_json(task: Path, rng: np.random.Generator) -> None:
    path = task / ("dataset.json" if rng.random() < 0.5 else "sites.json")
    raw = path.read_bytes()
    path.write_bytes(raw[: int(rng.integers(0, len(raw)))] + b"\xff\xfe")


MUTATIONS.append(_broken_json)


def _configs() -> list[DataConfig]:
    base = DataConfig(resolution=16, sites=1)
    return [
        base,
        replace(base, slice_policy="all"),
        replace(base, labels=[1]),
        replace(base, labels=[2]),
        replace(base, labels=[9]),
        replace(base, nan_hu=-1024.0),
        replace(base, partition="iid"),
        replace(base, partition="iid", site_name="hospital-a"),
    ]


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for path in root.rglob("*"):
        if path == skip or skip in path.parents:
            continue
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


# 1000 cases: 10-12 s on 2 cores (Nov 2026), so not marked slow.
def test_fuzz_prepare_and_predict_fail_closed(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("fuzzbase")
    pristine = synth_task(base / "task", sites=1, patients_per_site=3, size=16, slices=4)
    cfg = Config().replace(**{"data.resolution": 16, "model.features": 4})
    torch.manual_seed(0)
    checkpoint = base / "checkpoint.pt"
    save_checkpoint(checkpoint, build_model(cfg.model).state_dict(), cfg)
    configs = _configs()
    rng = np.random.default_rng(2026)
    outcomes: dict[str, int] = {"ok": 0, "refused": 0}
    started = time.perf_counter()
    for case in range(CASES):
        root = tmp_path_factory.mktemp(f"fuzz{case}")
        task = Path(shutil.copytree(pristine, root / "task"))
        shutil.copy(task / "imagesTr" / "liver_000.nii.gz", root / "outside.nii.gz")
        picked = [MUTATIONS[int(i)] for i in rng.integers(len(MUTATIONS), size=rng.integers(1, 4))]
        data_cfg = configs[int(rng.integers(len(configs)))]
        what = f"case {case}: {[m.__name__ for m in picked]}, {data_cfg}"
        for mutate in picked:
            # A mutation may not apply to a task an earlier one already broke: skip it.
            with contextlib.suppress(Exception):
                mutate(task, rng)
        out = root / "out" / "cache"
        before = _snapshot(root, root / "out")
        try:
            prepare_cache(task, out, data_cfg, seed=0)
            outcomes["ok"] += 1
        except PrivsegError as exc:
            outcomes["refused"] += 1
            assert str(exc), what
            assert not out.exists(), f"{what}: a refused prepare left {out}"
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{what}: traceback {type(exc).__name__}: {exc}")
        assert _snapshot(root, root / "out") == before, f"{what}: wrote outside --out"
        if case % PREDICT_EVERY == 0:
            image = (
                sorted((task / "imagesTr").glob("*"))[0] if (task / "imagesTr").is_dir() else None
            )
            if image is not None:
                try:
                    segment_nifti(checkpoint, image, root / "out" / "mask.nii.gz")
                except PrivsegError:
                    pass
                except Exception as exc:  # noqa: BLE001
                    pytest.fail(f"{what}: predict {image.name}: {type(exc).__name__}: {exc}")
        if case % CLI_EVERY == 0:
            result = CliRunner().invoke(
                app, ["data", "prepare", str(task), "--out", str(root / "cli"), "--sites", "1",
                      "--set", "data.resolution=16"],
            )  # fmt: skip
            assert result.exit_code in (0, 2), f"{what}: exit {result.exit_code} {result.output}"
            assert result.exit_code == 0 or isinstance(result.exception, SystemExit), what
            assert "Traceback" not in result.output, what
    elapsed = time.perf_counter() - started
    print(f"fuzz: {CASES} cases in {elapsed:.1f} s: {outcomes}")
    assert outcomes["ok"] > 10 and outcomes["refused"] > 100  # both paths were exercised


# ---- nnU-Net v2 datasets (issue 17): the same promise for the nnU-Net reader ----------------
NNUNET_CASES = 200


def _nn_json(change: Callable[[dict, np.random.Generator], object], name: str) -> Mutation:
    def mutate(root: Path, rng: np.random.Generator) -> None:
        meta = json.loads((root / "dataset.json").read_text())
        new = change(meta, rng)
        (root / "dataset.json").write_text(json.dumps(meta if new is None else new))

    mutate.__name__ = f"nnunet_json.{name}"
    return mutate


def _nn_image(root: Path, rng: np.random.Generator) -> Path:
    images = sorted((root / "imagesTr").iterdir())
    return images[int(rng.integers(len(images)))]


def _nn_rename(suffix: str) -> Mutation:
    def mutate(root: Path, rng: np.random.Generator) -> None:
        image = _nn_image(root, rng)
        image.rename(image.with_name(image.name.replace("_0000.nii.gz", suffix)))

    mutate.__name__ = f"nnunet_rename{suffix}"
    return mutate


def _nn_extra(kind: str) -> Mutation:
    def mutate(root: Path, rng: np.random.Generator) -> None:
        image = _nn_image(root, rng)
        if kind == "label":
            shutil.copy(image, root / "labelsTr" / "stray.nii.gz")
        else:
            shutil.copy(image, image.with_name(image.name.replace("_0000", "_0001")))

    mutate.__name__ = f"nnunet_extra.{kind}"
    return mutate


NNUNET_MUTATIONS: list[Mutation] = [
    _nn_json(lambda m, r: m.update(numTraining=m["numTraining"] + 1), "numTraining+1"),
    _nn_json(lambda m, r: m.update(numTraining="3"), "numTraining_str"),
    _nn_json(lambda m, r: m.pop("numTraining"), "no_numTraining"),
    _nn_json(lambda m, r: m.update(channel_names={"0": "CT", "1": "CT"}), "two_channels"),
    _nn_json(lambda m, r: m.update(channel_names={"0": "T2"}), "mri"),
    _nn_json(lambda m, r: m.update(channel_names=["CT"]), "channels_list"),
    _nn_json(lambda m, r: m.update(labels={"background": 0, "liver": [1, 2]}), "region"),
    _nn_json(lambda m, r: m.update(labels={"background": 0, "liver": 1.5}), "float_label"),
    _nn_json(lambda m, r: m.update(labels={"liver": 1, "cancer": 2}), "no_background"),
    _nn_json(lambda m, r: m.update(labels={"background": 0, "liver": 1}), "undeclared_2"),
    _nn_json(lambda m, r: m.update(labels={"background": 0, "a": 1, "b": 1}), "same_value"),
    _nn_json(lambda m, r: m.update(file_ending=".mha"), "mha"),
    _nn_json(lambda m, r: m.update(file_ending=None), "ending_null"),
    _nn_json(lambda m, r: m.update(regions_class_order=[1, 2]), "regions"),
    _nn_json(lambda m, r: [m], "top_level_list"),
    _nn_rename("_0001.nii.gz"),
    _nn_rename(".nii.gz"),
    _nn_rename("_0000.nii"),
    _nn_extra("label"),
    _nn_extra("channel"),
    _file("delete"),
    _file("truncate"),
    _file("garbage"),
    _file("flip_byte"),
    _data(_voxel(np.nan), "nan"),
    _data(_voxel(7), "seven"),
    _data(lambda a, r: a[:, :, :1], "one_slice"),
]


def _nn_files(root: Path, rng: np.random.Generator) -> Path:
    """An image or a label file of an nnU-Net dataset (for the shared file mutations)."""
    folder = root / ("imagesTr" if rng.random() < 0.6 else "labelsTr")
    files = sorted(folder.iterdir())
    return files[int(rng.integers(len(files)))]


# 200 cases: ~3 s on 2 cores (Nov 2026).
def test_fuzz_prepare_of_nnunet_datasets_fails_closed(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from task_formats import to_nnunet

    base = tmp_path_factory.mktemp("nnfuzz")
    task = synth_task(base / "task", sites=1, patients_per_site=3, size=16, slices=4)
    pristine = to_nnunet(task, base / "Dataset001_Fuzz")
    # The shared file and data mutations pick MSD files through _files: point it at nnU-Net's.
    monkeypatch.setattr(sys.modules[__name__], "_files", _nn_files)
    rng = np.random.default_rng(17)
    outcomes = {"ok": 0, "refused": 0}
    for case in range(NNUNET_CASES):
        root = tmp_path_factory.mktemp(f"nn{case}")
        data = Path(shutil.copytree(pristine, root / "data"))
        picked = [
            NNUNET_MUTATIONS[int(i)]
            for i in rng.integers(len(NNUNET_MUTATIONS), size=rng.integers(0, 3))
        ]
        what = f"case {case}: {[m.__name__ for m in picked]}"
        for mutate in picked:
            with contextlib.suppress(Exception):
                mutate(data, rng)
        out = root / "out" / "cache"
        before = _snapshot(root, root / "out")
        try:
            prepare_cache(data, out, DataConfig(resolution=16, sites=1), seed=0)
            outcomes["ok"] += 1
        except PrivsegError as exc:
            outcomes["refused"] += 1
            assert str(exc) and not out.exists(), what
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{what}: traceback {type(exc).__name__}: {exc}")
        assert _snapshot(root, root / "out") == before, f"{what}: wrote outside --out"
    print(f"nnU-Net fuzz: {NNUNET_CASES} cases: {outcomes}")
    assert outcomes["ok"] > 10 and outcomes["refused"] > 50
