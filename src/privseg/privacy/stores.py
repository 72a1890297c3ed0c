"""Where the ledger store lives, and the guard that no store starts patients from zero.

One store per user by default: ``$PRIVSEG_LEDGER_DIR``, else ``$XDG_DATA_HOME/privseg/ledger``,
else ``~/.local/share/privseg/ledger``; ``privacy.ledger_dir`` moves it for a run. Every store
privseg opens is listed in a registry beside the default location
(``<data home>/privseg/stores.json``); opening a store for patients that another listed store
has releases on is refused, so pointing ``privacy.ledger_dir`` (or the variable) at an empty
folder cannot reset anyone's budget. Out of reach, and said so in the README: an administrator
who deletes the stores and the registry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable
from pathlib import Path

from privseg.errors import DataError
from privseg.io import write_json
from privseg.privacy.ledger import PrivacyLedger

ENV = "PRIVSEG_LEDGER_DIR"
LEDGER_FILE = "ledger.sqlite"
REGISTRY_FILE = "stores.json"


def data_home() -> Path:
    """privseg's per-user data folder (XDG): ``$XDG_DATA_HOME/privseg`` or
    ``~/.local/share/privseg``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "privseg"


def store_dir(ledger_dir: str | Path | None = None) -> Path:
    """The store folder: ``ledger_dir`` (``privacy.ledger_dir``), ``$PRIVSEG_LEDGER_DIR``, or
    the per-user default."""
    chosen = ledger_dir or os.environ.get(ENV)
    return Path(chosen).expanduser().resolve() if chosen else data_home() / "ledger"


def open_store(ledger_dir: str | Path | None, patients: Iterable[str] = ()) -> PrivacyLedger:
    """The ledger store for a release on ``patients``, registered and checked: refused when
    another registered store already holds releases on any of them."""
    folder = store_dir(ledger_dir)
    _check_folder(folder)
    ledger = PrivacyLedger(folder / LEDGER_FILE)
    wanted = set(patients)
    with _registry() as stores:
        here = str(ledger.path)
        if here not in stores:
            stores[here] = ledger.store_id
        for path in sorted(set(stores) - {here}):
            if not wanted or not Path(path).is_file():
                continue
            other = PrivacyLedger(path)
            if other.touches(wanted):
                raise DataError(
                    f"privacy ledger store {ledger.path} is not where these patients are "
                    f"accounted: the store {path} (id {other.store_id[:12]}) already holds "
                    "releases on them, and a second store would start their budget from zero; "
                    f"use privacy.ledger_dir = {Path(path).parent} (or ${ENV})"
                )
    return ledger


def known_stores() -> list[Path]:
    """Every registered store file that still exists (``privseg budget`` lists them)."""
    with _registry() as stores:
        return [Path(p) for p in sorted(stores) if Path(p).is_file()]


def _check_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise DataError(f"privacy.ledger_dir = {folder} is not a folder")
    strangers = folder.is_dir() and any(
        not p.name.lstrip(".").startswith(LEDGER_FILE) for p in folder.iterdir()
    )
    if strangers and not (folder / LEDGER_FILE).is_file():
        raise DataError(
            f"privacy.ledger_dir = {folder} holds other files and no {LEDGER_FILE}: give an "
            "empty folder or an existing ledger store"
        )


@contextlib.contextmanager
def _registry():  # type: ignore[no-untyped-def]
    """The registry (path -> store id) under an exclusive lock, written back when changed."""
    home = data_home()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home / REGISTRY_FILE
    fd = os.open(home / f".{REGISTRY_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            stores = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"the ledger store registry {path} is unreadable: {exc}") from exc
        if not isinstance(stores, dict):
            raise DataError(f"the ledger store registry {path} is not a JSON object")
        before = dict(stores)
        yield stores
        if stores != before:
            write_json(path, stores)
    finally:
        os.close(fd)
