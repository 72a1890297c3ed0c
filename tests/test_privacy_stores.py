"""The store registry and the patient fingerprint, as a hostile review of issue 22 tried them:
a second store, a replaced, moved or cut-short store, a symlinked path, trivial voxel changes."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from privseg.core.errors import DataError
from privseg.data.task import Volume
from privseg.privacy.stores import LEDGER_FILE, open_store, store_dir

P = [f"{i:064x}" for i in range(3)]
KW = {"site": "a", "unit": "slice", "accountant": "rdp", "delta": 1e-5, "sample_rate": 0.05}


def spend(ledger, run: str = "r", steps: int = 10) -> None:
    ledger.reserve(patients=P, run_id=run, noise_multiplier=1.0, steps=steps, **KW)


def test_a_second_store_is_refused_even_before_the_first_recorded_anything(
    tmp_path: Path,
) -> None:
    """Review finding 4: two runs opening two stores for the same patients both passed while
    neither had written a row yet; the claim is now made under the registry's lock."""
    open_store(tmp_path / "A", P)  # opened, nothing recorded yet
    with pytest.raises(DataError, match="not where these patients are accounted"):
        open_store(tmp_path / "B", P[1:])
    open_store(tmp_path / "B", [f"{9:064x}"])  # other patients: fine


def test_a_store_deleted_and_made_again_is_refused(tmp_path: Path) -> None:
    """Review finding 3: deleting (or moving away) the store made the next run start an empty
    one at the same path, at epsilon 0."""
    spend(open_store(None, P))
    default = store_dir()
    gone = tmp_path / "moved-away"
    shutil.move(str(default), gone)
    with pytest.raises(DataError, match="is gone"):
        open_store(None, P)
    assert not (default / LEDGER_FILE).exists()  # nothing made in its place
    moved = open_store(gone, P)  # the same store at its new place: its patients follow it
    spend(moved, "r2")
    assert len(moved.rows()) == 2
    os.remove(moved.path)
    with pytest.raises(DataError, match="is gone"):
        open_store(gone, P)


def test_a_store_cut_short_or_restored_from_an_older_copy_is_refused(tmp_path: Path) -> None:
    """Review finding 7: dropping the last rows and setting meta's head and count to an earlier
    row's verified, without recomputing any hash; the registry remembers the row count."""
    ledger = open_store(None, P)
    spend(ledger)
    older = tmp_path / "older.sqlite"
    shutil.copy(ledger.path, older)
    spend(ledger, "r2")
    shutil.copy(older, ledger.path)  # an older copy, internally consistent
    with pytest.raises(DataError, match="holds 1 rows but the registry saw 2"):
        open_store(None, P)
    con = sqlite3.connect(ledger.path)
    assert con.execute("SELECT COUNT(*) FROM releases").fetchone()[0] == 1
    con.close()


def test_the_same_store_through_a_symlink_is_the_same_store(tmp_path: Path, monkeypatch) -> None:
    """Review finding 9: a data home reached through a symlink refused its own store."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    monkeypatch.setenv("XDG_DATA_HOME", str(link))
    spend(open_store(None, P))
    spend(open_store(real / "privseg" / "ledger", P), "r2")


def _volume(image: np.ndarray, label: np.ndarray) -> Volume:
    return Volume("x", image, label, np.eye(4), (1.0, 1.0, 1.0))


def test_the_fingerprint_ignores_labels_and_float_noise_but_not_the_image() -> None:
    """Review finding 2: re-annotating a scan, -0.0 against 0.0 or two NaN bit patterns made a
    new patient; a changed image voxel (a crop, another reconstruction) still does."""
    rng = np.random.default_rng(0)
    image = rng.normal(0, 200, (8, 8, 4)).astype(np.float32).round()
    image[0, 0, 0] = 0.0
    image[1, 1, 1] = np.nan
    label = (image > 0).astype(np.uint8)
    base = _volume(image, label).content()
    relabelled = label.copy()
    relabelled[2, 2, 2] ^= 1
    assert _volume(image, relabelled).content() == base
    other = image.copy()
    other[0, 0, 0] = -0.0
    other[1, 1, 1] = np.float32(np.frombuffer(np.uint32(0x7FC00001).tobytes(), np.float32)[0])
    assert _volume(other, label).content() == base
    noisy = image + np.float32(1e-4)  # below the 0.01 HU grid
    assert _volume(noisy, label).content() == base
    changed = image.copy()
    changed[3, 3, 3] += 1.0
    assert _volume(changed, label).content() != base
    assert _volume(image[:, :, :3], label[:, :, :3]).content() != base


def test_an_older_copy_at_a_new_path_is_refused(tmp_path: Path) -> None:
    """Second review: an older backup put at a new path passed as the 'moved' store (same id),
    rolling the budget back; the registry's count is per store id, whatever its path."""
    ledger = open_store(None, P)
    spend(ledger)
    shutil.copytree(store_dir(), tmp_path / "old-copy")  # 1 row
    spend(ledger, "r2")
    shutil.rmtree(store_dir())
    with pytest.raises(DataError, match="holds 1 rows but the registry saw 2"):
        open_store(tmp_path / "old-copy", P)
    newest = tmp_path / "newest"
    spend(open_store(tmp_path / "new-home", [f"{7:064x}"]))  # unrelated; the registry lives on
    shutil.copytree(tmp_path / "old-copy", newest)
    with pytest.raises(DataError, match="registry saw 2"):
        open_store(newest, P)


def test_a_store_the_registry_never_saw_is_refused_until_adopted(tmp_path: Path) -> None:
    """Second review: deleting stores.json alone let a new ledger_dir start the patients from
    zero; a store holding rows the registry never saw is refused, and --adopt registers it
    (with every patient it holds)."""
    from typer.testing import CliRunner

    from privseg.cli.app import app
    from privseg.privacy.stores import REGISTRY_FILE, data_home

    spend(open_store(tmp_path / "A", P))
    (data_home() / REGISTRY_FILE).unlink()
    with pytest.raises(DataError, match="has never seen it"):
        open_store(tmp_path / "A", P)
    res = CliRunner().invoke(app, ["budget", "--ledgers", str(tmp_path / "A"), "--adopt"])
    assert res.exit_code == 0, res.output
    spend(open_store(tmp_path / "A", P), "r2")
    with pytest.raises(DataError, match="not where these patients are accounted"):
        open_store(tmp_path / "B", P[:1])  # adopted: its patients are claimed again
