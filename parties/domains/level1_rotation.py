"""Rotation of the level-1 key k1, from the health authority through the shared domains.

k1 lives at the health authority; everything downstream is derived from it:
the operator's `p1 = k1·H(id)` (visits and consumer keys) and every shared domain's
token `T_d = k2[d]·p1`. A rotation therefore moves three places together:

1. the health authority draws k1' and keeps it as a pending key
   (`xid:k1:next`), so an interrupted rotation resumes with the same k1';
2. it computes the mapping p1 -> p1' = (k1'·k1^-1)·p1 for every person it
   holds (`mpc.xid.rotate_tokens`: no id is hashed or opened again) and sends
   it to the operator as resumable, idempotent Arrow batches, then commits;
3. the operator checks the staged mapping against the announced count and
   digest and that it covers every p1 it holds, then in one transaction moves
   `circ_visits.p1`, `circ_persons.p1` and re-derives every live shared domain's
   tokens from the new p1 with that shared domain's key. A refused commit changes
   nothing; a repeated commit returns the first result;
4. the authority then moves its own p1 columns and replaces k1 by k1' in one
   transaction, logs `key_rotated` and publishes the commitment k1'·G
   (`parties.domains.commitments`).

The operator sees pairs (k1·H, k1'·H): it can tell they belong to one person,
which it knew from the visit refs, but not the ratio k1'·k1^-1 (a discrete log).
Old level-1 and shared-domain tokens match nothing afterwards. Between the operator's
commit and the authority's (one local transaction) the level-1 OPRF still
answers with k1, so an insurer's token request in that instant gets tokens that
are already stale. Stale tokens, like any cached before a rotation, are refused
with the uniform `ClaimNotCheckable` (logged, not billed); `parties.claims.client.Client`
then fetches them again and, when they changed, retries the batch once.

Publishing, governing exports and taking consumer keys at the authority wait for
a running rotation (`level1_lock`), so no p1 under the old key slips in.
"""

import hashlib
import sqlite3
from collections.abc import Callable, Sequence

import pyarrow as pa
from fastapi import APIRouter

from governance.ledger.events import is_known_kind, register_event_kind
from mpc import xid
from parties.domains.api import (
    LEVEL1_COMMIT,
    LEVEL1_MAPPING,
    ROTATE_LEVEL1,
    Level1Rotation,
    NothingToRotate,
    OperatorRekey,
    RekeyCommit,
    RotationRefused,
)
from parties.domains.commitments import publish_commitment
from parties.domains.keys import K1_NAME, level1_lock, xid_pool
from parties.domains.registry import bump_token_epochs, index_visits
from parties.ledger.client import append_entry
from parties.runtime.access import Caller
from parties.runtime.batches import (
    BatchReceiver,
    StreamName,
    mount_batch_stream,
    send_batches,
)
from parties.runtime.context import NodeContext
from parties.runtime.errors import RemoteError
from parties.runtime.mount import mount
from parties.runtime.secrets import UnknownKey
from parties.runtime.service import Service
from parties.runtime.topology import Role

K1_PENDING = f"{K1_NAME}:next"
MAPPING_BATCH_ROWS = 20_000
# The operator's commit re-derives every live shared domain's tokens: it may take a while.
OPERATOR_CALL_S = 600.0
# The tables of the operator's circulation (`parties.ingest.circulation`) whose p1 move.
CIRC_VISITS, CIRC_PERSONS = "circ_visits", "circ_persons"
KEY_ROTATED = "key_rotated" if is_known_kind("key_rotated") else register_event_kind(
    "key_rotated")
TOKENS_REDERIVED = "tokens_rederived" if is_known_kind("tokens_rederived") else (
    register_event_kind("tokens_rederived"))

COMPONENT = "level1_rotation"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE circ_level1_staged (
        stream TEXT NOT NULL, old_p1 BLOB NOT NULL, new_p1 BLOB NOT NULL,
        PRIMARY KEY (stream, old_p1)
    );
    CREATE TABLE circ_level1_rotations (
        stream TEXT PRIMARY KEY, old_version INTEGER NOT NULL, new_version INTEGER NOT NULL,
        persons INTEGER NOT NULL, visits INTEGER NOT NULL, domains INTEGER NOT NULL,
        applied_at TEXT NOT NULL DEFAULT (datetime('now'))
    )
    """,
)


def mapping_digest(pairs: Sequence[tuple[bytes, bytes]]) -> str:
    """SHA-256 over the sorted (old, new) pairs: both sides compute it the same way."""
    h = hashlib.sha256()
    for old, new in sorted(pairs):
        h.update(old + new)
    return h.hexdigest()


# --- health authority --------------------------------------------------------------------------


def _pending_key(ctx: NodeContext, current: xid.XidKey) -> xid.XidKey:
    """k1' of the rotation in progress, or a fresh one (kept until the rotation commits)."""
    try:
        pending = ctx.secrets.xid_key(K1_PENDING)
        if pending.version == current.version + 1:
            return pending
    except UnknownKey:
        pass
    pending = current.rotate()
    ctx.secrets.put_xid_key(K1_PENDING, pending)
    return pending


def _held_p1(conn: sqlite3.Connection) -> tuple[list[bytes], list[tuple[str, bytes]]]:
    """Every p1 the authority holds (sorted), and each visit's (visit_id, p1)."""
    visits = [(v, bytes(p)) for v, p in conn.execute("SELECT visit_id, p1 FROM ha_visits")]
    keyed = (bytes(r[0]) for r in conn.execute("SELECT p1 FROM ha_consumer_keys"))
    return sorted({*(p for _, p in visits), *keyed}), visits


def rotate_level1_key(
    ctx: NodeContext, *, on_batch: Callable[[int, int], None] | None = None
) -> Level1Rotation:
    """Rotate k1 and every token derived from it, at the authority and the operator."""
    with level1_lock(ctx):
        try:
            current = ctx.secrets.xid_key(K1_NAME)
        except UnknownKey:
            raise NothingToRotate("no data was governed yet: there is no k1 to rotate") from None
        pending = _pending_key(ctx, current)
        with ctx.store.lock:
            old_p1, visits = _held_p1(ctx.store.conn)
        new_p1 = xid.rotate_tokens(current, pending, old_p1, pool=xid_pool(ctx))
        pairs = list(zip(old_p1, new_p1, strict=True))
        digest = mapping_digest(pairs)
        stream = f"k1-{current.version}-{pending.version}-{digest[:24]}"
        operator = ctx.topology.node_of(Role.OPERATOR)
        with ctx.client(timeout=OPERATOR_CALL_S) as client:
            try:
                send_batches(
                    client, operator, LEVEL1_MAPPING, stream,
                    pa.table({"old_p1": pa.array(old_p1, pa.binary(32)),
                              "new_p1": pa.array(new_p1, pa.binary(32))}),
                    batch_rows=MAPPING_BATCH_ROWS, on_batch=on_batch,
                )
                done = client.call(
                    operator, LEVEL1_COMMIT,
                    RekeyCommit(old_version=current.version, new_version=pending.version,
                                pairs=len(pairs), digest=digest),
                    params={"stream": stream},
                )
            except RemoteError as exc:
                if 400 <= exc.http_status < 500:
                    # A definite refusal: nothing moved anywhere, so k1' goes too (a transport
                    # failure keeps it: the operator may have committed, and a rerun resumes).
                    ctx.secrets.drop_xid_key(K1_PENDING)
                raise
        moved = dict(pairs)
        with ctx.store.lock, ctx.store.conn as conn:
            conn.executemany("UPDATE ha_visits SET p1 = ? WHERE visit_id = ?",
                             [(moved[p], v) for v, p in visits])
            conn.executemany("UPDATE ha_consumer_keys SET p1 = ? WHERE p1 = ?",
                             [(new, old) for old, new in pairs])
            # Last statement of the unit: the key and the tokens commit together.
            ctx.secrets.replace_xid_key(K1_NAME, pending)
        ctx.secrets.drop_xid_key(K1_PENDING)
    result = Level1Rotation(key_id=K1_NAME, old_version=current.version,
                            new_version=pending.version, persons=len(pairs), visits=len(visits),
                            operator=done)
    append_entry(ctx, KEY_ROTATED, {
        "key_id": K1_NAME, "old_version": current.version, "new_version": pending.version,
        "persons": len(pairs), "visits": len(visits), "stream": stream,
    })
    ctx.log.event("key_rotated", key_id=K1_NAME, old_version=current.version,
                  new_version=pending.version, persons=len(pairs))
    publish_commitment(ctx, pending)
    return result


def _authority_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, ROTATE_LEVEL1)
    def post_rotate(caller: Caller) -> Level1Rotation:
        """Rotate k1; the operator's p1 and every shared domain's tokens move with it."""
        return rotate_level1_key(ctx)

    return [router]


# --- operator ----------------------------------------------------------------------------------


def _stage(stream: str) -> Callable[[sqlite3.Connection, pa.Table], int]:
    def apply(conn: sqlite3.Connection, table: pa.Table) -> int:
        if table.column_names != ["old_p1", "new_p1"]:
            raise RotationRefused("a mapping batch has exactly the columns old_p1, new_p1")
        olds, news = table["old_p1"].to_pylist(), table["new_p1"].to_pylist()
        if any(not isinstance(v, bytes) or len(v) != 32 for v in (*olds, *news)):
            raise RotationRefused("old_p1 and new_p1 must be 32-byte values")
        conn.executemany(
            "INSERT OR REPLACE INTO circ_level1_staged (stream, old_p1, new_p1) VALUES (?, ?, ?)",
            [(stream, o, n) for o, n in zip(olds, news, strict=True)],
        )
        return len(olds)

    return apply


def apply_rekey(ctx: NodeContext, stream: str, commit: RekeyCommit) -> OperatorRekey:
    """Move every held p1 to its new value and re-derive the shared domains' tokens, all or
    nothing."""
    with ctx.store.lock:
        conn = ctx.store.conn
        done = conn.execute(
            "SELECT stream, old_version, new_version, persons, visits, domains"
            " FROM circ_level1_rotations WHERE stream = ?", (stream,)).fetchone()
        if done:
            return OperatorRekey(**dict(zip(OperatorRekey.model_fields, done, strict=True)))
        staged = [(bytes(o), bytes(n)) for o, n in conn.execute(
            "SELECT old_p1, new_p1 FROM circ_level1_staged WHERE stream = ?", (stream,))]
        if len(staged) != commit.pairs or mapping_digest(staged) != commit.digest:
            raise RotationRefused(
                f"{len(staged)} pairs staged for {stream}, {commit.pairs} announced, "
                "or the digest differs: resend the missing batches")
        moved = dict(staged)
        held = {bytes(r[0]) for r in conn.execute(
            f"SELECT p1 FROM {CIRC_VISITS} UNION SELECT p1 FROM {CIRC_PERSONS}")}
        missing = len(held - moved.keys())
        if missing:
            raise RotationRefused(f"the mapping leaves {missing} held persons without a new p1")
        news = list(moved.values())
        if len(set(news)) != len(news) or not held.isdisjoint(news):
            raise RotationRefused("new p1 values must be distinct and unlike every old one")
        xid.check_points(news)
        visits = conn.execute(f"SELECT visit_ref, p1 FROM {CIRC_VISITS}").fetchall()
        refs = [bytes(r) for r, _ in visits]
        new_of_visit = [moved[bytes(p)] for _, p in visits]
        with conn:
            for table in (CIRC_VISITS, CIRC_PERSONS):
                conn.executemany(f"UPDATE {table} SET p1 = ? WHERE p1 = ?",
                                 [(moved[old], old) for old in held])
            domains = index_visits(ctx, conn, refs, new_of_visit)
            bump_token_epochs(conn)
            conn.execute("DELETE FROM circ_level1_staged WHERE stream = ?", (stream,))
            result = OperatorRekey(stream=stream, old_version=commit.old_version,
                                   new_version=commit.new_version, persons=len(held),
                                   visits=len(refs), domains=domains)
            conn.execute(
                "INSERT INTO circ_level1_rotations (stream, old_version, new_version, persons,"
                " visits, domains) VALUES (?, ?, ?, ?, ?, ?)",
                (stream, result.old_version, result.new_version, result.persons,
                 result.visits, result.domains))
    append_entry(ctx, TOKENS_REDERIVED, {
        "key_id": K1_NAME, "old_version": result.old_version,
        "new_version": result.new_version, "persons": result.persons, "visits": result.visits,
        "domains": result.domains, "stream": stream,
    })
    ctx.log.event("tokens_rederived", stream=stream, persons=result.persons,
                  domains=result.domains)
    return result


def _operator_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()
    receiver = BatchReceiver(ctx.store)

    mount_batch_stream(router, LEVEL1_MAPPING, receiver,
                       lambda caller, stream: f"k1:{caller.name}:{stream}",
                       lambda caller, stream, idx: _stage(stream),
                       "(old p1, new p1) pairs, staged until the commit")

    @mount(router, LEVEL1_COMMIT)
    def commit(stream: StreamName, body: RekeyCommit, caller: Caller) -> OperatorRekey:
        """Apply the staged mapping and re-derive every live shared domain's tokens
        (idempotent)."""
        return apply_rekey(ctx, stream, body)

    return [router]


AUTHORITY_LEVEL1_ROTATION_SERVICE = Service(
    name="level1_rotation",
    roles=(Role.HEALTH_AUTHORITY,),
    routers=_authority_routes,
)

OPERATOR_LEVEL1_ROTATION_SERVICE = Service(
    name="level1_rekey",
    roles=(Role.OPERATOR,),
    routers=_operator_routes,
    components=((COMPONENT, MIGRATIONS),),  # batch bookkeeping comes with circulation
)
