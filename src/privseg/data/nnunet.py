"""Read nnU-Net v2 raw datasets (``dataset.json`` with ``channel_names``, ``imagesTr``,
``labelsTr``).

The format (nnU-Net's ``documentation/dataset_format.md``): images
``imagesTr/{case}_{XXXX}{file_ending}`` (XXXX the 4-digit channel index), labels
``labelsTr/{case}{file_ending}``; ``dataset.json`` has ``channel_names`` (``{"0": "CT"}``),
``labels`` (name -> int, background 0), ``numTraining`` and ``file_ending``. There is no list
of cases: they come from the file names. privseg takes one CT channel, integer labels and NIfTI
files; anything else is refused naming the field or file. Volumes load as MSD volumes do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from privseg.core.errors import DataError
from privseg.data.msd import DATASET_JSON, load_case, read_dataset_json
from privseg.data.task import Case, Reader, Task, check_case_id

FILE_ENDINGS = (".nii.gz", ".nii")
# nnU-Net's channel suffix: case_0000.nii.gz is channel 0 of case "case".
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def is_nnunet(meta: dict[str, Any]) -> bool:
    """An nnU-Net v2 dataset.json: no MSD ``training`` list, nnU-Net's own keys instead."""
    return "training" not in meta and ("channel_names" in meta or "file_ending" in meta)


def read_nnunet(root: Path, meta: dict[str, Any]) -> Task:
    """Check ``dataset.json`` (``meta``) against the files and list the training cases."""
    path = root / DATASET_JSON
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        if key not in meta:
            raise DataError(f"{path}: field {key!r} is missing (an nnU-Net v2 dataset.json)")
    for key, why in (
        ("regions_class_order", "region-based training"),
        ("dataset", "an explicit file list"),
    ):
        if key in meta:
            raise DataError(
                f"{path}: field {key!r} ({why}) is not supported; privseg reads "
                "imagesTr/{case}_0000{file_ending} and labelsTr/{case}{file_ending} with integer "
                "labels"
            )
    _check_channels(meta["channel_names"], path)
    labels = _parse_labels(meta["labels"], path)
    ending = meta["file_ending"]
    if ending not in FILE_ENDINGS:
        raise DataError(
            f"{path}: field 'file_ending' = {ending!r} is not supported; privseg reads NIfTI "
            f"({' or '.join(FILE_ENDINGS)})"
        )
    cases = _find_cases(root, ending)
    expected = meta["numTraining"]
    if type(expected) is not int or expected != len(cases):
        raise DataError(
            f"{path}: field 'numTraining' = {expected!r} does not match the {len(cases)} "
            f"training case(s) found in {root / 'imagesTr'}"
        )
    name = str(meta.get("name") or root.name)
    return Task(root, name, labels, cases, index=path, meta=meta)


def _check_channels(raw: Any, path: Path) -> None:
    if not isinstance(raw, dict) or not raw:
        raise DataError(
            f'{path}: field \'channel_names\' = {raw!r} is invalid; expected {{"0": "CT"}}'
        )
    if len(raw) != 1:
        raise DataError(
            f"{path}: field 'channel_names' = {raw!r} declares {len(raw)} channels; privseg "
            'segments single-channel CT: expected {"0": "CT"}'
        )
    ((key, value),) = raw.items()
    if str(key) not in ("0", "0000") or str(value).upper() != "CT":
        raise DataError(
            f"{path}: field 'channel_names' = {raw!r} is not one CT channel; privseg windows "
            'Hounsfield units: expected {"0": "CT"}'
        )


def _parse_labels(raw: Any, path: Path) -> dict[int, str]:
    """nnU-Net's ``{"background": 0, "liver": 1}`` -> privseg's ``{0: "background", 1: ...}``."""
    if not isinstance(raw, dict) or not raw:
        raise DataError(
            f"{path}: field 'labels' = {raw!r} is invalid; expected names to integers, "
            '{"background": 0, "liver": 1, ...}'
        )
    out: dict[int, str] = {}
    for name, value in raw.items():
        where = f"{path}: field 'labels' entry {name!r} = {value!r}"
        if isinstance(value, list | tuple):
            raise DataError(
                f"{where} is a region (a list of labels); region-based nnU-Net datasets are "
                "not supported: give each label one integer"
            )
        if str(name).lower() == "ignore":
            raise DataError(
                f"{where}: an ignore label (unannotated voxels) is not supported; privseg "
                "would count its voxels as foreground"
            )
        if type(value) is not int or not 0 <= value <= 255:
            raise DataError(f"{where} is invalid; expected an integer 0..255")
        if value in out:
            raise DataError(f"{where}: value {value} is also label {out[value]!r}")
        out[value] = str(name)
    if 0 not in out:
        raise DataError(f"{path}: field 'labels' = {raw!r} has no background 0")
    return out


def _find_cases(root: Path, ending: str) -> list[Case]:
    """Cases from ``imagesTr/{case}_0000{ending}``, each with ``labelsTr/{case}{ending}``."""
    images, labels = root / "imagesTr", root / "labelsTr"
    for folder in (images, labels):
        if not folder.is_dir():
            raise DataError(f"{folder} does not exist: an nnU-Net dataset needs imagesTr/labelsTr")
    cases = []
    for path in sorted(images.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue  # as nnU-Net does: only files with the dataset's ending are images
        match = _CHANNEL.match(path.name[: -len(ending)])
        if match is None:
            raise DataError(
                f"{path}: the name does not follow nnU-Net's {{case}}_{{XXXX}}{ending} "
                f"(e.g. liver_001_0000{ending})"
            )
        if match["channel"] != "0000":
            raise DataError(
                f"{path} is channel {int(match['channel'])}, but privseg segments one CT channel "
                f'(dataset.json \'channel_names\' {{"0": "CT"}}, files *_0000{ending} only)'
            )
        case_id = check_case_id(match["case"], path)
        label = labels / f"{case_id}{ending}"
        if not path.is_file():
            raise DataError(f"{path} is not a file")
        if not label.is_file():
            raise DataError(f"{path}: its label file {label} does not exist")
        cases.append(Case(case_id=case_id, image=path, label=label))
    known = {c.label.name for c in cases}
    for path in sorted(labels.iterdir()):
        if path.name.endswith(ending) and path.name not in known and not path.name.startswith("."):
            image = images / f"{path.name[: -len(ending)]}_0000{ending}"
            raise DataError(f"{path}: label without its image {image}")
    if not cases:
        raise DataError(f"{images}: no training images *_0000{ending}; expected at least one case")
    return cases


def _is_task(path: Path) -> bool:
    index = path / DATASET_JSON
    return path.is_dir() and index.is_file() and is_nnunet(read_dataset_json(index))


def read_nnunet_task(root: Path) -> Task:
    return read_nnunet(root, read_dataset_json(root / DATASET_JSON))


#: Volumes are NIfTI, loaded (and predicted on) as MSD's are.
READER = Reader(finds=_is_task, read_task=read_nnunet_task, load_case=load_case)
