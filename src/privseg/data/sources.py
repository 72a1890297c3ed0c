"""Which reader an input needs, and loading its cases: the one entry point for ``data prepare``,
training and ``predict``.

The readers are the entries of :data:`privseg.core.plugins.READERS` (MSD, nnU-Net v2, DICOM series;
see :class:`~privseg.data.task.Reader`). Every reader gives a :class:`~privseg.data.task.Task`;
:func:`load_volume` gives each case as the same :class:`~privseg.data.task.Volume`, so building
a cache is one code path; :func:`load_ct` reads one CT for ``predict`` the same way.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import TYPE_CHECKING

from privseg.core.errors import DataError
from privseg.core.plugins import READERS, ct_formats, input_formats
from privseg.data.task import Case, Reader, Task, Volume

if TYPE_CHECKING:
    import nibabel as nib


def _reader(name: str) -> Reader:
    reader: Reader = READERS.get(name)
    return reader


def find_reader(path: Path) -> Reader | None:
    """The first reader (in READERS order) that finds a task at ``path``, or None."""
    return next((_reader(n) for n in READERS if _reader(n).finds(path)), None)


def is_source(path: Path) -> bool:
    """Whether ``path`` looks like an input privseg can read (its reader checks the rest)."""
    return find_reader(path) is not None


def read_source(src: str | Path) -> Task:
    """Detect the format of ``src`` and read it with its reader."""
    src = Path(src)
    name = next((n for n in READERS if _reader(n).finds(src)), None)
    if name is not None:  # the task's kind is the name it is registered under: one place
        return dataclasses.replace(_reader(name).read_task(src), kind=name)
    if not src.exists():
        raise DataError(f"task folder {src} does not exist (expected {input_formats()})")
    raise DataError(f"{src} is no task privseg reads: expected {input_formats()}")


def load_volume(task: Task, case: Case, max_voxels: int) -> Volume:
    """One case of ``task`` as a canonical RAS Volume (HU image, uint8 label); a volume over
    ``max_voxels`` (data.max_voxels) is refused before it is read."""
    return _reader(task.kind).load_case(case, max_voxels)


def case_files(task: Task, case: Case) -> list[Path]:
    """The files a case is read from (a DICOM series: every file of its folder)."""
    return [*_reader(task.kind).image_files(case.image), case.label]


def ct_kind(path: Path) -> str | None:
    """The name of the reader that reads ``path`` as one CT (``predict``), or None."""
    for name in READERS:
        is_ct = _reader(name).is_ct
        if is_ct is not None and is_ct(path):
            return name
    return None


def load_ct(path: Path, max_voxels: int, series: str | None = None) -> nib.Nifti1Image:
    """One CT for ``predict``, read by its format's reader, on its own grid (HU); a DataError
    naming what ``predict`` reads when no reader reads ``path``. ``series`` chooses one series
    of a folder holding several (for a reader whose ``read_ct`` takes ``series``)."""
    name = ct_kind(path)
    read = None if name is None else _reader(name).read_ct
    if read is None:
        what = "does not exist" if not path.exists() else "is no CT privseg reads"
        raise DataError(f"{path} {what}: expected {ct_formats()}")
    if series is None:
        return read(path, max_voxels)
    if "series" not in inspect.signature(read).parameters:
        raise DataError(f"{path}: --series chooses among the series of a DICOM folder")
    return read(path, max_voxels, series=series)
