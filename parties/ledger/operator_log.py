"""The log at the operator: its Merkle log and the witnesses' cosignatures, in its store.

Used by the operator's routes, by any code appending in place at the operator
(`parties.ledger.client`), and by the CLI on the operator's host.
"""

import base64
import sqlite3
import threading

from governance.ledger import Cosignature, MerkleLog, SignedEntry
from parties.ledger.api import EntriesAppended, InclusionProofBundle
from parties.runtime.context import NodeContext
from parties.runtime.store import connect

COMPONENT = "ledger_service"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE ledger_cosignatures (
        witness TEXT NOT NULL, tree_size INTEGER NOT NULL, cosignature TEXT NOT NULL,
        PRIMARY KEY (witness, tree_size)
    )
    """,
)


class OperatorLog:
    """The operator's MerkleLog on a connection of its own (the log takes BEGIN IMMEDIATE)."""

    def __init__(self, ctx: NodeContext) -> None:
        self.conn: sqlite3.Connection = connect(ctx.paths.db, explicit_transactions=True)
        self.lock = threading.Lock()
        self.log = MerkleLog(self.conn, ctx.name, ctx.signing_key, ctx.signing_public_keys())


def operator_log(ctx: NodeContext) -> OperatorLog:
    return ctx.component(OperatorLog)


def append_entries(ctx: NodeContext, entries: list[SignedEntry]) -> EntriesAppended:
    """Append at the operator (this node must be it)."""
    holder = operator_log(ctx)
    with holder.lock:
        result = holder.log.append(entries)
    return EntriesAppended(
        first_index=result.first_index, count=result.count, tree_head=result.tree_head
    )


def inclusion_bundle(ctx: NodeContext, index: int) -> InclusionProofBundle:
    holder = operator_log(ctx)
    with holder.lock:
        holder.log.sync()
        head = holder.log.tree_head()
        proof = holder.log.inclusion_proof(index, head.tree_size)
        leaf = holder.log.leaf(index)
    return InclusionProofBundle(
        proof=proof.to_json(), entry=base64.b64encode(leaf).decode(), tree_head=head,
        log_public_key=holder.log.public_key_hex,
    )


def keep_cosignature(ctx: NodeContext, cosignature: Cosignature) -> None:
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute(
            "INSERT OR REPLACE INTO ledger_cosignatures VALUES (?, ?, ?)",
            (cosignature.witness, cosignature.tree_size, cosignature.model_dump_json()),
        )


def latest_cosignatures(conn: sqlite3.Connection) -> list[Cosignature]:
    """Each witness's cosignature of the largest head it countersigned."""
    rows = conn.execute(
        "SELECT c.cosignature FROM ledger_cosignatures c JOIN ("
        " SELECT witness, MAX(tree_size) AS size FROM ledger_cosignatures GROUP BY witness"
        ") m ON c.witness = m.witness AND c.tree_size = m.size"
    ).fetchall()
    return [Cosignature.model_validate_json(r[0]) for r in rows]
