"""A durable, append-only record of every DP release made on one site's data (SQLite, fsync).

Epsilon is never stored: it is recomputed from all rows, so it is cumulative across rounds,
runs, studies and restarts, and a lost counter cannot under-report the spend. A ledger belongs
to one site's data (its ``data_key``: the task, the site and its patients), not to a run
folder; :meth:`PrivacyLedger.reserve` checks the unit and the budget and inserts the release in
one ``BEGIN IMMEDIATE`` transaction, so two concurrent runs cannot both pass the check.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from privseg.errors import ConfigError, DataError, PrivacyBudgetExceeded
from privseg.io import make_folder
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


_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
UNITS = ("slice", "patient")
RELEASE_KEYS = (
    "noise_multiplier",
    "sample_rate",
    "steps",
    "unit",
    "accountant",
    "delta",
    "time",
    "run_id",
)
"""One release as ``privseg budget --format json`` and every results.json site entry show it."""


def data_key(task: str, site: str, patients: list[str]) -> str:
    """What a ledger belongs to: one site's patients of one task (not how they were prepared:
    a cache rebuilt at another resolution holds the same patients, hence the same key)."""
    body = json.dumps({"task": task, "site": site, "patients": sorted(patients)})
    return hashlib.sha256(body.encode()).hexdigest()


def ledger_folder(cache_root: str | Path) -> Path:
    """The default home of a prepared cache's ledgers: the folder ``<cache>.ledgers`` beside
    it, so rebuilding or deleting the cache never resets what its patients have spent."""
    root = Path(cache_root).resolve()
    return root.parent / f"{root.name}.ledgers"


def ledger_file(folder: Path, site: str, key: str) -> Path:
    """The ledger of ``site``'s data with ``key`` in ``folder`` (one file per site and data)."""
    return Path(folder) / f"{site}-{key[:16]}.sqlite"


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
        make_folder(self.path.parent)
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

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's write lock from its first statement."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    # ---- writes -------------------------------------------------------------------------
    def record(self, **release: Any) -> int:
        """Append one release with no budget and return its row id (unit checked, durable when
        this returns): the same path as :meth:`reserve`, which training uses."""
        return self._reserve(budget_epsilon=None, **release)[0]

    def reserve(self, *, budget_epsilon: float | None, **release: Any) -> float:
        """Check and record one release in ONE write transaction; return the composed epsilon.

        Refuses (nothing written) a release whose unit differs from the site's earlier ones
        (epsilons of different units do not compose) and one whose composition with every
        earlier release would pass ``budget_epsilon`` (or the smaller budget the ledger holds).
        Concurrent reservations serialise on the SQLite write lock (``BEGIN IMMEDIATE``), so
        they cannot both pass the check.
        """
        return self._reserve(budget_epsilon=budget_epsilon, **release)[1]

    def _reserve(
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
        budget_epsilon: float | None,
        note: str = "",
    ) -> tuple[int, float]:
        """(row id, composed epsilon) of one checked release: see :meth:`reserve`."""
        if steps <= 0:
            raise ValueError(f"steps = {steps} is invalid: must be > 0")
        if unit not in UNITS:
            raise ConfigError(f"privacy.unit = {unit!r} is invalid: allowed {', '.join(UNITS)}")
        release = (float(noise_multiplier), float(sample_rate), int(steps))
        with self._write() as con:
            rows = [
                self._valid(dict(zip(_COLUMNS, r, strict=True)))
                for r in con.execute(
                    f"SELECT {', '.join(_COLUMNS)} FROM releases WHERE site = ? ORDER BY id",
                    (site,),
                )
            ]
            units = {r["unit"] for r in rows}
            if units - {unit}:
                raise ConfigError(
                    f"site {site!r} refuses a {unit}-level release: its ledger {self.path} "
                    f"holds {', '.join(sorted(units))}-level releases, and epsilons of "
                    "different privacy units do not compose; keep privacy.unit = "
                    f"{sorted(units)[0]!r} on this data"
                )
            history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in rows]
            after = accounting.epsilon([*history, release], delta=delta, accountant=accountant)
            con.execute(_META)
            held = con.execute("SELECT value FROM meta WHERE key = 'budget_epsilon'").fetchone()
            budgets = [float(b) for b in (budget_epsilon, held and held[0]) if b is not None]
            budget_epsilon = min(budgets) if budgets else None
            if budget_epsilon is not None and after > budget_epsilon:
                spent = accounting.epsilon(history, delta=delta, accountant=accountant)
                raise PrivacyBudgetExceeded(
                    f"site {site!r} refuses to train: it has spent epsilon {spent:.4g} "
                    f"(delta={delta:g}, {accountant}) and the planned {steps} steps (noise "
                    f"{noise_multiplier:.4g}, sample rate {sample_rate:.4g}) would bring it "
                    f"to {after:.4g}, over its budget of {budget_epsilon:g}; see `privseg "
                    f"budget {self.path}`"
                )
            rowid = self._insert(con, site, run_id, unit, release, accountant, delta, note)
            if budget_epsilon is not None:  # the ledger keeps the smallest budget ever set
                con.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('budget_epsilon', ?)",
                    (repr(budget_epsilon),),
                )
        return rowid, after

    @staticmethod
    def _insert(
        con: sqlite3.Connection,
        site: str,
        run_id: str,
        unit: str,
        release: tuple[float, float, int],
        accountant: str,
        delta: float,
        note: str,
    ) -> int:
        row = (
            dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
            str(site),
            str(run_id),
            str(unit),
            float(release[0]),
            float(release[1]),
            int(release[2]),
            str(accountant),
            float(delta),
            str(note),
        )
        cur = con.execute(
            f"INSERT INTO releases ({', '.join(_COLUMNS[1:])}) "
            f"VALUES ({', '.join('?' * len(row))})",
            row,
        )
        return int(cur.lastrowid or 0)

    def bind(self, key: str, site: str) -> None:
        """Tie this ledger to one site's data; a ledger of other data is refused."""
        with self._write() as con:
            con.execute(_META)
            known = dict(con.execute("SELECT key, value FROM meta").fetchall())
            if known.get("data_key", key) != key or known.get("site", site) != site:
                raise DataError(
                    f"privacy ledger {self.path} belongs to site {known.get('site')!r} of "
                    f"other data (key {known.get('data_key', '')[:16]}), not to site "
                    f"{site!r} of this data (key {key[:16]}); refusing to mix them"
                )
            con.execute("INSERT OR IGNORE INTO meta VALUES ('data_key', ?)", (key,))
            con.execute("INSERT OR IGNORE INTO meta VALUES ('site', ?)", (site,))

    def meta(self) -> dict[str, str]:
        """What the ledger is tied to (``data_key``, ``site``) and holds (``budget_epsilon``)."""
        with self._connect() as con:
            exists = con.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            return dict(con.execute("SELECT key, value FROM meta").fetchall()) if exists else {}

    def budget(self) -> float | None:
        """The smallest lifetime budget any run on this data set (a config cannot raise it)."""
        value = self.meta().get("budget_epsilon")
        return None if value is None else float(value)

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
        return [self._valid(dict(zip(_COLUMNS, r, strict=True))) for r in rows]

    def _valid(self, row: dict[str, Any]) -> dict[str, Any]:
        """A row as recorded, or a DataError naming the ledger, the row and the field: an edited
        or damaged ledger must never be read as less privacy spent."""

        def bad(field: str, rule: str) -> DataError:
            return DataError(
                f"privacy ledger {self.path} row {row['id']}: {field} = {row[field]!r} is invalid "
                f"({rule}); the ledger was edited or damaged, refusing to read it"
            )

        def number(field: str) -> float:
            value = row[field]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad(field, "must be a number")
            if not math.isfinite(value):
                raise bad(field, "must be finite")
            return float(value)

        if not isinstance(row["steps"], int) or isinstance(row["steps"], bool) or row["steps"] < 0:
            raise bad("steps", "must be a whole number >= 0")
        if number("noise_multiplier") < 0:
            raise bad("noise_multiplier", "must be >= 0")
        if not 0 < number("sample_rate") <= 1:
            raise bad("sample_rate", "must be in (0, 1]")
        if not 0 < number("delta") < 1:
            raise bad("delta", "must be in (0, 1)")
        if row["unit"] not in UNITS:
            raise bad("unit", f"must be one of {', '.join(UNITS)}")
        if row["accountant"] not in accounting.ACCOUNTANTS:
            raise bad("accountant", f"must be one of {', '.join(accounting.ACCOUNTANTS)}")
        return row

    def sites(self) -> list[str]:
        return sorted({e["site"] for e in self.entries()})

    def history(
        self, site: str | None = None, *, run_id: str | None = None
    ) -> list[tuple[float, float, int]]:
        """[(noise_multiplier, sample_rate, steps), ...] as the accountants take it (of one
        run only, with ``run_id``)."""
        return [
            (e["noise_multiplier"], e["sample_rate"], e["steps"])
            for e in self.entries(site)
            if run_id is None or e["run_id"] == run_id
        ]

    def steps(self, site: str | None = None) -> int:
        return sum(e["steps"] for e in self.entries(site))

    def epsilon(self, *, delta: float, accountant: str, site: str | None = None) -> float:
        """Cumulative epsilon of every recorded release (of ``site``), recomputed from the rows."""
        return accounting.epsilon(self.history(site), delta=delta, accountant=accountant)

    def releases(self, site: str | None = None) -> list[dict[str, Any]]:
        """Every release (of ``site``) in the documented shape (:data:`RELEASE_KEYS`)."""
        return [{k: e[k] for k in RELEASE_KEYS} for e in self.entries(site)]
