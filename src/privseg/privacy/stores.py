"""Where the ledger store lives, and the registry that keeps every patient in one store.

One store per user by default: ``$PRIVSEG_LEDGER_DIR``, else ``$XDG_DATA_HOME/privseg/ledger``,
else ``~/.local/share/privseg/ledger``; ``privacy.ledger_dir`` moves it for a run. A registry
beside the default location (``<data home>/privseg/stores.json``, under a file lock) records,
for every store privseg opened, its id and the most rows it was ever seen with, and for every
patient the one store that accounts it. Opening a store is refused when

- one of the patients is claimed by another store that still exists (two stores would each
  start them from zero; the claim is made under the lock, so two runs cannot race past it);
- the store that claimed them is gone and this is not the same store (same id) moved here;
- the store at a registered path has another id (it was deleted and made again), or fewer rows
  than the registry saw for its id under any path (rows cut off the end, an older copy
  restored, here or elsewhere);
- a store holds rows the registry has never seen (the registry was deleted, or the store
  comes from another machine: ``privseg budget --ledgers DIR --adopt`` registers it).

Out of reach, and said so in docs/PRIVACY.md: the account that runs privseg can start over by
pointing ``$XDG_DATA_HOME`` at another folder (another registry and default store), and an
administrator can delete or edit the stores and the registry together.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path

from privseg.core.errors import DataError
from privseg.core.io import write_json
from privseg.core.run_folder import LEDGER_FILE  # the store's file name, with the others
from privseg.privacy.ledger import PrivacyLedger

ENV = "PRIVSEG_LEDGER_DIR"

REGISTRY_FILE = "stores.json"


def data_home() -> Path:
    """privseg's per-user data folder (XDG): ``$XDG_DATA_HOME/privseg`` or
    ``~/.local/share/privseg``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser().resolve() / "privseg"


def store_dir(ledger_dir: str | Path | None = None) -> Path:
    """The store folder: ``ledger_dir`` (``privacy.ledger_dir``), ``$PRIVSEG_LEDGER_DIR``, or
    the per-user default."""
    chosen = ledger_dir or os.environ.get(ENV)
    return Path(chosen).expanduser().resolve() if chosen else data_home() / "ledger"


def open_store(
    ledger_dir: str | Path | None,
    patients: Iterable[str] = (),
    *,
    adopt: bool = False,
    reading: bool = False,
) -> PrivacyLedger:
    """The ledger store for releases on ``patients``: checked against the registry and
    claiming them there (see the module docstring for what is refused). ``adopt`` registers a
    store this registry has never seen although it holds rows (a store brought from another
    machine; ``privseg budget --adopt``), claiming every patient it holds. ``reading``
    (``privseg budget``) shows a store the registry has not seen, and registers nothing."""
    folder = store_dir(ledger_dir)
    _check_folder(folder)
    path = folder / LEDGER_FILE
    with _registry() as registry:
        stores, owners = registry["stores"], registry["patients"]
        here = str(path)
        known = stores.get(here)
        if known is not None and not path.exists():
            raise DataError(
                f"privacy ledger store {path} is gone: the registry "
                f"{data_home() / REGISTRY_FILE} knows it (id {known['id'][:12]}, "
                f"{known['rows']} rows); restore it from a backup, or point privacy.ledger_dir "
                "(or $PRIVSEG_LEDGER_DIR) at where it was moved. A new empty store would start "
                "its patients from zero"
            )
        ledger = PrivacyLedger(path)
        rows = ledger.rows()
        same = [e for e in stores.values() if e.get("id") == ledger.store_id]
        if known is not None and known.get("id") != ledger.store_id:
            raise DataError(
                f"privacy ledger store {path} is not the store registered there (id "
                f"{known['id'][:12]}, now {ledger.store_id[:12]}): it was deleted and made "
                "again, which would start its patients from zero; restore the old store"
            )
        if reading and not adopt:
            if len(rows) < max((e.get("rows", 0) for e in same), default=0):
                raise DataError(
                    f"privacy ledger store {path} holds {len(rows)} rows but the registry saw "
                    "more: rows were cut off its end, or an older copy was restored"
                )
            return ledger
        if rows and not same and not adopt:
            raise DataError(
                f"privacy ledger store {path} holds {len(rows)} rows but the registry "
                f"{data_home() / REGISTRY_FILE} has never seen it: the registry was deleted, or "
                "the store comes from another machine. Restore the registry, or adopt the "
                f"store here with `privseg budget --ledgers {folder} --adopt`"
            )
        seen = max((e.get("rows", 0) for e in same), default=0)  # under any path it had
        if len(rows) < seen:
            raise DataError(
                f"privacy ledger store {path} holds {len(rows)} rows but the registry saw "
                f"{seen}: rows were cut off its end, or an older copy was restored; that "
                "would read as less privacy spent. Restore the newest copy"
            )
        claim = set(patients) | ({p for r in rows for p in r["patients"]} if adopt else set())
        for pid in sorted(claim):
            owner = owners.get(pid)
            if owner is None or owner == here:
                continue
            if Path(owner).exists() or stores.get(owner, {}).get("id") != ledger.store_id:
                raise DataError(
                    f"privacy ledger store {path} is not where these patients are accounted: "
                    f"the store {owner} (id {stores.get(owner, {}).get('id', '?')[:12]}) "
                    "holds them, and a second store would start their budget from zero; use "
                    f"privacy.ledger_dir = {Path(owner).parent} (or ${ENV}), or restore it"
                )
        for pid in claim:  # claimed now, under the lock: a concurrent run sees it
            owners[pid] = here
        for entry in same:  # a moved store: its old paths keep its count, never lower
            entry["rows"] = max(entry.get("rows", 0), len(rows))
        stores[here] = {"id": ledger.store_id, "rows": max(len(rows), seen)}
    ledger.on_commit = functools.partial(_seen, here, ledger.store_id)
    return ledger


def store_of(patients: Iterable[str]) -> Path | None:
    """The store that accounts any of ``patients`` (``privseg budget --data``), if registered."""
    with _registry() as registry:
        owners = {registry["patients"].get(p) for p in patients} - {None}
    return Path(sorted(owners)[0]).parent if owners else None


def _seen(path: str, store_id: str, rows: int) -> None:
    """After a commit: the registry remembers the most rows this store ever held."""
    with _registry() as registry:
        entry = registry["stores"].setdefault(path, {"id": store_id, "rows": 0})
        entry["rows"] = max(entry["rows"], rows)


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
    """The registry (``stores``: path -> id and rows; ``patients``: fingerprint -> store path)
    under an exclusive lock, written back when changed."""
    home = data_home()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home / REGISTRY_FILE
    fd = os.open(home / f".{REGISTRY_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            registry = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"the ledger store registry {path} is unreadable: {exc}") from exc
        registry = registry if isinstance(registry, dict) else None
        if registry is None or not all(
            isinstance(registry.setdefault(k, {}), dict) for k in ("stores", "patients")
        ):
            raise DataError(
                f"the ledger store registry {path} is not privseg's (a JSON object with "
                "'stores' and 'patients'); restore it from a backup"
            )
        before = json.dumps(registry, sort_keys=True)
        yield registry
        if json.dumps(registry, sort_keys=True) != before:
            write_json(path, registry)
    finally:
        os.close(fd)
