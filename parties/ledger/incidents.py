"""The witness's incidents as the serving node sees them: its own and its fellows'.

Kept apart from the witness's routes so that a serving capability can fail closed on an
open incident (`refuse_under_incident`) without importing another capability's service.
"""

from governance.ledger import Witness
from parties.ledger.api import LogUnderIncident, log_node
from parties.runtime.context import NodeContext
from parties.runtime.store import connect


def node_witness(ctx: NodeContext) -> Witness:
    def make() -> Witness:
        operator = log_node(ctx.topology)
        conn = connect(ctx.paths.db, explicit_transactions=True)
        return Witness(
            conn, ctx.name, ctx.signing_key, {operator: ctx.signing_public_keys()[operator]}
        )

    return ctx.component(Witness, make)


class PeerIncidents:
    """How many open incidents each fellow witness showed at the last gossip."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}


def refuse_under_incident(ctx: NodeContext) -> None:
    """Fail closed: raise `LogUnderIncident` while this witness, or a fellow witness at the
    last gossip, holds an open incident against the log."""
    held = {ctx.name: len(node_witness(ctx).incidents(open_only=True))}
    held.update(ctx.component(PeerIncidents, PeerIncidents).open)
    named = sorted(name for name, count in held.items() if count)
    if named:
        raise LogUnderIncident(
            f"open log incidents at {', '.join(named)}: no answer until their administrators "
            "clear them (`cogov ledger incidents`)")
