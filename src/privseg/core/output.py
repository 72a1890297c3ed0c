"""Claiming outputs: privseg never destroys what it did not write (issue 15).

Every command that writes a folder (``data synth``, ``data prepare``, ``train``, ``run``,
``server``, ``site``, ``attack``, ``audit``) claims it here first, and ``predict`` claims its
mask file here. The rules, in one place:

* A folder privseg writes holds a marker file ``.privseg`` (JSON: signature, kind, version and
  the top-level entries privseg owns there). A non-empty folder without the marker is refused
  unless ``overwrite`` is given; even then privseg only adds entries and never replaces or
  deletes one its marker does not list. A marker of another kind (a task folder given to
  ``prepare --out``) is always refused.
* An output never replaces an input: an output folder may not be, or contain, an input; an
  output file may not be the input file (same resolved path or same inode).
* One writer per output: ``.privseg.lock`` is held with ``flock`` while privseg writes, and a
  second writer is refused instead of silently losing one result.
* Folders are built under ``.privseg.partial-*`` inside the output and published entry by
  entry, the anchor entry (``manifest.json``, ``dataset.json``) last, so an interrupted build
  is never trusted; leftovers of a killed build are removed by the next claim.
* Patient data: folders privseg creates are 0700 and published files 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privseg.core.errors import DataError
from privseg.core.io import fsync_dir, make_folder, write_json

MARKER = ".privseg"
LOCK = ".privseg.lock"
PARTIAL_PREFIX = ".privseg.partial-"
TRASH_PREFIX = ".privseg.old-"
SIGNATURE = "privseg output folder"
MARKER_VERSION = 1
KINDS = {
    "task": "phantom task folder",
    "cache": "slice cache",
    "run": "run folder",
    "study": "study folder",
    "site": "site folder",
    "attack": "attack folder",
}
# Kinds whose folder is rebuilt and replaced: they may not even contain an input. Run and study
# folders only gain files, so a study may read the cache it prepared inside itself.
REBUILT_KINDS = frozenset({"task", "cache"})
_HOUSEKEEPING = frozenset({MARKER, LOCK})
# Folders this process claimed for its whole life (run and study folders): path -> lock fd.
_HELD: dict[Path, OutputFolder] = {}


@dataclass
class OutputFolder:
    """A claimed output folder: locked by this process until :meth:`release`."""

    root: Path
    kind: str
    created: bool
    owns: set[str] = field(default_factory=set)
    marked: bool = False  # this claim wrote the marker (the folder was new or foreign)
    _fd: int | None = field(default=None, repr=False)

    def check_free(self, names: Iterable[str]) -> None:
        """Refuse before any work when an entry to be written exists and privseg does not own it."""
        foreign = sorted(n for n in names if n not in self.owns and (self.root / n).exists())
        if foreign:
            raise DataError(
                f"{self.root}: would replace {', '.join(foreign)}, which privseg did not write "
                f"(not listed in {self.root / MARKER}); refusing. Move them away or choose "
                "another folder"
            )

    def own(self, names: Iterable[str]) -> None:
        """Entries about to be written in place (not through :meth:`build`): refused when one
        exists that privseg does not own; else listed in the marker before they are written."""
        names = set(names)
        self.check_free(names)
        if not names <= self.owns:
            self.owns |= names
            _write_marker(self.root, self.kind, self.owns)

    @contextlib.contextmanager
    def build(self, anchor: str) -> Iterator[Path]:
        """A staging folder inside the output; published only when the block succeeds."""
        tmp = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=self.root))
        try:
            yield tmp
            make_private(tmp)
            self._publish(tmp, anchor)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, tmp: Path, anchor: str) -> None:
        new = set(os.listdir(tmp))
        self.check_free(new)
        old = {n for n in self.owns if (self.root / n).exists() or (self.root / n).is_symlink()}
        # The marker lists old and new entries while they move: a crash leaves only entries
        # privseg can recognise, and no anchor until everything else is in place.
        _write_marker(self.root, self.kind, self.owns | new)
        trash = Path(tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=self.root))
        try:
            for name in sorted(old, key=lambda n: n != anchor):  # the anchor goes first
                os.replace(self.root / name, trash / name)
            for name in sorted(new, key=lambda n: n == anchor):  # ... and comes back last
                os.replace(tmp / name, self.root / name)
            self.owns = new
            _write_marker(self.root, self.kind, new)
            fsync_dir(self.root)
        finally:
            shutil.rmtree(trash, ignore_errors=True)

    def release(self, *, failed: bool = False) -> None:
        """Unlock. On failure, what this claim added to a folder and never used is removed."""
        if failed and self.marked and not self.owns:
            if self.created and set(os.listdir(self.root)) <= _HOUSEKEEPING:
                shutil.rmtree(self.root, ignore_errors=True)
            else:
                for name in (MARKER, LOCK):
                    with contextlib.suppress(OSError):
                        (self.root / name).unlink()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def claim_folder(
    path: str | Path, kind: str, *, inputs: Iterable[str | Path] = (), overwrite: bool = False
) -> OutputFolder:
    """Check, create and lock output folder ``path`` for ``kind``; see the module rules."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    root = Path(path)
    what = KINDS[kind]
    check_not_input(root, inputs, folder=kind in REBUILT_KINDS)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} exists and is not a folder; a {what} must be written to a folder")
    marker = _check_owner(root, kind, overwrite)
    created = not root.exists()
    try:
        make_folder(root)
    except OSError as exc:
        raise DataError(f"cannot create output folder {root}: {exc.strerror}") from exc
    fd = _lock(root)
    claim = OutputFolder(root, kind, created, _fd=fd)
    try:
        marker = _check_owner(root, kind, overwrite)  # again, now that we hold the lock
        if marker is not None:
            claim.owns = set(marker.get("owns", []))
            _remove_leftovers(root)
        else:
            _write_marker(root, kind, set())
            claim.marked = True
    except BaseException:
        claim.release(failed=True)
        raise
    return claim


@contextlib.contextmanager
def claimed_folder(
    path: str | Path, kind: str, *, inputs: Iterable[str | Path] = (), overwrite: bool = False
) -> Iterator[OutputFolder]:
    """:func:`claim_folder` for the duration of a block."""
    claim = claim_folder(path, kind, inputs=inputs, overwrite=overwrite)
    try:
        yield claim
    except BaseException:
        claim.release(failed=True)
        raise
    claim.release()


def hold_folder(path: str | Path, kind: str, *, inputs: Iterable[str | Path] = ()) -> OutputFolder:
    """Claim ``path`` for the rest of this process (a run or study folder written over time).

    Claiming a folder this process already holds is a no-op, so a study can re-run a setting.
    """
    key = Path(path).resolve()
    held = _HELD.get(key)
    if held is not None and held._fd is not None:
        if held.kind != kind:
            raise DataError(f"{path} is already used as a {KINDS[held.kind]} by this process")
        return held
    claim = claim_folder(path, kind, inputs=inputs)
    _HELD[key] = claim
    return claim


def abandon_held(path: str | Path, *, keep: Iterable[str | Path]) -> bool:
    """After a failed command: remove the folder when this process created it and it holds
    none of ``keep`` (results or records worth keeping); True when removed. Everything in a
    folder this process created was written by privseg, so nothing else is lost."""
    key = Path(path).resolve()
    held = _HELD.get(key)
    if held is None or not held.created or any(Path(k).exists() for k in keep):
        return False
    shutil.rmtree(held.root, ignore_errors=True)
    held.release()
    del _HELD[key]
    return True


OVERWRITABLE = ("task", "cache", "attack")
"""Kinds whose commands take --overwrite (data synth, data prepare, attack, audit); runs, sites
and studies need a new folder."""


def _check_owner(root: Path, kind: str, overwrite: bool) -> dict[str, Any] | None:
    """The folder's privseg marker, or None for a missing/empty folder; refuses the rest."""
    if not root.is_dir():
        return None
    marker = read_marker(root)
    what = KINDS[kind]
    if marker is not None:
        if marker["kind"] != kind:
            raise DataError(
                f"{root} holds a privseg {KINDS.get(marker['kind'], marker['kind'])} "
                f"({root / MARKER}), not a {what}; refusing to write a {what} into it. "
                "Choose another folder"
            )
        return marker
    entries = sorted(set(os.listdir(root)) - _HOUSEKEEPING)
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        hint = (
            ", or pass --overwrite to add privseg's files next to these (none of them is replaced)"
            if kind in OVERWRITABLE
            else ""
        )
        raise DataError(
            f"{root} is not empty ({shown}) and privseg did not create it (no {MARKER} marker): "
            f"refusing to write a {what} into it. Choose a new or empty folder{hint}"
        )
    return None


def read_marker(root: Path) -> dict[str, Any] | None:
    """The marker of a privseg output folder, or None when there is none (or not privseg's)."""
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if (
        not isinstance(marker, dict)
        or marker.get("signature") != SIGNATURE
        or marker.get("kind") not in KINDS
        or not isinstance(marker.get("owns", []), list)
    ):
        return None
    return marker


def _write_marker(root: Path, kind: str, owns: set[str]) -> None:
    from privseg import __version__

    write_json(
        root / MARKER,
        {
            "signature": SIGNATURE,
            "kind": kind,
            "version": MARKER_VERSION,
            "privseg": __version__,
            "owns": sorted(owns),
        },
    )


def _lock(root: Path) -> int:
    import fcntl

    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataError(
            f"another privseg process is writing to {root} (it holds {root / LOCK}); "
            "wait for it to finish or choose another folder"
        ) from None
    return fd


def _remove_leftovers(root: Path) -> None:
    """Staging and trash folders of a killed build (we hold the lock: nobody is using them)."""
    for name in os.listdir(root):
        if name.startswith((PARTIAL_PREFIX, TRASH_PREFIX)) and (root / name).is_dir():
            shutil.rmtree(root / name, ignore_errors=True)


def make_private(path: Path) -> None:
    """Patient data: folders 0700, files 0600, whatever the umask."""
    for dirpath, dirnames, filenames in os.walk(path):
        os.chmod(dirpath, 0o700)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o600)
        del dirnames  # walked by os.walk itself


def check_not_input(out: Path, inputs: Iterable[str | Path], *, folder: bool) -> None:
    """Refuse an output that is an input (or, for a rebuilt folder, contains one or lies
    inside an input folder: a cache in its own task folder would change the task)."""
    target = Path(os.path.realpath(out))
    for raw in inputs:
        inp = Path(raw)
        src = Path(os.path.realpath(inp))
        same = target == src or (out.exists() and inp.exists() and os.path.samefile(out, inp))
        if same or (folder and src.is_relative_to(target)):
            raise DataError(
                f"output {out} would replace the input {inp}: an output must never be an "
                "input or contain one; choose another output path"
            )
        if folder and inp.is_dir() and target.is_relative_to(src):
            raise DataError(
                f"output {out} lies inside the input folder {inp}: outputs are never written "
                "into their inputs; choose a folder outside it"
            )


def check_not_in_rebuilt(out: Path, *, folder: bool = False) -> None:
    """Refuse an output inside a folder privseg rebuilds (a slice cache, a phantom task): the
    next prepare would discard it, and a cache holds prepared data only. An output ``folder``
    may not be another privseg folder either (a run's files and a prediction's would mix)."""
    marker = read_marker(out) if folder and out.is_dir() else None
    if marker is not None:
        raise DataError(
            f"output {out} is a privseg {KINDS[marker['kind']]}: predictions go in a folder of "
            "their own; choose another --out"
        )
    for folder in Path(os.path.realpath(out)).parents:
        marker = read_marker(folder)
        if marker is not None and marker["kind"] in REBUILT_KINDS:
            raise DataError(
                f"output {out} lies inside {folder}, a privseg {KINDS[marker['kind']]} that "
                "privseg rebuilds as a whole; choose a path outside it"
            )


def check_output_file(
    out: Path, *, inputs: Iterable[str | Path], suffixes: tuple[str, ...], overwrite: bool
) -> None:
    """Claim output file ``out``: right suffix, existing folder, not an input, not clobbered.

    Leftover temporary files of an interrupted write of ``out`` (names only privseg uses) are
    removed.
    """
    # io.atomic_write_bytes' temporary (mkstemp: 8 random characters) and the ".partial"
    # file earlier versions of predict left behind.
    ours = re.compile(rf"\.{re.escape(out.name)}\.([a-z0-9_]{{8}}\.tmp|partial\.nii(\.gz)?)")
    for name in os.listdir(out.parent) if out.parent.is_dir() else ():
        if ours.fullmatch(name) and (out.parent / name).is_file():
            with contextlib.suppress(OSError):
                (out.parent / name).unlink()
    if not out.name.lower().endswith(suffixes):
        raise DataError(
            f"output {out}: the file name must end with {' or '.join(suffixes)} "
            "(the format written is chosen by the name)"
        )
    if not out.parent.is_dir():
        raise DataError(f"output {out}: folder {out.parent} does not exist; create it first")
    if out.is_dir():
        raise DataError(f"output {out} is a folder; expected a file name such as mask.nii.gz")
    check_not_input(out, inputs, folder=False)
    check_not_in_rebuilt(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise DataError(f"output {out} exists; pass --overwrite to replace it")


SITE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""Site names become folder and file names: no separators, no '..', nothing else."""


def check_site_name(name: object, source: str) -> str:
    """``name`` if it is a safe folder name, else a DataError naming ``source`` and the name."""
    if not isinstance(name, str) or not SITE_NAME.fullmatch(name) or name in (".", ".."):
        raise DataError(
            f"{source}: site name {name!r} is invalid: site names become folder names, so they "
            "must be 1-64 characters from [A-Za-z0-9._-] and not '.' or '..'"
        )
    return name
