"""Messages to and from the sites over Flower's Grid: waiting for sites, pushing a phase's
messages and pulling their replies with an adaptive pause."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from privseg.core.errors import FederationError
from privseg.federated.flower_compat import Backoff

POLL = (0.02, 0.5, 0.1)  # pull replies every 10% of the time waited so far, in [20 ms, 0.5 s]


def wait_for_sites(grid: Grid, n: int, timeout: float, want: int = 0) -> list[int]:
    """Node ids once ``want`` (or, after ``timeout`` s, at least ``n``) are connected.

    Raises FederationError when fewer than ``n`` are connected after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= max(n, want):
            return nodes
        if time.monotonic() > deadline:
            if len(nodes) >= n:
                return nodes
            raise FederationError(
                f"only {len(nodes)} of the {n} sites needed (federated.min_sites) are connected "
                f"after {timeout:g} s; stopping"
            )
        time.sleep(0.5)


def send_and_receive(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float | None,
    poll: tuple[float, float, float] = POLL,
) -> list[Message]:
    """Push ``messages``, then pull their replies until all are in or ``timeout`` s passed.

    Flower's ``Grid.send_and_receive`` sleeps a fixed 3 s between pulls in deployment
    (``flwr/superlink/grid/http_grid.py``), which idled up to 3 s on every train and evaluate
    phase. Here the pause grows with the time waited (``poll = (lo, hi, factor)``), so a reply
    waits at most about 10% of the phase, plus 20 ms.
    """
    pending = set(grid.push_messages(messages))
    backoff = Backoff(*poll)
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        waited = backoff.idle()
        if not pending or (timeout is not None and waited >= timeout):
            break
        backoff.sleep()
    return replies


def connected(grid: Grid, want: int, timeout: float) -> list[int]:
    """The node ids connected once ``want`` are, or after ``timeout`` s (never raises: the
    sites already told may have left)."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(0.5)
    return nodes
