"""How any node appends to the federation's log: a log entry signed as the node.

Every capability records what it did with `append_entry`: at the operator the entry
is appended in place, from any other node it is sent to the operator over mutual TLS.
An entry that must reach the log but may wait for it goes through
`parties.ledger.deferred.append_or_defer` instead.
"""

import threading
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
from parties.runtime.client import NodeClient
from parties.runtime.context import NodeContext
from parties.runtime.node_log import current_request_id, new_request_id


def signed_entry(ctx: NodeContext, kind: str, payload: dict[str, Any]) -> SignedEntry:
    """A log entry of `kind` stating `payload`, signed by this node under the current
    request id."""
    rid = current_request_id.get() or new_request_id()
    return sign_event(make_event(kind, ctx.name, rid, payload), ctx.signing_key)


class LogClients:
    """This node's long-lived clients to the log, one per timeout: an answer waits for its
    log entry, and a TLS handshake per entry would double that wait."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.lock = threading.Lock()
        self.clients: dict[float | None, NodeClient] = {}

    def client(self, timeout: float | None) -> NodeClient:
        with self.lock:
            found = self.clients.get(timeout)
            if found is None:
                found = self.clients[timeout] = self.ctx.client(timeout)
            return found

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def append_signed(ctx: NodeContext, entry: SignedEntry, timeout: float | None = None
                  ) -> EntriesAppended:
    """Append an entry this node signed (idempotent: the log stores an entry once); a call
    to the operator gives up after `timeout` seconds (default: the client's)."""
    if ctx.spec.role == LOG_NODE_ROLE:
        return append_entries(ctx, [entry])
    client = ctx.component(LogClients).client(timeout)
    return client.call(log_node(ctx.topology), APPEND_ENTRIES, EntryBatch([entry]))


def append_entry(ctx: NodeContext, kind: str, payload: dict[str, Any]) -> EntriesAppended:
    """Sign a log entry as this node and append it to the federation's log."""
    return append_signed(ctx, signed_entry(ctx, kind, payload))
