"""A durable, append-only record of every DP release a site made (SQLite, fsync on commit).

Epsilon is never stored: it is recomputed from all rows, so it is cumulative across rounds,
runs and restarts, and a lost counter cannot under-report the spend.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from privseg.errors import DataError
from privseg.privacy import accounting

SCHEMA_VERSION = 1
_COLUMNS = (
    "id",
    "time",
    "site",
    "run_id",
    "unit",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "accountant",
    "delta",
    "note",
)
_SCHEMA = """
CREATE TABLE releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    site TEXT NOT NULL,
    run_id TEXT NOT NULL,
    unit TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    accountant TEXT NOT NULL,
    delta REAL NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
"""


def _pragmas(con: sqlite3.Connection) -> None:
    # DELETE journal + synchronous=FULL: a committed release survives power loss.
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("PRAGMA synchronous=FULL")


class PrivacyLedger:
    """One SQLite file of releases; every method opens its own short-lived connection."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            self._create()
        self._check()

    # ---- setup --------------------------------------------------------------------------
    def _create(self) -> None:
        """Build the empty ledger under a temporary name, then rename: never half a ledger."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        os.close(fd)
        try:
            con = sqlite3.connect(tmp)
            try:
                _pragmas(con)
                con.executescript(_SCHEMA)
                con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                con.commit()
            finally:
                con.close()
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.path)  # never overwrite a ledger created meanwhile
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _check(self) -> None:
        try:
            with self._connect() as con:
                version = con.execute("PRAGMA user_version").fetchone()[0]
                cols = [r[1] for r in con.execute("PRAGMA table_info(releases)")]
                ok = con.execute("PRAGMA quick_check").fetchone()[0]
        except DataError:
            raise
        except sqlite3.Error as exc:  # pragma: no cover - _connect converts these
            raise DataError(f"privacy ledger {self.path} is unreadable: {exc}") from exc
        if tuple(cols) != _COLUMNS or version != SCHEMA_VERSION:
            raise DataError(
                f"privacy ledger {self.path} is not a privseg ledger (schema version {version}, "
                f"columns {cols}); refusing to start a fresh one over it"
            )
        if ok != "ok":
            raise DataError(f"privacy ledger {self.path} is corrupt: {ok}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if not self.path.is_file():
            raise DataError(f"privacy ledger {self.path} has disappeared")
        try:
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise DataError(f"privacy ledger {self.path} cannot be opened: {exc}") from exc
        try:
            _pragmas(con)
            yield con
        except sqlite3.DatabaseError as exc:
            raise DataError(f"privacy ledger {self.path} is corrupt or unreadable: {exc}") from exc
        finally:
            con.close()

    # ---- writes -------------------------------------------------------------------------
    def record(
        self,
        *,
        site: str,
        run_id: str,
        unit: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        accountant: str,
        delta: float,
        note: str = "",
    ) -> int:
        """Append one release and return its id; durable (fsynced) when this returns."""
        if steps < 0:
            raise ValueError(f"steps = {steps} is invalid: must be >= 0")
        row = (
            dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
            str(site),
            str(run_id),
            str(unit),
            float(noise_multiplier),
            float(sample_rate),
            int(steps),
            str(accountant),
            float(delta),
            str(note),
        )
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                cur = con.execute(
                    f"INSERT INTO releases ({', '.join(_COLUMNS[1:])}) "
                    f"VALUES ({', '.join('?' * len(row))})",
                    row,
                )
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            return int(cur.lastrowid)

    # ---- reads --------------------------------------------------------------------------
    def entries(self, site: str | None = None) -> list[dict[str, Any]]:
        """All releases (of one site, if given), oldest first."""
        query = f"SELECT {', '.join(_COLUMNS)} FROM releases"
        args: tuple[Any, ...] = ()
        if site is not None:
            query += " WHERE site = ?"
            args = (site,)
        with self._connect() as con:
            rows = con.execute(query + " ORDER BY id", args).fetchall()
        return [dict(zip(_COLUMNS, r, strict=True)) for r in rows]

    def sites(self) -> list[str]:
        return sorted({e["site"] for e in self.entries()})

    def history(self, site: str | None = None) -> list[tuple[float, float, int]]:
        """[(noise_multiplier, sample_rate, steps), ...] as the accountants take it."""
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.entries(site)]

    def steps(self, site: str | None = None) -> int:
        return sum(e["steps"] for e in self.entries(site))

    def epsilon(self, *, delta: float, accountant: str, site: str | None = None) -> float:
        """Cumulative epsilon of every recorded release (of ``site``), recomputed from the rows."""
        return accounting.epsilon(self.history(site), delta=delta, accountant=accountant)
