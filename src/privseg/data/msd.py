"""Read Medical Segmentation Decathlon task folders (``dataset.json``, ``imagesTr``,
``labelsTr``); the NIfTI checks every reader shares are :mod:`privseg.data.nifti`.

Every problem a user can cause (missing files, bad JSON, mismatched image/label) raises
:class:`~privseg.core.errors.DataError` naming the file and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privseg.core.errors import DataError
from privseg.core.io import read_json_object, write_json
from privseg.data.nifti import MAX_VOXELS, NIFTI_SUFFIX, is_nifti, open_nifti, volume_of
from privseg.data.task import (
    Case,
    Reader,
    Task,
    Volume,
    check_case_id,
    duplicate_ids,
    task_path,
)

DATASET_JSON = "dataset.json"


def case_id_of(path: str | Path) -> str:
    """``imagesTr/liver_7.nii.gz`` -> ``liver_7`` (``...nii.gz`` -> ``..``: refused)."""
    name = Path(path).name
    case_id = name[: -len(NIFTI_SUFFIX)] if name.endswith(NIFTI_SUFFIX) else Path(name).stem
    return check_case_id(case_id, path)


def read_task(root: str | Path) -> Task:
    """Read and check ``dataset.json`` and that every listed image and label file exists."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"task folder {root} does not exist (expected an MSD task folder)")
    meta = read_dataset_json(root / DATASET_JSON)
    if not isinstance(meta.get("training"), list):
        raise DataError(
            f"{root / DATASET_JSON}: field 'training' is missing or not a list; expected "
            '[{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]'
        )
    labels = _parse_labels(meta.get("labels"), root / DATASET_JSON)
    cases = [_parse_case(root, entry, i) for i, entry in enumerate(meta["training"])]
    if not cases:
        raise DataError(f"{root / DATASET_JSON}: 'training' is empty; expected at least one case")
    dupes = duplicate_ids(cases)
    if dupes:
        raise DataError(f"{root / DATASET_JSON}: 'training' lists case ids twice: {dupes}")
    name = str(meta.get("name") or root.name)
    return Task(root, name, labels, cases, index=root / DATASET_JSON, meta=meta)


def read_dataset_json(path: Path) -> dict[str, Any]:
    """``dataset.json`` as a JSON object (MSD and nnU-Net v2 share the name)."""
    missing = "is missing: an MSD or nnU-Net task folder needs a dataset.json"
    return read_json_object(path, "task index", missing)


def _parse_labels(raw: Any, path: Path) -> dict[int, str]:
    if raw is None:
        return {0: "background", 1: "foreground"}
    try:
        return {int(k): str(v) for k, v in dict(raw).items()}
    except (TypeError, ValueError) as exc:
        raise DataError(
            f'{path}: field \'labels\' = {raw!r} is invalid; expected {{"0": "background", ...}}'
        ) from exc


def _parse_case(root: Path, entry: Any, index: int) -> Case:
    where = f"{root / DATASET_JSON}: training[{index}]"
    if not isinstance(entry, dict) or not {"image", "label"} <= set(entry):
        raise DataError(f"{where} = {entry!r}: expected an object with keys 'image' and 'label'")
    image, label = (
        task_path(root, entry[key], f"{where}.{key}", "./imagesTr/case.nii.gz")
        for key in ("image", "label")
    )
    if not image.is_file():
        raise DataError(f"{where}: image file {image} does not exist (its label is {label})")
    if not label.is_file():
        raise DataError(f"{where}: label file {label} does not exist (image {image} has no label)")
    return Case(case_id=case_id_of(image), image=image, label=label)


def load_case(case: Case, max_voxels: int = MAX_VOXELS) -> Volume:
    """Load image and label, checking that they share shape and affine and labels are integers."""
    return volume_of(case, open_nifti(case.image, max_voxels), open_nifti(case.label, max_voxels))


def write_dataset_json(
    root: Path,
    *,
    name: str,
    labels: dict[int, str],
    case_ids: list[str],
    description: str = "",
    reference: str = "",
    licence: str = "",
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a ``dataset.json`` that ``monai.apps.DecathlonDataset`` accepts (``extra``:
    more top-level entries, which MSD readers ignore)."""
    write_json(
        root / DATASET_JSON,
        {
            "name": name,
            "description": description,
            "reference": reference,
            "licence": licence,
            "release": "1.0",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": {str(k): v for k, v in sorted(labels.items())},
            "numTraining": len(case_ids),
            "numTest": 0,
            "training": [
                {"image": f"./imagesTr/{c}{NIFTI_SUFFIX}", "label": f"./labelsTr/{c}{NIFTI_SUFFIX}"}
                for c in case_ids
            ],
            "test": [],
            **(extra or {}),
        },
    )


def _is_task(path: Path) -> bool:
    """A folder with a ``dataset.json`` (nnU-Net's are found first: READERS order)."""
    return path.is_dir() and (path / DATASET_JSON).is_file()


READER = Reader(
    finds=_is_task, read_task=read_task, load_case=load_case, is_ct=is_nifti, read_ct=open_nifti
)
