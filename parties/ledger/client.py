"""How any node appends to the federation's log: a log entry signed as the node.

Every capability records what it did with `append_entry`: at the operator the entry
is appended in place, from any other node it is sent to the operator over mutual TLS.
"""

from typing import Any

from governance.ledger import SignedEntry, make_event, sign_event
from parties.ledger.api import (
    APPEND_ENTRIES,
    LOG_NODE_ROLE,
    EntriesAppended,
    EntryBatch,
    log_node,
)
from parties.ledger.operator_log import append_entries
from parties.runtime.context import NodeContext
from parties.runtime.node_log import current_request_id, new_request_id


def signed_entry(ctx: NodeContext, kind: str, payload: dict[str, Any],
                 timestamp_ms: int | None = None) -> SignedEntry:
    """A log entry of `kind` stating `payload`, signed by this node under the current
    request id."""
    rid = current_request_id.get() or new_request_id()
    return sign_event(make_event(kind, ctx.name, rid, payload, timestamp_ms), ctx.signing_key)


def append_entry(ctx: NodeContext, kind: str, payload: dict[str, Any],
                 timestamp_ms: int | None = None) -> EntriesAppended:
    """Sign a log entry as this node and append it to the federation's log.

    With a fixed `timestamp_ms` a retry signs the same bytes (Ed25519 is deterministic), so
    the log keeps the entry once however often it is sent.
    """
    entry = signed_entry(ctx, kind, payload, timestamp_ms)
    if ctx.spec.role == LOG_NODE_ROLE:
        return append_entries(ctx, [entry])
    with ctx.client() as client:
        return client.call(log_node(ctx.topology), APPEND_ENTRIES, EntryBatch([entry]))
