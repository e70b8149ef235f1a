"""Pinning the log's first checkpoint at federation setup (`parties.ledger.pin`)."""

from parties.ledger.api import LOG_STARTED, LogAlreadyStarted
from parties.ledger.client import signed_entry
from parties.ledger.operator_log import append_entries, operator_log, signed_note
from parties.ledger.pin import PIN_FILE, LogPin
from parties.runtime.context import NodeContext
from parties.runtime.state import write_public


def pin_first_checkpoint(ctx: NodeContext) -> LogPin:
    """At the operator, on an empty log: append `log_started` and pin the checkpoint of
    that one-entry tree in every node's directory."""
    holder = operator_log(ctx)
    holder.log.sync()
    if holder.log.size:
        raise LogAlreadyStarted("the log already holds entries: its first checkpoint is "
                                "pinned when the federation is set up")
    append_entries(ctx, [signed_entry(ctx, LOG_STARTED, {"federation": ctx.topology.name})])
    head = holder.log.tree_head(1)
    pin = LogPin(checkpoint=signed_note(ctx, head, []), tree_head=head)
    for node in ctx.topology.nodes:
        write_public(ctx.state.node(node.name).root / PIN_FILE, pin.model_dump_json().encode())
    return pin
