"""The witness's incidents as the serving node sees them: its own and its fellows'.

Kept apart from the witness's routes so that a serving capability can fail closed on an
open incident (`refuse_under_incident`) without importing another capability's service.
"""

import os
import time

from governance.ledger import Witness
from parties.ledger.api import WITNESS_ROLES, LogUnderIncident, log_node
from parties.ledger.pin import load_pin, start_from_pin
from parties.runtime.context import NodeContext
from parties.runtime.store import connect


def node_witness(ctx: NodeContext) -> Witness:
    def make() -> Witness:
        operator = log_node(ctx.topology)
        conn = connect(ctx.paths.db, explicit_transactions=True)
        witness = Witness(
            conn, ctx.name, ctx.signing_key, {operator: ctx.signing_public_keys()[operator]}
        )
        start_from_pin(witness, operator, load_pin(ctx.paths))
        return witness

    return ctx.component(Witness, make)


# A fellow witness whose incidents and head were not checked for this long (seconds;
# default 60) counts as holding one: an unreachable witness, or a log that stalls the
# gossip, fails closed.
SILENCE_ENV = "COGOV_WITNESS_MAX_SILENCE_S"
DEFAULT_SILENCE_S = 60.0


class PeerIncidents:
    """How many open incidents each fellow witness showed at the last gossip, and when its
    incidents and head were last checked (monotonic time)."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}
        self.refreshed: dict[str, float] = {}
        self.started = time.monotonic()


def refuse_under_incident(ctx: NodeContext) -> None:
    """Fail closed: raise `LogUnderIncident` while this witness, or a fellow witness at the
    last gossip, holds an open incident against the log, or while a fellow witness has not
    been checked for `SILENCE_ENV` seconds (since this node started, at first)."""
    peers = ctx.component(PeerIncidents, PeerIncidents)
    silence = float(os.environ.get(SILENCE_ENV, DEFAULT_SILENCE_S))
    held = {ctx.name: len(node_witness(ctx).incidents(open_only=True)), **peers.open}
    named = sorted(name for name, count in held.items() if count)
    now = time.monotonic()
    unchecked = sorted(
        n.name for role in WITNESS_ROLES for n in ctx.topology.nodes_with_role(role)
        if n.name != ctx.name
        and now - peers.refreshed.get(n.name, peers.started) > silence)
    if named or unchecked:
        raise LogUnderIncident(
            f"open log incidents at {', '.join(named) or 'no witness'}; unchecked witnesses: "
            f"{', '.join(unchecked) or 'none'}: no answer until their administrators clear "
            "them (`cogov ledger incidents`) and the witnesses gossip again")
