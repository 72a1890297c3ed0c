"""Which reader an input folder needs, and loading its cases: one entry point for prepare.

- ``dataset.json`` with a ``training`` list: an MSD task (:mod:`privseg.data.msd`);
- ``dataset.json`` with ``channel_names`` / ``file_ending``: an nnU-Net v2 raw dataset
  (:mod:`privseg.data.nnunet`);
- ``series.csv`` (or a ``.csv`` file given directly): DICOM series with NIfTI labels
  (:mod:`privseg.data.dicom_task`).

Every reader gives a :class:`~privseg.data.task.Task`; :func:`load_volume` gives each case as
the same :class:`~privseg.data.task.Volume`, so building a cache is one code path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from privseg.data.dicom import series_files
from privseg.data.dicom_task import SERIES_CSV, load_dicom_case, read_dicom_task
from privseg.data.msd import DATASET_JSON, load_case, read_dataset_json, read_task
from privseg.data.nnunet import is_nnunet, read_nnunet
from privseg.data.task import Case, Task, Volume
from privseg.errors import DataError

FORMATS = "an MSD task or nnU-Net v2 dataset (dataset.json) or DICOM series (series.csv)"
_LOADERS: dict[str, Callable[[Case, int], Volume]] = {
    "msd": load_case,
    "nnunet": load_case,
    "dicom": load_dicom_case,
}


def is_source(path: Path) -> bool:
    """Whether ``path`` looks like an input privseg can read (its reader checks the rest)."""
    if path.is_file():
        return path.suffix.lower() == ".csv"
    return (path / DATASET_JSON).is_file() or (path / SERIES_CSV).is_file()


def read_source(src: str | Path) -> Task:
    """Detect the format of ``src`` and read it with its reader."""
    src = Path(src)
    if src.is_file() and src.suffix.lower() == ".csv":
        return read_dicom_task(src)
    if not src.is_dir():
        raise DataError(f"task folder {src} does not exist (expected {FORMATS})")
    if (src / DATASET_JSON).is_file():
        meta = read_dataset_json(src / DATASET_JSON)
        return read_nnunet(src, meta) if is_nnunet(meta) else read_task(src)
    if (src / SERIES_CSV).is_file():
        return read_dicom_task(src)
    raise DataError(f"{src} has neither {DATASET_JSON} nor {SERIES_CSV}: expected {FORMATS}")


def load_volume(task: Task, case: Case, max_voxels: int) -> Volume:
    """One case of ``task`` as a canonical RAS Volume (HU image, uint8 label); a volume over
    ``max_voxels`` (data.max_voxels) is refused before it is read."""
    return _LOADERS[task.kind](case, max_voxels)


def case_files(task: Task, case: Case) -> list[Path]:
    """The files a case is read from (a DICOM series: every file of its folder)."""
    images = series_files(case.image) if task.kind == "dicom" else [case.image]
    return [*images, case.label]
