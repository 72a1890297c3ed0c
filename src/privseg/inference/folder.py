"""Segment every CT of a folder: NIfTI files, DICOM series subfolders, or one DICOM series (any
CT format of :data:`privseg.core.plugins.READERS`, one format per folder).

Every output name is checked before the first case is read, against each other as well as the
inputs. A CT that cannot be read is reported and the others still run. The output folder's
``.privseg-predictions.json`` records the checkpoint, the options and each case's files (with
their sha256 once written): ``resume`` (``--continue``) skips the cases an earlier run finished
and redoes one it was writing, as nnU-Net skips finished cases, so a rerun after fixing one bad
file completes the folder.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privseg.core.errors import DataError, PrivsegError
from privseg.core.io import file_sha256, make_folder, read_json, write_json
from privseg.core.output import check_not_in_rebuilt, check_not_input
from privseg.data.sources import ct_kind
from privseg.inference.volume import (
    claim_outputs,
    companions,
    load_model,
    nifti_stem,
    predict_ct,
    read_ct,
    write_outputs,
)

log = logging.getLogger(__name__)
RECORD = ".privseg-predictions.json"


@dataclass
class FolderResult:
    """What a folder run did: each written case's stats, the cases an earlier run had finished,
    and the cases that failed with the reason."""

    written: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def find_inputs(folder: Path) -> list[Path]:
    """The CTs of ``folder`` (the entries a reader reads as one CT: NIfTI files, DICOM series
    subfolders), all of one format; none: the folder itself (one DICOM series). Hidden
    entries are skipped."""
    if not folder.is_dir():
        raise DataError(f"input folder {folder} does not exist")
    by_kind: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        kind = ct_kind(path)
        if kind is not None:
            by_kind.setdefault(kind, []).append(path)
    if len(by_kind) > 1:
        found = ", ".join(f"{k}: {v[0].name}" for k, v in by_kind.items())
        raise DataError(f"input folder {folder} holds CTs of several formats ({found}); give one")
    return next(iter(by_kind.values()), [folder])


def segment_folder(
    checkpoint: Path,
    folder: Path,
    out: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    device: str = "auto",
    probabilities: bool = False,
    preview: bool = False,
    threshold: float = 0.5,
    progress: Callable[[str, int, int], None] | None = None,
) -> FolderResult:
    """Write ``out/<case>.nii.gz`` (and companions) for each CT of ``folder``.

    ``out`` (created 0700 if missing) must not be, or lie inside, the input folder. A case
    that fails is in ``failed`` and the others still run; ``resume`` skips finished cases.
    """
    folder, out = Path(folder), Path(out)
    inputs = find_inputs(folder)
    names = [nifti_stem(p.name) for p in inputs]  # a DICOM series: its folder name
    if len(set(names)) != len(names):
        raise DataError(f"input folder {folder}: two inputs give the same case name")
    check_not_input(out, [folder], folder=True)  # a run folder holding the checkpoint is fine
    check_not_in_rebuilt(out, folder=True)
    if not out.parent.is_dir():
        raise DataError(f"output {out}: folder {out.parent} does not exist; create it first")
    plans = {n: companions(out / f"{n}.nii.gz", probabilities, preview) for n in names}
    _check_collisions(plans)
    options = {"threshold": threshold, "probabilities": probabilities, "preview": preview}
    created = not out.exists()
    make_folder(out)
    try:
        model, cfg = load_model(checkpoint, device)
        record = {"checkpoint": file_sha256(checkpoint), "options": options, "cases": {}}
        earlier = _earlier(out, record) if resume else {}
        digests = {n: _input_digest(p) for p, n in zip(inputs, names, strict=True)}
        result = FolderResult(
            skipped=[n for n in names if _finished(earlier.get(n), plans[n], digests[n])]
        )
        ours = _ours(out, earlier)
        todo = [(p, n) for p, n in zip(inputs, names, strict=True) if n not in result.skipped]
        for _, name in todo:
            claim_outputs(plans[name], [folder, checkpoint], overwrite, ours)
        record["cases"] = dict(earlier)  # a case that fails now keeps its earlier entry
        for path, name in todo:
            try:
                ct = read_ct(path, cfg.data.nan_hu, cfg.data.max_voxels)
                mask, probs = predict_ct(
                    model, cfg, ct, threshold=threshold, probabilities=probabilities
                )
            except (PrivsegError, ValueError, OSError) as exc:  # this CT is bad; the rest run
                # a reader's own error (nibabel's HeaderDataError is a ValueError) too: one
                # bad case never stops the folder half-way
                reason = str(exc) if isinstance(exc, PrivsegError) else f"{path}: {exc!r}"
                log.warning("case %s failed: %s", name, reason)
                result.failed[name] = reason
                continue
            files = plans[name]
            entry: dict[str, Any] = {
                "files": {k: p.name for k, p in files.items()},
                "input": digests[name],  # a CT replaced since is redone by --continue
            }
            record["cases"][name] = entry | {"status": "writing"}  # ours, should this stop
            write_json(out / RECORD, record)
            result.written.append(write_outputs(files, ct, cfg, mask, probs))
            sha = {k: file_sha256(p) for k, p in files.items()}
            record["cases"][name] = entry | {"status": "done", "sha256": sha}
            write_json(out / RECORD, record)
            if progress is not None:
                progress("predict", len(result.written) + len(result.failed), len(todo))
    except BaseException:
        if created and not any(out.iterdir()):  # a refused run leaves no empty folder behind
            out.rmdir()
        raise
    return result


def _check_collisions(plans: dict[str, dict[str, Path]]) -> None:
    """No two outputs share a name: ``a_prob.nii.gz`` would be case a's probabilities and
    case a_prob's mask (inputs and the checkpoint are checked by ``claim_outputs``)."""
    owner: dict[Path, str] = {}
    for name, files in plans.items():
        for kind, path in files.items():
            mine = f"case {name}'s {kind}"
            other = owner.setdefault(path.resolve(), mine)
            if other != mine:
                raise DataError(
                    f"output {path} would be both {other} and {mine}; rename one of the "
                    "inputs (nothing was written)"
                )


def _earlier(out: Path, record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The cases an earlier run recorded in ``out``; refused when it used another checkpoint
    or other options (its masks would not be this run's)."""
    path = out / RECORD
    if not path.is_file():
        return {}
    try:
        old = read_json(path)
        cases = {str(n): e for n, e in old["cases"].items() if isinstance(e["files"], dict)}
        same = (old["checkpoint"], old["options"]) == (record["checkpoint"], record["options"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path} is not privseg's record of predictions: {exc}") from exc
    if not same:
        raise DataError(
            f"--continue: {out} was written with another checkpoint or other options "
            f"({path}: {old['options']}); choose a new folder or rerun without --continue"
        )
    return cases


def _ours(out: Path, earlier: dict[str, dict[str, Any]]) -> frozenset[Path]:
    """Files an earlier run wrote and nobody changed since (or was writing when it stopped):
    they may be replaced; any other existing output is refused unless ``overwrite``."""
    ours = set()
    for entry in earlier.values():
        for kind, name in entry["files"].items():
            path = out / name
            sha = entry.get("sha256", {}).get(kind)
            if entry.get("status") == "writing" or (path.is_file() and sha == file_sha256(path)):
                ours.add(path)
    return frozenset(ours)


def _finished(entry: dict[str, Any] | None, files: dict[str, Path], digest: str) -> bool:
    """Every planned file was written by privseg from this very input and is unchanged."""
    if entry is None or entry.get("status") != "done" or entry.get("input") != digest:
        return False
    sha = entry.get("sha256", {})
    return entry["files"] == {k: p.name for k, p in files.items()} and all(
        p.is_file() and sha.get(k) == file_sha256(p) for k, p in files.items()
    )


def _input_digest(path: Path) -> str:
    """A CT's content: its file's sha256, or a DICOM series folder's files' (by name)."""
    if not Path(path).is_dir():
        return file_sha256(Path(path))
    h = hashlib.sha256()
    for item in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(f"{item.relative_to(path)}:{file_sha256(item)}\n".encode())
    return h.hexdigest()
