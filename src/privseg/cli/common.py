"""Shared CLI plumbing: user-error handling, config loading, rich progress."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import signal
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from privseg.config import Config
from privseg.core.errors import ConfigError, PrivsegError, resource_error
from privseg.core.logs import OursOrAtLeast, route_warnings
from privseg.core.progress import PROGRESS_LOGGER

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Print PrivsegError messages (and a full disk or exhausted memory) in red and exit 2,
    without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (PrivsegError, OSError, MemoryError) as exc:
            error = exc if isinstance(exc, PrivsegError) else resource_error(exc)
            if error is None:
                raise
            say(str(error), label="error:", style="bold red", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def say(text: str, *, label: str = "", style: str = "bold", err: bool = False) -> None:
    """Print ``text`` as it is, after an optional ``label`` in ``style``.

    Every message goes through here because rich reads ``[word]`` as markup and drops it:
    paths, option names (``[privacy]``) and shapes (``[batch, 1, R, R]``) hold brackets.
    """
    line = Text.assemble((label, style), " " if label and text else "", text)
    (err_console if err else console).print(line, soft_wrap=True)


def load_config(path: Path | None, overrides: list[str] | None, **changes: Any) -> Config:
    """Config from TOML + ``--set`` overrides + typed CLI options (None = keep)."""
    cfg = Config.load(path, overrides or [])
    changes = {k: v for k, v in changes.items() if v is not None}
    return cfg.replace(**changes) if changes else cfg


NOT_DP_OPTIONS = {"privacy.enabled", "privacy.ledger_dir", "privacy.allow_nonprivate"}
"""``privacy.*`` fields that mean something without DP; every other one is a DP setting."""


def refuse_dp_options_without_dp(
    cfg: Config, flags: dict[str, Any], overrides: list[str] | None, config: Path | None = None
) -> None:
    """A DP option given while DP is off is refused, never silently ignored (a user who typed
    ``--epsilon 3``, or wrote a budget into the ``--config`` file, and forgot ``--dp`` must not
    get a non-private model). A config file's privacy value equal to the default is no option
    (``privseg config`` writes every field)."""
    if cfg.privacy.enabled:
        return
    given = [name for name, value in flags.items() if value is not None]
    given += [
        item.split("=", 1)[0].strip()
        for item in overrides or []
        if item.strip().startswith("privacy.")
        and item.split("=", 1)[0].strip() not in NOT_DP_OPTIONS
    ]
    if config is not None:
        default = Config().privacy
        written = dict(Config.load(config).to_dict().get("privacy", {}))
        raw = tomllib.loads(Path(config).read_text()).get("privacy", {})
        given += [
            f"privacy.{key} in {config}"
            for key in raw
            if f"privacy.{key}" not in NOT_DP_OPTIONS
            and written.get(key) != getattr(default, key, None)
        ]
    if given:
        raise ConfigError(
            f"{', '.join(given)} set{'s' if len(given) == 1 else ''} DP but DP is off: add --dp "
            "(or privacy.enabled = true) to train with DP, or drop "
            f"{'it' if len(given) == 1 else 'them'} to train without"
        )


@contextlib.contextmanager
def interruptible(outcome: Callable[[], str]) -> Iterator[None]:
    """End the command at SIGINT (Ctrl-C) or SIGTERM with one line, ``outcome()`` (what
    finished and the command that continues), and exit status 130 or 143.

    The process ends at the signal, as after a crash privseg is built to survive: every file
    is written atomically, a federated run saves its state after each round, a ledger row is
    committed before its steps run, a folder's lock is released by the kernel, and Ray's
    processes end with privseg (``federated.reaper``). Unwinding instead would let the sites
    the signal also stopped print Ray's and Flower's tracebacks (115 lines), end in Ray's own
    ``exit(1)``, or wait for Flower's server thread, which would go on training.
    """

    def stop(signum: int, frame: Any) -> None:
        logging.disable(logging.CRITICAL)
        try:
            message = outcome()
        except Exception:  # noqa: BLE001 - a signal handler that raised would not end the process
            message = f"run the command again: {resume_command()}"
        err_console.show_cursor(True)  # a progress bar hid it
        say(message, label="interrupted:", style="bold yellow", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resume_command(*extra: str) -> str:
    """This command line as the user can type it again, with ``extra`` options added."""
    args = sys.argv[1:] + [a for a in extra if a not in sys.argv[1:]]
    return shlex.join(["privseg", *args])


class BarProgress:
    """A ``progress(description, completed, total)`` callback drawing rich progress bars.

    One bar per activity (the text before ":", e.g. "site-0" of "site-0: epoch 2/3"), updated
    in place; a finished bar is removed, so the next run of the same kind starts a fresh one
    (its own elapsed time) and the screen keeps only what is running.
    """

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.tasks: dict[str, Any] = {}

    def __call__(self, description: str, completed: int, total: int) -> None:
        key = description.split(":")[0]
        if key not in self.tasks:
            self.tasks[key] = self.bar.add_task(description, total=total)
        self.bar.update(self.tasks[key], description=description, completed=completed, total=total)
        if total and completed >= total:
            self.bar.remove_task(self.tasks.pop(key))


@contextlib.contextmanager
def progress_bar(transient: bool = False) -> Iterator[BarProgress]:
    """Rich progress bars on stderr for the duration of the block."""
    bar = Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
        disable=not err_console.is_terminal,  # elsewhere progress is logged as lines
    )
    with bar:
        yield BarProgress(bar)


def setup_logging(verbose: bool) -> None:
    """Show privseg's log records on stderr: DEBUG with ``--verbose``, INFO otherwise.

    Only the ``privseg`` loggers change level: other libraries stay at the root's WARNING, so
    ``-v`` does not turn on their debug output, and only their errors reach the console: their
    warnings (their loggers' and ``warnings.warn``'s) go to the run's ``run.log``. On a
    terminal records go through ``err_console``, which prints them above a running progress
    bar, and progress lines are left to the bars; elsewhere (make, nohup, CI) each record is
    one plain line with its time, progress lines included. A root handler already there
    (pytest's, an embedding application's) is kept and none is added.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler: logging.Handler
        if err_console.is_terminal:
            handler = RichHandler(console=err_console, show_time=False, show_path=False)
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            handler.addFilter(lambda record: record.name != PROGRESS_LOGGER)
        else:
            handler = logging.StreamHandler()
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
        handler.addFilter(OursOrAtLeast(logging.ERROR))
        root.addHandler(handler)
        route_warnings()
    logging.getLogger("privseg").setLevel(logging.DEBUG if verbose else logging.INFO)
