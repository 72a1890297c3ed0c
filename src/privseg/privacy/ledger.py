"""A durable, append-only, hash-chained record of every release made on patients' data.

One store (one SQLite file, :mod:`privseg.privacy.stores`) serves every site and data set of
a user. A release names its patients by content fingerprint
(:meth:`privseg.data.task.Volume.content`); a patient's epsilon composes every release that
included that patient, recomputed from the rows (never stored).

Every row (releases, non-private events, budgets) carries the hash of the row before it and
its own; the head and the row count live in ``meta``. A broken chain, a missing row, a
deleted budget or an edited value fails :meth:`PrivacyLedger.rows`, which every read and
every reservation goes through: an edited ledger is refused, never read as less spent.
:meth:`PrivacyLedger.reserve` checks delta, unit and budget and inserts in one
``BEGIN IMMEDIATE`` transaction, so two concurrent runs cannot both pass the check.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from privseg.core.errors import ConfigError, DataError, PrivacyBudgetExceeded, ResourceError
from privseg.core.io import make_folder
from privseg.privacy import accounting, history
from privseg.privacy.history import Budget

SCHEMA_VERSION = 2
UNITS = ("slice", "patient")
KINDS = ("dp-sgd", "gaussian", "non-private", "budget")
"""dp-sgd: training steps; gaussian: a noised metric (q = 1, one step per query); non-private:
a release without DP (epsilon infinite); budget: a lifetime (epsilon, delta) set on patients."""
_FIELDS = (
    "time",
    "site",
    "run_id",
    "kind",
    "unit",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "accountant",
    "delta",
    "budget_epsilon",
    "note",
    "patients",
)
_SCHEMA = f"""
CREATE TABLE releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL, site TEXT NOT NULL, run_id TEXT NOT NULL, kind TEXT NOT NULL,
    unit TEXT NOT NULL, noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL, accountant TEXT NOT NULL, delta REAL NOT NULL,
    budget_epsilon REAL, note TEXT NOT NULL, patients TEXT NOT NULL,
    prev TEXT NOT NULL, hash TEXT NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
PRAGMA user_version = {SCHEMA_VERSION};
"""
INSPECT = (
    "inspect it with `privseg budget --ledgers {folder}` or `sqlite3 {path} 'SELECT id, kind, "
    "site, run_id, time FROM releases'`, and restore it from a backup; privseg will not train "
    "on these patients until the store verifies"
)


class LedgerTampered(DataError):
    """The ledger failed its integrity check: training on its patients is refused."""


def _row_hash(prev: str, row: dict[str, Any]) -> str:
    body = json.dumps([prev, *(row[f] for f in _FIELDS)], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def _disk(path: Path, exc: sqlite3.Error) -> ResourceError | None:
    """A full disk or a file-size limit, told as such (never as a corrupt ledger)."""
    if "disk I/O error" in str(exc) or "disk is full" in str(exc):
        return ResourceError(
            f"privacy ledger {path} cannot be written ({exc}): the disk is full or a file-size "
            "limit was reached (ENOSPC/EFBIG); nothing was recorded and nothing trained"
        )
    return None


def _pragmas(con: sqlite3.Connection) -> None:
    # DELETE journal + synchronous=FULL: a committed release survives power loss.
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("PRAGMA synchronous=FULL")


class PrivacyLedger:
    """One ledger store file; every method opens its own short-lived connection."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.on_commit: Callable[[int], None] | None = None  # the registry's row count
        if not self.path.exists():
            self._create()
        self._check_schema()

    # ---- setup --------------------------------------------------------------------------
    def _create(self) -> None:
        """Build the empty store under a temporary name, then link: never half a ledger."""
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
                store_id = uuid.uuid4().hex
                con.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("store_id", store_id), ("count", "0"), ("head", f"genesis:{store_id}")],
                )
                con.commit()
            except sqlite3.Error as exc:
                raise _disk(self.path, exc) or DataError(f"{self.path}: {exc}") from exc
            finally:
                con.close()
            os.chmod(tmp, 0o600)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.path)  # never overwrite a store created meanwhile
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _check_schema(self) -> None:
        with self._connect() as con:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            cols = [r[1] for r in con.execute("PRAGMA table_info(releases)")]
            ok = con.execute("PRAGMA quick_check").fetchone()[0]
        if version != SCHEMA_VERSION or tuple(cols) != ("id", *_FIELDS, "prev", "hash"):
            raise DataError(
                f"privacy ledger {self.path} is not a privseg ledger store of schema version "
                f"{SCHEMA_VERSION} (version {version}, columns {cols}); refusing to start a "
                "fresh one over it"
            )
        if ok != "ok":
            raise LedgerTampered(f"privacy ledger {self.path} is corrupt: {ok}")

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
            raise _disk(self.path, exc) or LedgerTampered(
                f"privacy ledger {self.path} is corrupt or unreadable: {exc}"
            ) from exc
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

    # ---- integrity ----------------------------------------------------------------------
    def _tampered(self, what: str) -> LedgerTampered:
        how = INSPECT.format(folder=self.path.parent, path=self.path)
        return LedgerTampered(
            f"privacy ledger {self.path} failed its integrity check: {what}; {how}"
        )

    def _rows(self, con: sqlite3.Connection) -> list[dict[str, Any]]:
        """Every row, each checked against the chain and the recorded head and count."""
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        if not {"store_id", "count", "head"} <= set(meta):
            raise self._tampered("its meta table lost the chain head")
        prev = f"genesis:{meta['store_id']}"
        rows = []
        cursor = con.execute(
            f"SELECT id, {', '.join(_FIELDS)}, prev, hash FROM releases ORDER BY id"
        )
        for raw in cursor:
            row = dict(zip(("id", *_FIELDS, "prev", "hash"), raw, strict=True))
            if row["prev"] != prev or _row_hash(prev, row) != row["hash"]:
                raise self._tampered(f"row {row['id']} was edited, or a row before it deleted")
            prev = row["hash"]
            rows.append(self._valid(row))
        if str(len(rows)) != meta["count"] or prev != meta["head"]:
            raise self._tampered(
                f"it holds {len(rows)} rows but recorded {meta['count']}: rows were deleted"
            )
        return rows

    def _valid(self, row: dict[str, Any]) -> dict[str, Any]:
        """A row with its patients parsed, or the field that makes it invalid."""
        problem = history.row_problem(row, kinds=KINDS, units=UNITS)
        if problem is not None:
            field, rule = problem
            raise self._tampered(f"row {row['id']}: {field} = {row[field]!r} ({rule})")
        return {**row, "patients": frozenset(json.loads(row["patients"]))}

    @property
    def store_id(self) -> str:
        with self._connect() as con:
            return str(dict(con.execute("SELECT key, value FROM meta").fetchall())["store_id"])

    def rows(self) -> list[dict[str, Any]]:
        """Every verified row, oldest first (raises LedgerTampered when the chain breaks)."""
        with self._connect() as con:
            return self._rows(con)

    # ---- writes -------------------------------------------------------------------------
    def reserve(
        self,
        *,
        patients: Iterable[str],
        site: str,
        run_id: str,
        kind: str = "dp-sgd",
        unit: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        accountant: str,
        delta: float,
        budget: Budget | None = None,
        over_budget: bool = False,
        note: str = "",
    ) -> float:
        """Check and record one release on ``patients`` in ONE write transaction; return the
        largest composed epsilon among them (at their budget's delta, else ``delta``).

        Refused, nothing written: a delta above a patient's budget delta; a DP release of
        another unit than the patient's earlier ones (they do not compose); a composition
        above a patient's budget (``budget`` joins the one held: the stricter wins and is
        recorded). ``over_budget`` lets an explicitly allowed non-private release pass a
        budget, and records it all the same (epsilon infinite).
        """
        patients = sorted(set(patients))
        if not patients:
            raise DataError(f"site {site!r}: a release must name the patients it touches")
        if kind not in KINDS[:3]:
            raise ValueError(f"kind = {kind!r} is invalid: allowed {KINDS[:3]}")
        if steps <= 0:
            raise ValueError(f"steps = {steps} is invalid: must be > 0")
        if unit not in UNITS:
            raise ConfigError(f"privacy.unit = {unit!r} is invalid: allowed {', '.join(UNITS)}")
        release = (float(noise_multiplier), float(sample_rate), int(steps))
        with self._write() as con:
            rows = self._rows(con)
            groups = history.by_history(rows, patients)
            worst = 0.0
            for (past, held, units), members in groups.items():
                limit = budget.tighter(held) if budget is not None else held
                at = limit.delta if limit is not None else delta
                if limit is not None and delta > limit.delta and kind != "non-private":
                    raise PrivacyBudgetExceeded(
                        f"site {site!r} refuses a release at delta {delta:g}: {len(members)} of "
                        f"its patients hold a budget at delta {limit.delta:g}, and a larger "
                        "delta would weaken it; set privacy.delta <= "
                        f"{limit.delta:g}"
                    )
                if kind != "non-private" and set(units) - {unit}:
                    raise ConfigError(
                        f"site {site!r} refuses a {unit}-level release: {len(members)} of its "
                        f"patients hold {', '.join(sorted(units))}-level releases in {self.path}, "
                        "and epsilons of different privacy units do not compose; keep "
                        f"privacy.unit = {sorted(units)[0]!r} on this data"
                    )
                after = accounting.epsilon([*past, release], delta=at, accountant=accountant)
                worst = max(worst, after)
                if limit is not None and after > limit.epsilon and not over_budget:
                    spent = accounting.epsilon(list(past), delta=at, accountant=accountant)
                    what = (
                        "a release without DP (epsilon infinite)"
                        if kind == "non-private"
                        else f"the planned {steps} steps (noise {noise_multiplier:.4g}, sample "
                        f"rate {sample_rate:.4g})"
                    )
                    raise PrivacyBudgetExceeded(
                        f"site {site!r} refuses: {len(members)} of its patients have spent "
                        f"epsilon {spent:.4g} (delta={at:g}, {accountant}) and {what} would "
                        f"bring them to {after:.4g}, over their budget of {limit.epsilon:g}; "
                        f"see `privseg budget --ledgers {self.path.parent}`"
                    )
            tightened = [
                p
                for (_, held, _), members in groups.items()
                if budget is not None and budget.tighter(held) != held
                for p in members
            ]
            if budget is not None and tightened:  # the strictest budget per patient holds
                self._insert(
                    con,
                    site,
                    run_id,
                    "budget",
                    unit,
                    (0.0, 1.0, 0),
                    accountant,
                    budget.delta,
                    tightened,
                    "lifetime budget",
                    budget=budget.epsilon,
                )
            self._insert(con, site, run_id, kind, unit, release, accountant, delta, patients, note)
            count = len(rows) + 1 + (1 if budget is not None and tightened else 0)
        if self.on_commit is not None:
            self.on_commit(count)
        return worst

    def _insert(
        self,
        con: sqlite3.Connection,
        site: str,
        run_id: str,
        kind: str,
        unit: str,
        release: tuple[float, float, int],
        accountant: str,
        delta: float,
        patients: list[str],
        note: str,
        budget: float | None = None,
    ) -> None:
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        row = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
            "site": str(site),
            "run_id": str(run_id),
            "kind": kind,
            "unit": str(unit),
            "noise_multiplier": float(release[0]),
            "sample_rate": float(release[1]),
            "steps": int(release[2]),
            "accountant": str(accountant),
            "delta": float(delta),
            "budget_epsilon": None if budget is None else float(budget),
            "note": str(note),
            "patients": json.dumps(sorted(patients)),
        }
        digest = _row_hash(meta["head"], row)
        con.execute(
            f"INSERT INTO releases ({', '.join(_FIELDS)}, prev, hash) "
            f"VALUES ({', '.join('?' * (len(_FIELDS) + 2))})",
            (*row.values(), meta["head"], digest),
        )
        con.execute("UPDATE meta SET value = ? WHERE key = 'head'", (digest,))
        con.execute("UPDATE meta SET value = ? WHERE key = 'count'", (str(int(meta["count"]) + 1),))

    # ---- reads --------------------------------------------------------------------------
    def touches(self, patients: Iterable[str]) -> bool:
        """Whether any row names one of ``patients``."""
        wanted = set(patients)
        return any(row["patients"] & wanted for row in self.rows())

    def budget(self, patients: Iterable[str]) -> Budget | None:
        """The strictest budget held by any of ``patients`` (None: none set)."""
        return history.budget_of(self.rows(), patients)

    def worst(
        self,
        patients: Iterable[str],
        *,
        delta: float | None,
        accountant: str,
        run_id: str | None = None,
    ) -> tuple[float, list[dict[str, Any]]]:
        """(epsilon, releases) of the patient of ``patients`` who has spent most: see
        :func:`privseg.privacy.history.worst`."""
        return history.worst(
            self.rows(), patients, delta=delta, accountant=accountant, run_id=run_id
        )
