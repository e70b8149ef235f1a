"""The operator's shared domains in its store: the registry and each shared domain's tokens.

A shared domain d belongs to one (scenario, data user) and has its own xID key k2[d]
(`parties.domains.keys.domain_key_name`); per visit it stores the token
T_d = k2[d]·P1 of the visit's person (`domain_tokens`: token -> visit_ref). Tokens of
two shared domains are unlinkable without the keys. Deleting a shared domain destroys
k2[d] (crypto-shredding) and drops its token rows: nothing on it can be answered again
and its tokens cannot be recomputed. Visits arriving in circulation get their token in
every live shared domain (`index_visits`, inside the arrival's transaction).
"""

import secrets
import sqlite3
from collections.abc import Sequence

from mpc import xid
from parties.domains.api import (
    DomainDeleted,
    DomainExists,
    NotADataUser,
    SharedDomain,
    UnknownDomain,
)
from parties.domains.keys import domain_key_name, xid_pool
from parties.ledger.client import append_entry
from parties.runtime.context import NodeContext
from parties.runtime.topology import Role

COMPONENT = "operator_domains"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE domains (
        domain_id TEXT PRIMARY KEY, scenario TEXT NOT NULL, data_user TEXT NOT NULL,
        key_name TEXT NOT NULL, created_at TEXT NOT NULL DEFAULT (datetime('now')),
        deleted_at TEXT
    );
    CREATE UNIQUE INDEX domains_live ON domains (scenario, data_user) WHERE deleted_at IS NULL;
    CREATE TABLE domain_tokens (
        domain_id TEXT NOT NULL, visit_ref BLOB NOT NULL, token BLOB NOT NULL,
        PRIMARY KEY (domain_id, visit_ref)
    ) WITHOUT ROWID;
    CREATE INDEX domain_tokens_token ON domain_tokens (domain_id, token)
    """,
    # Bumped whenever a shared domain's stored tokens change value (a k1 or k2 rotation).
    "ALTER TABLE domains ADD COLUMN token_epoch INTEGER NOT NULL DEFAULT 1",
)

_COLUMNS = "domain_id, scenario, data_user, created_at, deleted_at"


def _info(conn: sqlite3.Connection, row: tuple) -> SharedDomain:
    domain_id, scenario, data_user, created_at, deleted_at = row
    tokens, persons = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT token) FROM domain_tokens WHERE domain_id = ?",
        (domain_id,),
    ).fetchone()
    return SharedDomain(domain_id=domain_id, scenario=scenario, data_user=data_user, tokens=tokens,
                      persons=persons, created_at=created_at, deleted_at=deleted_at)


def list_domains(ctx: NodeContext, *, include_deleted: bool = False) -> list[SharedDomain]:
    where = "" if include_deleted else " WHERE deleted_at IS NULL"
    with ctx.store.lock:
        conn = ctx.store.conn
        rows = conn.execute(f"SELECT {_COLUMNS} FROM domains{where} ORDER BY created_at").fetchall()
        return [_info(conn, r) for r in rows]


def get_domain(ctx: NodeContext, domain_id: str) -> SharedDomain:
    """A live shared domain by id; `DomainDeleted` or `UnknownDomain` otherwise."""
    with ctx.store.lock:
        conn = ctx.store.conn
        row = conn.execute(f"SELECT {_COLUMNS} FROM domains WHERE domain_id = ?",
                           (domain_id,)).fetchone()
        if row is None:
            raise UnknownDomain(f"no shared domain {domain_id!r}")
        if row[4] is not None:
            raise DomainDeleted(
                f"shared domain {domain_id} was deleted at {row[4]}; its key is destroyed")
        return _info(conn, row)


def live_domain(ctx: NodeContext, scenario: str, data_user: str) -> str:
    """The id of the live shared domain of (scenario, data user)."""
    with ctx.store.lock:
        rows = ctx.store.conn.execute(
            "SELECT domain_id, deleted_at FROM domains WHERE scenario = ? AND data_user = ?"
            " ORDER BY deleted_at IS NULL DESC, created_at DESC", (scenario, data_user),
        ).fetchall()
    if not rows:
        raise UnknownDomain(f"no shared domain for {data_user} in scenario {scenario!r}")
    if rows[0][1] is not None:
        raise DomainDeleted(
            f"the shared domain of {data_user} in scenario {scenario!r} was deleted; "
            "its key is destroyed"
        )
    return str(rows[0][0])


def create_domain(ctx: NodeContext, scenario: str, data_user: str) -> SharedDomain:
    """A new shared domain with a fresh k2[d], filled with the tokens of every visit held."""
    users = {n.name for n in ctx.topology.nodes_with_role(Role.INSURER)}
    if data_user not in users:
        raise NotADataUser(f"{data_user!r} is not a data user of this federation ({sorted(users)})")
    domain_id = f"dom-{secrets.token_hex(8)}"
    key_name = domain_key_name(domain_id)
    # The lock keeps ingest out until the shared domain and all its tokens are in place.
    with ctx.store.lock:
        conn = ctx.store.conn
        if conn.execute("SELECT 1 FROM domains WHERE scenario = ? AND data_user = ? AND "
                        "deleted_at IS NULL", (scenario, data_user)).fetchone():
            raise DomainExists(f"{data_user} already has a live shared domain in {scenario!r}")
        key = ctx.secrets.xid_key(key_name, create=True)
        visits = conn.execute("SELECT visit_ref, p1 FROM circ_visits").fetchall()
        with conn:
            conn.execute(
                "INSERT INTO domains (domain_id, scenario, data_user, key_name)"
                " VALUES (?, ?, ?, ?)",
                (domain_id, scenario, data_user, key_name),
            )
            _insert_tokens(conn, domain_id, key, [v[0] for v in visits], [v[1] for v in visits],
                           xid_pool(ctx))
        info = get_domain(ctx, domain_id)
    append_entry(ctx, "domain_created", {
        "domain": domain_id, "scenario": scenario, "data_user": data_user,
        "key_id": key_name, "key_version": key.version, "tokens": info.tokens,
        "persons": info.persons,
    })
    ctx.log.event("domain_created", domain=domain_id, scenario=scenario, data_user=data_user,
                  tokens=info.tokens)
    return info


def delete_domain(ctx: NodeContext, domain_id: str) -> SharedDomain:
    """Crypto-shred a shared domain: destroy k2[d], drop its tokens, rotate the node's KEK
    (so a backup of the store from before does not open under it), log both."""
    info = get_domain(ctx, domain_id)
    with ctx.store.lock:
        conn = ctx.store.conn
        ctx.secrets.destroy_xid_key(domain_key_name(domain_id))
        with conn:
            dropped = conn.execute("DELETE FROM domain_tokens WHERE domain_id = ?",
                                   (domain_id,)).rowcount
            conn.execute("UPDATE domains SET deleted_at = datetime('now') WHERE domain_id = ?",
                         (domain_id,))
        row = conn.execute(f"SELECT {_COLUMNS} FROM domains WHERE domain_id = ?",
                           (domain_id,)).fetchone()
        deleted = _info(conn, row)
    ctx.secrets.rotate_kek()
    ctx.log.event("kek_rotated", reason="key_destroyed", key_id=domain_key_name(domain_id))
    append_entry(ctx, "key_destroyed", {
        "key_id": domain_key_name(domain_id), "domain": domain_id, "purpose": "domain_key",
        "kek": "rotated",
    })
    append_entry(ctx, "domain_deleted", {
        "domain": domain_id, "scenario": info.scenario, "data_user": info.data_user,
        "tokens_dropped": dropped,
    })
    ctx.log.event("domain_deleted", domain=domain_id, tokens_dropped=dropped)
    return deleted


def _insert_tokens(
    conn: sqlite3.Connection, domain_id: str, key: xid.XidKey, refs: Sequence[bytes],
    p1s: Sequence[bytes], pool: xid.WorkerPool | None = None,
) -> None:
    if not refs:
        return
    # One group operation per person, not per visit.
    distinct = list(dict.fromkeys(bytes(p) for p in p1s))
    token_of = dict(zip(distinct, xid.rekey(key, distinct, pool=pool), strict=True))
    conn.executemany(
        "INSERT OR REPLACE INTO domain_tokens (domain_id, visit_ref, token) VALUES (?, ?, ?)",
        [(domain_id, bytes(r), token_of[bytes(p)]) for r, p in zip(refs, p1s, strict=True)],
    )


def index_visits(
    ctx: NodeContext, conn: sqlite3.Connection, refs: Sequence[bytes], p1s: Sequence[bytes]
) -> int:
    """Give visits their token in every live shared domain (inside the caller's transaction).

    Returns the number of live shared domains.
    """
    live = conn.execute(
        "SELECT domain_id FROM domains WHERE deleted_at IS NULL").fetchall()
    for (domain_id,) in live:
        key = ctx.secrets.xid_key(domain_key_name(domain_id))
        _insert_tokens(conn, domain_id, key, refs, p1s, xid_pool(ctx))
    return len(live)


def bump_token_epochs(conn: sqlite3.Connection, domain_id: str | None = None) -> None:
    """Mark the tokens of `domain_id` (of every live shared domain if None) as re-derived."""
    conn.execute(
        "UPDATE domains SET token_epoch = token_epoch + 1 WHERE deleted_at IS NULL"
        " AND (? IS NULL OR domain_id = ?)", (domain_id, domain_id))


def lookup_tokens(
    ctx: NodeContext, domain_id: str, tokens: Sequence[bytes]
) -> dict[bytes, list[bytes]]:
    """token -> the visit_refs it names in shared domain `domain_id` (absent tokens left out)."""
    get_domain(ctx, domain_id)
    found: dict[bytes, list[bytes]] = {}
    with ctx.store.lock:
        for start in range(0, len(tokens), 500):
            part = [bytes(t) for t in tokens[start:start + 500]]
            rows = ctx.store.conn.execute(
                "SELECT token, visit_ref FROM domain_tokens WHERE domain_id = ? AND token IN "
                f"({', '.join('?' * len(part))})", (domain_id, *part),
            ).fetchall()
            for token, ref in rows:
                found.setdefault(bytes(token), []).append(bytes(ref))
    return found
