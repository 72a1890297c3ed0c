"""What every input reader gives prepare: a :class:`Task` of :class:`Case` s, each loaded as a
:class:`Volume`. The readers (:data:`privseg.core.plugins.READERS`, each a :class:`Reader`) differ
only in how they find the cases and read the image; :mod:`privseg.data.sources` picks the reader.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from privseg.core.errors import DataError

if TYPE_CHECKING:
    import nibabel as nib


@dataclass(frozen=True)
class Case:
    """One training case: an image (a NIfTI file, or a DICOM series folder) and its label file."""

    case_id: str
    image: Path
    label: Path
    series: str | None = None  # DICOM: the SeriesInstanceUID to read from a folder of several


@dataclass(frozen=True)
class Task:
    """A validated input folder.

    ``labels`` maps label value to name (0 = background), or is ``None`` when the format
    declares none (DICOM: any integer 0..255 is accepted). ``index`` is the file that lists or
    describes the cases (``dataset.json``, ``series.csv``); ``kind`` is the reader's name in
    :data:`privseg.core.plugins.READERS` (``msd``, ``nnunet``, ``dicom``), set by
    :func:`privseg.data.sources.read_source` from the table alone; ``site_map`` is a
    patient -> site map the index carries itself (the DICOM CSV's ``site`` column).
    """

    root: Path
    name: str
    labels: dict[int, str] | None
    cases: list[Case]
    index: Path
    kind: str = ""
    site_map: dict[str, str] | None = None
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Volume:
    """One case in canonical RAS: ``image`` float32 HU and ``label`` uint8, both [X, Y, Z]."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]

    def content(self) -> str:
        """The patient's content fingerprint: sha256 of its image voxels in canonical RAS (the
        shape, then HU rounded to 0.01, NaN as one value, -0 as 0). The privacy ledger keys a
        patient by it, so copying, moving, renaming, re-preparing, re-partitioning or
        re-annotating (labels do not enter) the data does not change whose budget a release
        counts against. Any change to the image voxels (a crop, a re-export, another
        reconstruction) makes another fingerprint: docs/PRIVACY.md says what that means."""
        image = np.round(np.asarray(self.image, dtype=np.float64), 2) + 0.0  # -0.0 -> 0.0
        image = np.where(np.isnan(image), np.inf, image)  # every NaN pattern is one value
        data = np.ascontiguousarray(image, dtype=np.float64)
        h = hashlib.sha256(b"privseg-patient-v2\n" + repr(data.shape).encode() + b"\n")
        h.update(memoryview(data).cast("B"))
        return h.hexdigest()


def _image_file(image: Path) -> list[Path]:
    return [image]


@dataclass(frozen=True)
class Reader:
    """One input format, registered in :data:`privseg.core.plugins.READERS`: the same entry serves
    ``data prepare`` and training (a task folder) and ``predict`` (one CT).

    ``finds(path)``: whether ``path`` is a task of this format (readers are tried in table
    order); ``read_task(path)``: the validated Task (``kind`` = the reader's name);
    ``load_case(case, max_voxels)``: one case as a Volume; ``image_files(case.image)``: the
    files a case's image is read from (what the cache fingerprint hashes). ``is_ct(path)`` and
    ``read_ct(path, max_voxels)`` (the CT on its own grid, HU) let ``predict`` read one CT of
    the format; None: this format's CTs are read by another reader (nnU-Net: NIfTI, as MSD).
    """

    finds: Callable[[Path], bool]
    read_task: Callable[[Path], Task]
    load_case: Callable[[Case, int], Volume]
    image_files: Callable[[Path], list[Path]] = _image_file
    is_ct: Callable[[Path], bool] | None = None
    read_ct: Callable[[Path, int], nib.Nifti1Image] | None = None


def task_path(root: Path, raw: Any, where: str, example: str) -> Path:
    """A path listed in a task's index: relative, inside the task folder (symlinks allowed)."""
    text = raw if isinstance(raw, str) else None
    normal = os.path.normpath(text) if text else ""
    if not text or "\x00" in text or os.path.isabs(text) or normal.split(os.sep)[0] in ("..", "."):
        raise DataError(
            f"{where} = {raw!r} is invalid: expected a relative path inside the task folder "
            f"{root}, such as {example!r} (absolute paths and '..' are refused)"
        )
    return root / normal


def check_case_id(case_id: str, source: object) -> str:
    """``case_id`` unless it is empty or only dots: ``...nii.gz`` would be case ``..``, which
    names no patient and reads as a parent folder wherever a case id becomes a path."""
    if not case_id.strip("."):
        raise DataError(
            f"{source}: the file name gives case id {case_id!r}, which is empty or only dots; "
            "rename the file (e.g. liver_001.nii.gz)"
        )
    return case_id


def duplicate_ids(cases: list[Case]) -> list[str]:
    """Case ids listed more than once, sorted."""
    counts = Counter(c.case_id for c in cases)
    return sorted(i for i, n in counts.items() if n > 1)
