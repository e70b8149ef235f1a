"""The log at the operator: its Merkle log and the witnesses' cosignatures, in its store.

Used by the operator's routes, by any code appending in place at the operator
(`parties.ledger.client`), and by the CLI on the operator's host.
"""

import base64
import os
import sqlite3
import threading

from governance.ledger import Cosignature, MerkleLog, ProofUnavailable, SignedEntry, SignedTreeHead
from governance.ledger.checkpoint import checkpoint_text, note, origin_of, sign_line
from governance.ledger.proofs import ProofBundle, join_path
from governance.ledger.store import DEFAULT_MAX_SKEW_MS
from parties.ledger.api import EntriesAppended
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
MAX_SKEW_ENV = "COGOV_LOG_MAX_SKEW_S"


def max_skew_ms() -> int:
    """How far an entry's claimed time may be from the log's clock ($COGOV_LOG_MAX_SKEW_S,
    else five minutes); further back- or forward-dated entries are refused."""
    seconds = os.environ.get(MAX_SKEW_ENV)
    return DEFAULT_MAX_SKEW_MS if not seconds else int(float(seconds) * 1000)


class OperatorLog:
    """The operator's MerkleLog on a connection of its own (the log takes BEGIN IMMEDIATE)."""

    def __init__(self, ctx: NodeContext) -> None:
        self.conn: sqlite3.Connection = connect(ctx.paths.db, explicit_transactions=True)
        self.lock = threading.Lock()
        self.log = MerkleLog(self.conn, ctx.name, ctx.signing_key, ctx.signing_public_keys(),
                             max_skew_ms=max_skew_ms())


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


def inclusion_bundle(ctx: NodeContext, index: int) -> ProofBundle:
    """Entry `index` with its audit path against the cosigned checkpoint (`checkpoint_note`);
    `ProofUnavailable` while no cosigned checkpoint includes it."""
    size, cosignatures = _best_cosigned(ctx)
    holder = operator_log(ctx)
    with holder.lock:
        holder.log.sync()
        head = holder.log.tree_head(size)
        if not 0 <= index < head.tree_size:
            raise ProofUnavailable(f"entry {index} is in no cosigned checkpoint yet (the "
                                   f"witnesses cosigned size {head.tree_size})")
        path = holder.log.inclusion_proof(index, head.tree_size).path
        leaf = holder.log.leaf(index)
    return ProofBundle(index=index, checkpoint=signed_note(ctx, head, cosignatures),
                       inclusion=join_path(path), entry=base64.b64encode(leaf).decode())


def receipt(ctx: NodeContext, signature: str) -> ProofBundle:
    """The entry carrying `signature` as stored, with its receipt: its audit path against a
    checkpoint signed now at the log's size (cosigned too if the witnesses cosigned it)."""
    holder = operator_log(ctx)
    with holder.lock:
        holder.log.sync()
        index = holder.log.index_of(signature)
        head = holder.log.tree_head()
        path = holder.log.inclusion_proof(index, head.tree_size).path
        leaf = holder.log.leaf(index)
    with ctx.store.lock:
        rows = ctx.store.conn.execute(
            "SELECT cosignature FROM ledger_cosignatures WHERE tree_size = ? ORDER BY witness",
            (head.tree_size,)).fetchall()
    cosignatures = [Cosignature.model_validate_json(r[0]) for r in rows]
    return ProofBundle(index=index, checkpoint=signed_note(ctx, head, cosignatures),
                       inclusion=join_path(path), entry=base64.b64encode(leaf).decode())


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


def _best_cosigned(ctx: NodeContext) -> tuple[int | None, list[Cosignature]]:
    """The largest size that the most witnesses cosigned, with their cosignatures."""
    with ctx.store.lock:
        best = ctx.store.conn.execute(
            "SELECT tree_size FROM ledger_cosignatures GROUP BY tree_size"
            " ORDER BY COUNT(DISTINCT witness) DESC, tree_size DESC LIMIT 1").fetchone()
        rows = [] if best is None else ctx.store.conn.execute(
            "SELECT cosignature FROM ledger_cosignatures WHERE tree_size = ? ORDER BY witness",
            (best[0],)).fetchall()
    return (None if best is None else best[0],
            [Cosignature.model_validate_json(r[0]) for r in rows])


def signed_note(ctx: NodeContext, head: SignedTreeHead, cosignatures: list[Cosignature]
                 ) -> str:
    """The C2SP checkpoint of `head`, signed by the log, with the cosignatures of it."""
    origin = origin_of(ctx.name, ctx.signing_key.public_key())
    text = checkpoint_text(origin, head.tree_size, head.root)
    return note(text, [sign_line(text, origin, ctx.signing_key)] + [
        c.checkpoint_cosignature for c in cosignatures
        if c.checkpoint_cosignature and (c.tree_size, c.root_hash) == (head.tree_size,
                                                                    head.root_hash)])


def checkpoint_note(ctx: NodeContext) -> str:
    """The C2SP checkpoint of the largest head that the most witnesses cosigned (the latest
    head if none has been), signed by the log and carrying those witnesses' cosignatures."""
    size, cosignatures = _best_cosigned(ctx)
    holder = operator_log(ctx)
    with holder.lock:
        holder.log.sync()
        head = holder.log.tree_head(size)
    return signed_note(ctx, head, cosignatures)
