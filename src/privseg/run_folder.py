"""The layout of a run folder: every file name privseg writes into a run, in one place.

A training run (any mode, simulated or deployed) and a study each own one folder. Code that
writes or reads a run goes through :class:`RunFolder` instead of joining file names itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from privseg.config import Config
from privseg.errors import DataError
from privseg.io import atomic_write_text, make_folder, read_json
from privseg.models.checkpoint import load_checkpoint
from privseg.output import abandon_held, hold_folder


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

    def figure(self, name: str) -> Path:
        return self.root / f"{name}.png"

    # ---- sites -----------------------------------------------------------------------------
    def site_report(self, site: str) -> Path:
        """A site's own test report (per-patient results; in deployment it stays at the site)."""
        return self.root / "sites" / f"{site}.json"

    # ---- federation --------------------------------------------------------------------------
    @property
    def federated_state(self) -> Path:
        """The server's last completed round (global model, history, optimizer state)."""
        return self.root / "federated_state.pt"

    @property
    def federation_status(self) -> Path:
        return self.root / "federation_status.json"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    # ---- study and attack --------------------------------------------------------------------
    @property
    def attack(self) -> Path:
        return self.root / "attack"

    def setting(self, key: str) -> RunFolder:
        """A study's run folder for one setting of its grid."""
        return RunFolder(self.root / "runs" / key)

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
        process is writing to (see :mod:`privseg.output`). Re-entering our own run resumes it.
        """
        hold_folder(self.root, kind, inputs=inputs)
        return self

    def abandon(self) -> bool:
        """A run that failed (a full disk, an error) leaves no folder without results: removed
        when this process created it, unless it holds resumable federated state or a privacy
        ledger store (a ``privacy.ledger_dir`` inside it: what patients spent is never lost).
        True when removed."""
        from privseg.privacy.stores import LEDGER_FILE

        stores = list(self.root.rglob(LEDGER_FILE)) if self.root.is_dir() else []
        return abandon_held(self.root, keep=(self.results, self.federated_state, *stores))

    def write_config(self, cfg: Config) -> None:
        make_folder(self.root)
        atomic_write_text(self.config, cfg.to_toml())

    def load_config(self) -> Config:
        return Config.load(self.config)

    def load_results(self) -> dict[str, Any]:
        """results.json of a finished run (a clear error when the run did not finish)."""
        if not self.root.is_dir():
            raise DataError(f"run folder {self.root} does not exist")
        if not self.results.is_file():
            raise DataError(f"{self.results} does not exist: is {self.root} a finished run?")
        return read_json(self.results)

    def load_model(self) -> nn.Module:
        """The run's final model (eval mode)."""
        return load_checkpoint(self.checkpoint)[0]
