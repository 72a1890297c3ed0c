"""How long-running steps report progress, everywhere in privseg (the CLI draws the bars)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

Progress = Callable[[str, int, int], None]
"""``progress(description, completed, total)``."""

PROGRESS_LOGGER = "privseg.core.progress"
"""The logger of progress lines: the CLI shows them on the console only where it draws no bars."""

log = logging.getLogger(PROGRESS_LOGGER)


def no_progress(description: str, completed: int, total: int) -> None:
    """The default: report nothing."""
    return None


class LoggedProgress:
    """A progress callback that also logs lines: where no bar is drawn (``make``, ``nohup``, CI,
    ``run.log``) a 16-minute phase would otherwise say nothing.

    An activity is the text before ":" in the description (as the bars key it). It logs its
    first call, every ``steps`` (a fraction of its total) and its last, each with the time
    elapsed since the first call and, from the rate so far, the time left.
    """

    def __init__(
        self,
        progress: Progress = no_progress,
        *,
        steps: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.progress, self.steps, self.clock = progress, steps, clock
        self.started: dict[str, tuple[float, int]] = {}  # activity -> (time, completed)
        self.logged: dict[str, int] = {}  # activity -> completed at its last line

    def __call__(self, description: str, completed: int, total: int) -> None:
        self.progress(description, completed, total)
        key = description.split(":")[0]
        now = self.clock()
        first = key not in self.started
        start, done_before = self.started.setdefault(key, (now, completed))
        last = total > 0 and completed >= total
        if first or last or completed - self.logged[key] >= self.steps * total:
            self.logged[key] = completed
            left = ""
            if not last and completed > done_before:
                rate = (now - start) / (completed - done_before)
                left = f", about {_clock(rate * (total - completed))} left"
            log.info(
                "%s [%d/%d] %s elapsed%s", description, completed, total, _clock(now - start), left
            )
        if last:
            del self.started[key], self.logged[key]


def logged(progress: Progress) -> LoggedProgress:
    """``progress`` that also logs lines (itself when it already does: a study's runs)."""
    return progress if isinstance(progress, LoggedProgress) else LoggedProgress(progress)


def _clock(seconds: float) -> str:
    """``1:02:03`` or ``2:03`` (minutes:seconds)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
