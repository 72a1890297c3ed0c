"""The layout of a run folder: every file name privseg writes into a run, in one place.

A training run (any mode, simulated or deployed) and a study each own one folder. Code that
writes or reads a run goes through :class:`RunFolder` instead of joining file names itself.

A folder's results belong to its inputs: each folder records what made it (:class:`RunInputs`:
the command's mode and the content fingerprint of its data) and every reuse of it (skip,
resume, re-run) is checked against that record first (:meth:`RunFolder.admit`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from privseg.config import Config
from privseg.core.errors import DataError
from privseg.core.io import atomic_write_text, make_folder, read_json, write_json
from privseg.core.output import abandon_held, hold_folder
from privseg.core.results import RunResult

REPORT_MD, REPORT_HTML = "report.md", "report.html"
LEDGER_FILE = "ledger.sqlite"  # a privacy ledger store (privacy.stores), wherever it lies
ATTACK_JSON = "attack.json"
"""An attack's result in its folder (``RUN/attack/``, or a study's ``attack/<setting>/``)."""
ATTACK_PNG = "attack.png"
"""The attack's reconstruction grid, next to :data:`ATTACK_JSON`."""
AUDIT_JSON = "audit.json"
"""The identification audit's result, next to :data:`ATTACK_JSON`."""


@dataclass(frozen=True)
class RunInputs:
    """What a run or study folder was made by: the command's mode (``central``, ``local``,
    ``federated``, ``server``, ``study``) and its data (the slice cache's content fingerprint,
    ``SliceCache.content_fingerprint``; None for a server, whose data stays at the sites).
    ``source`` (the ``--data`` path) only names the data in messages."""

    mode: str
    data: str | None
    source: str = ""

    def matches(self, other: RunInputs) -> bool:
        """The same mode and the same data content (wherever the data lies)."""
        return (self.mode, self.data) == (other.mode, other.data)

    def describe(self) -> str:
        data = "" if self.data is None else f" of data {self.source} (content {self.data[:12]})"
        return f"a {self.mode} run{data}"


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run (or study) folder and the loading of what is in it."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ---- what every run holds ------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def checkpoint(self) -> Path:
        """The run's final (global or central) model."""
        return self.root / "checkpoint.pt"

    def site_checkpoint(self, site: str) -> Path:
        """A local-only site's own model."""
        return self.root / "checkpoints" / f"{site}.pt"

    @property
    def log(self) -> Path:
        """privseg's log messages of the run (info and up)."""
        return self.root / "run.log"

    def process_log(self, name: str) -> Path:
        """A process's output in a deployment (``superlink``, ``supernode``, ``worker``, and
        ``flwr-run``: the server's ``flwr run``); its pid file is beside it (``.pid``)."""
        return self.root / "logs" / f"{name}.log"

    def figure(self, name: str) -> Path:
        return self.root / f"{name}.png"

    @property
    def inputs(self) -> Path:
        """What made this folder (:class:`RunInputs`), checked before any reuse."""
        return self.root / "inputs.json"

    # ---- sites -----------------------------------------------------------------------------
    def site_report(self, site: str) -> Path:
        """A site's own test report (per-patient results; in deployment it stays at the site)."""
        return self.root / "sites" / f"{site}.json"

    def site_reply(self, site: str) -> Path:
        """A site's last train reply, replayed when a resumed server asks for that round again."""
        return self.root / "sites" / f"{site}.last-reply.pt"

    def site_answer(self, site: str) -> Path:
        """A site's final test answer, replayed when a resumed server asks for it again."""
        return self.root / "sites" / f"{site}.final-answer.pt"

    def site_done(self, site: str) -> Path:
        """Written when the server said it kept the final test answers: the site may leave."""
        return self.root / "sites" / f"{site}.done"

    # ---- federation --------------------------------------------------------------------------
    @property
    def federated_state(self) -> Path:
        """The server's last completed round (global model, history, optimizer state)."""
        return self.root / "federated_state.pt"

    @property
    def federation_status(self) -> Path:
        return self.root / "federation_status.json"

    @property
    def final_test(self) -> Path:
        """The sites' final test answers, kept before the sites are told they may leave."""
        return self.root / "final_test.json"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    # ---- study and attack --------------------------------------------------------------------
    @property
    def attack(self) -> Path:
        """``privseg attack`` / ``audit`` output (:data:`ATTACK_JSON`, ...); a study's attack."""
        return self.root / "attack"

    def canaries(self, site: str, *, revealed: bool) -> Path:
        """A DP site's audit canaries: the seed's hash, written before training (``revealed``
        False), then the seed and the scores after it (privseg.privacy.canaries)."""
        return self.root / "audit" / f"canaries-{site}{'' if revealed else '.commit'}.json"

    @property
    def audit_run(self) -> Path:
        """The one-run audit of this run (``privseg audit RUN --whole-run``)."""
        return self.root / "audit_run.json"

    @property
    def attack_results(self) -> Path:
        """A study's finished attacks and audits with their config (reused when unchanged)."""
        return self.attack / "attack_results.json"

    def setting(self, key: str) -> RunFolder:
        """A study's run folder for one setting of its grid."""
        return RunFolder(self.root / "runs" / key)

    def finished_settings(self) -> list[str]:
        """The keys of a study's settings that wrote their results."""
        return sorted(p.parent.name for p in self.setting("").root.glob("*/results.json"))

    @property
    def report_html(self) -> Path:
        """A study's report (``report.md`` beside it; figures/ and tables/ too)."""
        return self.root / REPORT_HTML

    @property
    def cache(self) -> Path:
        """Where a study or run prepares its slice cache from a task folder."""
        return self.root / "cache"

    # ---- reading and writing -------------------------------------------------------------------
    def claim(
        self, kind: Literal["run", "study"] = "run", *, inputs: Iterable[str | Path] = ()
    ) -> RunFolder:
        """Own this folder for the rest of the process before writing anything into it.

        Refuses a non-empty folder privseg did not create, a folder of another kind (a cache,
        a study for a run), a folder that is or contains an input, and a folder another
        process is writing to (see :mod:`privseg.core.output`). Re-entering our own run resumes it.
        """
        hold_folder(self.root, kind, inputs=inputs)
        return self

    def abandon(self) -> bool:
        """A run that failed (a full disk, an error) leaves no folder without results: removed
        when this process created it, unless it holds resumable federated state or a privacy
        ledger store (a ``privacy.ledger_dir`` inside it: what patients spent is never lost).
        True when removed."""
        stores = list(self.root.rglob(LEDGER_FILE)) if self.root.is_dir() else []
        return abandon_held(self.root, keep=(self.results, self.federated_state, *stores))

    def admit(self, inputs: RunInputs, *, resume: bool = False) -> None:
        """Refuse to reuse this folder for other inputs (:meth:`check_reuse`), then record
        ``inputs``. A re-run (no ``resume``) first removes the results it would replace."""
        self.check_reuse(inputs, resume=resume)
        if not resume:
            self.results.unlink(missing_ok=True)  # a re-run never leaves the old results
        make_folder(self.root)
        write_json(self.inputs, dataclasses.asdict(inputs))

    def check_reuse(self, inputs: RunInputs, *, resume: bool = False) -> None:
        """Refuse, changing nothing, to reuse this folder for ``inputs``.

        A folder that holds a run records its inputs; reusing it (a re-run, a resume, a
        study's skip) with another mode or other data is refused, naming both, and so is a
        folder with results but no record. A finished server run is only reused with
        ``resume``. Also called on a freshly built cache before it replaces the folder's own,
        so a refused command leaves the folder as it was.
        """
        old = self.recorded_inputs()
        if old is not None and not old.matches(inputs):
            raise DataError(
                f"{self.root} holds {old.describe()}; this is {inputs.describe()}: "
                "its results would not belong to its inputs; use a new --out"
            )
        made = (self.results, self.checkpoint, self.federated_state)
        if old is None and any(p.exists() for p in made):
            raise DataError(
                f"{self.root} holds a run without a record of its data and mode "
                f"({self.inputs.name}; an older privseg wrote it); use a new --out"
            )
        if inputs.mode == "server" and self.results.is_file() and not resume:
            raise DataError(
                f"{self.root} holds a finished federation ({self.results.name}); pass --resume "
                "to write its results again from its saved state, or use a new --out"
            )
        if self.federated_state.is_file() and not self.results.is_file() and not resume:
            raise DataError(
                f"{self.root} holds a federation that stopped before it finished "
                f"({self.federated_state.name}): pass --resume to finish it (starting over "
                "would drop its saved rounds and spend the sites' privacy again), or use a new "
                "--out"
            )

    def recorded_inputs(self) -> RunInputs | None:
        """The inputs this folder recorded (None: no record)."""
        if not self.inputs.is_file():
            return None
        try:
            return RunInputs(**read_json(self.inputs))
        except (ValueError, TypeError) as exc:
            raise DataError(f"{self.inputs} is corrupt ({exc}); use a new --out") from exc

    def write_config(self, cfg: Config) -> None:
        make_folder(self.root)
        atomic_write_text(self.config, cfg.to_toml())

    def load_config(self) -> Config:
        return Config.load(self.config)

    def load_results(self) -> RunResult:
        """results.json of a finished run (a clear error when the run did not finish)."""
        if not self.root.is_dir():
            raise DataError(f"run folder {self.root} does not exist")
        if not self.results.is_file():
            raise DataError(f"{self.results} does not exist: is {self.root} a finished run?")
        return RunResult.load(self.results)
