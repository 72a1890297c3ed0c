"""Which site a reply comes from: the node's registered key decides, never the reply alone.

A reply names its site (``M.reply_site``), but that name is whatever the SuperNode's
``--node-config`` says. In deployment ``privseg server`` registers every site's public key
with its own SuperLink (``flwr supernode register sites/<name>.pub --name <name>``); Flower
returns the node id it created for that key, and from then on the SuperLink accepts a Fleet
request for that node id only when it is signed with the matching private key
(``flwr/superlink/routers/fleet/node_auth.py``), and stores a reply only from the node the
instruction was addressed to (``LinkState.store_message_res``). So ``node id -> site`` from
the registrations (:data:`SiteNodes`) is the identity; a reply's name is only checked
against it.

Without registrations (simulation, ``--insecure``) there is no identity to check against: the
first node to claim a name holds it for the run, and any other node claiming it is refused.
Either way one site is one node, so results never merge two nodes into one row and no node
can overwrite another site's epsilon.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from privseg.core.errors import FederationError

SiteNodes = dict[int, str]
"""node id -> site name, from the server's own key registrations."""


class SiteIdentity:
    """Checks each reply's claimed site against the node it came from (see the module doc)."""

    def __init__(self, registered: Mapping[int, str] | None = None) -> None:
        self.registered: SiteNodes | None = dict(registered) if registered else None
        self.bound: dict[str, int] = {}  # site -> the node that holds it in this run
        self.names: dict[int, str] = {}  # node -> the site it first claimed

    def problem(self, node: int, claimed: str) -> str:
        """Why a reply from ``node`` naming ``claimed`` must be refused ('' when it may pass;
        the caller logs the reason)."""
        if self.registered is not None:
            site = self.registered.get(node)
            if site is None:
                return (
                    f"node {node} claims site {claimed!r} but holds no key the server "
                    "registered; rejected"
                )
            if site != claimed:
                return (
                    f"node {node} holds the key registered for site {site!r} but its reply "
                    f"claims site {claimed!r}; rejected (a misconfigured or impostor site)"
                )
        first = self.names.get(node)
        if first is not None and first != claimed:
            return (
                f"node {node} was site {first!r} earlier in this run and now claims site "
                f"{claimed!r} (one node for two sites); rejected"
            )
        holder = self.bound.get(claimed)
        if holder is not None and holder != node:
            return (
                f"node {node} claims site {claimed!r}, which node {holder} already is in this "
                "run (two nodes for one site); the second is refused"
            )
        self.names[node], self.bound[claimed] = claimed, node
        return ""

    def site_of(self, node: int) -> str | None:
        """The site ``node`` is (registered, or claimed earlier in this run); None if unknown."""
        return (self.registered or {}).get(node) or self.names.get(node)

    def who(self, node: int, reason: str = "") -> str:
        """``reason`` prefixed by how messages name ``node``: its site when known; else a
        reason that names its site itself stands alone; the node id only as a last resort."""
        site = self.site_of(node)
        if site is None and reason.startswith("site "):
            return reason
        label = f"site {site}" if site else f"node {node} (no site known yet)"
        return f"{label}: {reason}" if reason else label

    def keep_connected(self, nodes: Iterable[int]) -> None:
        """Without registrations, free the names of nodes that are gone: a restarted SuperNode
        gets a new node id there and must be able to take its site back. (With registrations
        a site's node id is its key's, across restarts.)"""
        if self.registered is not None:
            return
        alive = set(nodes)
        for node in [n for n in self.names if n not in alive]:
            del self.bound[self.names.pop(node)]


def dumps_site_nodes(nodes: Mapping[int, str]) -> str:
    """The registrations as a run-config value (JSON; node ids as strings)."""
    return json.dumps({str(k): v for k, v in sorted(nodes.items())})


def loads_site_nodes(text: str) -> SiteNodes | None:
    """:func:`dumps_site_nodes`' value back (None for '': no registrations)."""
    if not text:
        return None
    try:
        raw = json.loads(text)
        nodes = {int(k): str(v) for k, v in raw.items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise FederationError(f"the run config's site-nodes is not valid: {exc}") from None
    if len(set(nodes.values())) != len(nodes):
        raise FederationError(f"the run config registers one site for two nodes: {nodes}")
    return nodes
