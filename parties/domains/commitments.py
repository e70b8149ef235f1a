"""Key holders publish the commitment K = k·G of every xID key version in the log.

The insurer checks each OPRF step's DLEQ proof against these entries
(`parties.domains.commitment_book`), so a key holder that applies another key than the
one it committed to, or a different key for one insurer, is caught. The health authority
publishes k1·G, the operator every k2[d]·G (with the shared domain's scenario and data
user, so an insurer knows which commitment is its own). Each (key id, version) is published
once: a local table remembers what reached the log, and every step publishes a missing
one before it proves anything with that key, so a version created or rotated while the log
was unreachable is published at its first use.
"""

from governance.ledger.events import is_known_kind, register_event_kind
from mpc import voprf, xid
from parties.domains.api import KEY_COMMITTED_KIND
from parties.ledger.client import append_entry
from parties.runtime.context import NodeContext

KEY_COMMITTED = KEY_COMMITTED_KIND if is_known_kind(KEY_COMMITTED_KIND) else (
    register_event_kind(KEY_COMMITTED_KIND))

COMPONENT = "xid_commitments"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE xid_commitments (
        key_id TEXT NOT NULL, version INTEGER NOT NULL, commitment BLOB NOT NULL,
        published_at TEXT NOT NULL DEFAULT (datetime('now')),
        PRIMARY KEY (key_id, version)
    )
    """,
)


def publish_commitment(ctx: NodeContext, key: xid.XidKey, **about: str) -> bytes:
    """k·G of `key`, appended to the log unless this version already was; `about` names
    what the key serves (for k2[d]: its domain, scenario and data user)."""
    point = key.commitment()
    with ctx.store.lock:
        known = ctx.store.conn.execute(
            "SELECT 1 FROM xid_commitments WHERE key_id = ? AND version = ?",
            (key.key_id, key.version)).fetchone()
    if known:
        return point
    append_entry(ctx, KEY_COMMITTED, {
        "key_id": key.key_id, "version": key.version, "commitment": point.hex(),
        "suite": voprf.XID_SUITE, "hash_version": xid.HASH_VERSION, **about})
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute("INSERT OR IGNORE INTO xid_commitments (key_id, version, commitment) "
                     "VALUES (?, ?, ?)", (key.key_id, key.version, point))
    ctx.log.event("xid_key_committed", key_id=key.key_id, version=key.version)
    return point
