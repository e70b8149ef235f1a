"""Anonymous shared domains at the operator: one per (scenario, data user), one key each.

A domain d has its own xID key k2[d] (generated, sealed and kept by the node's
`NodeSecrets` under the name `domain:<id>`) and stores, per visit, the domain
token T_d = k2[d]·P1 of the visit's person (`domain_tokens`: token -> visit_ref).
Tokens of two domains are unlinkable without the keys. Deleting a domain
destroys k2[d] (crypto-shredding) and drops its token rows: nothing on that
domain can be answered again and its tokens cannot be recomputed.

Data users reach their domain's tokens only through the blinded OPRF chain
(`POST /v1/oprf/evaluate`, called by the regulator on behalf of an
authenticated insurer): the operator has the health authority apply k1, then
applies k2[d] of the caller's domain. Requests are rate-limited per data user.
Leak tracing matches leaked tokens against every live domain.
"""

import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field

from governance.errors import GovernanceError
from governance.leak_tracing import LeakReport, trace_leak
from governance.ledger.events import register_event_kind
from mpc import xid
from mpc.hazmat.parallel import usable_cores
from parties.runtime.access import Caller, CallerPolicy
from parties.runtime.context import NodeContext
from parties.runtime.service import Service
from parties.runtime.topology import Role
from parties.services.ledger import record_event

SCENARIO_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
DOMAIN_ID_PATTERN = r"^dom-[0-9a-f]{16}$"
MAX_POINTS = 1000
#: default OPRF budget per data user: burst capacity and refill, in ids (points)
DEFAULT_RATE = (20_000, 2_000.0)
RATE_ENV = "COGOV_OPRF_RATE_LIMIT"  # "capacity/refill_per_second", e.g. "5000/500"
OPRF_EVALUATED = register_event_kind("oprf_evaluated")

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
    # Bumped whenever a domain's stored tokens change value (a k1 or k2 rotation).
    "ALTER TABLE domains ADD COLUMN token_epoch INTEGER NOT NULL DEFAULT 1",
)


class DomainError(GovernanceError):
    http_status = 400


class UnknownDomain(DomainError):
    http_status = 404


class DomainDeleted(DomainError):
    """The domain was deleted and its key destroyed: nothing on it can be answered."""

    http_status = 410


class DomainExists(DomainError):
    http_status = 409


class NotADataUser(DomainError):
    """Domains are created for data users (insurer nodes of the topology) only."""

    http_status = 422


class RateLimited(DomainError):
    """The data user exceeded its OPRF budget; retry later."""

    http_status = 429


class DomainInfo(BaseModel):
    domain_id: str
    scenario: str
    data_user: str
    tokens: int
    persons: int
    created_at: str
    deleted_at: str | None


# --- the domain registry ----------------------------------------------------------------


def _info(conn: sqlite3.Connection, row: tuple) -> DomainInfo:
    domain_id, scenario, data_user, created_at, deleted_at = row
    tokens, persons = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT token) FROM domain_tokens WHERE domain_id = ?",
        (domain_id,),
    ).fetchone()
    return DomainInfo(domain_id=domain_id, scenario=scenario, data_user=data_user, tokens=tokens,
                      persons=persons, created_at=created_at, deleted_at=deleted_at)


_COLUMNS = "domain_id, scenario, data_user, created_at, deleted_at"


def list_domains(ctx: NodeContext, *, include_deleted: bool = False) -> list[DomainInfo]:
    where = "" if include_deleted else " WHERE deleted_at IS NULL"
    with ctx.store.lock:
        conn = ctx.store.conn
        rows = conn.execute(f"SELECT {_COLUMNS} FROM domains{where} ORDER BY created_at").fetchall()
        return [_info(conn, r) for r in rows]


def get_domain(ctx: NodeContext, domain_id: str) -> DomainInfo:
    """A live domain by id; `DomainDeleted` or `UnknownDomain` otherwise."""
    with ctx.store.lock:
        conn = ctx.store.conn
        row = conn.execute(f"SELECT {_COLUMNS} FROM domains WHERE domain_id = ?",
                           (domain_id,)).fetchone()
        if row is None:
            raise UnknownDomain(f"no domain {domain_id!r}")
        if row[4] is not None:
            raise DomainDeleted(f"domain {domain_id} was deleted at {row[4]}; its key is destroyed")
        return _info(conn, row)


def live_domain(ctx: NodeContext, scenario: str, data_user: str) -> str:
    """The id of the live domain of (scenario, data user)."""
    with ctx.store.lock:
        rows = ctx.store.conn.execute(
            "SELECT domain_id, deleted_at FROM domains WHERE scenario = ? AND data_user = ?"
            " ORDER BY deleted_at IS NULL DESC, created_at DESC", (scenario, data_user),
        ).fetchall()
    if not rows:
        raise UnknownDomain(f"no domain for {data_user} in scenario {scenario!r}")
    if rows[0][1] is not None:
        raise DomainDeleted(
            f"the domain of {data_user} in scenario {scenario!r} was deleted; its key is destroyed"
        )
    return str(rows[0][0])


def xid_pool(ctx: NodeContext) -> xid.WorkerPool | None:
    """The node's worker processes for bulk group operations (None on one core)."""
    if usable_cores() < 2:
        return None
    return ctx.component(xid.WorkerPool, xid.WorkerPool)


def _key_name(domain_id: str) -> str:
    return f"domain:{domain_id}"


def create_domain(ctx: NodeContext, scenario: str, data_user: str) -> DomainInfo:
    """A new domain with a fresh k2[d], filled with the tokens of every visit held."""
    users = {n.name for n in ctx.topology.nodes_with_role(Role.INSURER)}
    if data_user not in users:
        raise NotADataUser(f"{data_user!r} is not a data user of this federation ({sorted(users)})")
    domain_id = f"dom-{secrets.token_hex(8)}"
    # The lock keeps ingest out until the domain and all its tokens are in place.
    with ctx.store.lock:
        conn = ctx.store.conn
        if conn.execute("SELECT 1 FROM domains WHERE scenario = ? AND data_user = ? AND "
                        "deleted_at IS NULL", (scenario, data_user)).fetchone():
            raise DomainExists(f"{data_user} already has a live domain in {scenario!r}")
        key = ctx.secrets.xid_key(_key_name(domain_id), create=True)
        visits = conn.execute("SELECT visit_ref, p1 FROM circ_visits").fetchall()
        with conn:
            conn.execute(
                "INSERT INTO domains (domain_id, scenario, data_user, key_name)"
                " VALUES (?, ?, ?, ?)",
                (domain_id, scenario, data_user, _key_name(domain_id)),
            )
            _insert_tokens(conn, domain_id, key, [v[0] for v in visits], [v[1] for v in visits],
                           xid_pool(ctx))
        info = get_domain(ctx, domain_id)
    record_event(ctx, "domain_created", {
        "domain": domain_id, "scenario": scenario, "data_user": data_user,
        "key_id": _key_name(domain_id), "key_version": key.version, "tokens": info.tokens,
        "persons": info.persons,
    })
    ctx.log.event("domain_created", domain=domain_id, scenario=scenario, data_user=data_user,
                  tokens=info.tokens)
    return info


def delete_domain(ctx: NodeContext, domain_id: str) -> DomainInfo:
    """Crypto-shred a domain: destroy k2[d], drop its tokens, log both."""
    info = get_domain(ctx, domain_id)
    with ctx.store.lock:
        conn = ctx.store.conn
        ctx.secrets.destroy_xid_key(_key_name(domain_id))
        with conn:
            dropped = conn.execute("DELETE FROM domain_tokens WHERE domain_id = ?",
                                   (domain_id,)).rowcount
            conn.execute("UPDATE domains SET deleted_at = datetime('now') WHERE domain_id = ?",
                         (domain_id,))
        row = conn.execute(f"SELECT {_COLUMNS} FROM domains WHERE domain_id = ?",
                           (domain_id,)).fetchone()
        deleted = _info(conn, row)
    record_event(ctx, "key_destroyed", {
        "key_id": _key_name(domain_id), "domain": domain_id, "purpose": "domain_key",
    })
    record_event(ctx, "domain_deleted", {
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
    """Give visits their token in every live domain (inside the caller's transaction).

    Returns the number of live domains.
    """
    live = conn.execute(
        "SELECT domain_id FROM domains WHERE deleted_at IS NULL").fetchall()
    for (domain_id,) in live:
        key = ctx.secrets.xid_key(_key_name(domain_id))
        _insert_tokens(conn, domain_id, key, refs, p1s, xid_pool(ctx))
    return len(live)


def bump_token_epochs(conn: sqlite3.Connection, domain_id: str | None = None) -> None:
    """Mark the tokens of `domain_id` (of every live domain if None) as re-derived."""
    conn.execute(
        "UPDATE domains SET token_epoch = token_epoch + 1 WHERE deleted_at IS NULL"
        " AND (? IS NULL OR domain_id = ?)", (domain_id, domain_id))


def lookup_tokens(
    ctx: NodeContext, domain_id: str, tokens: Sequence[bytes]
) -> dict[bytes, list[bytes]]:
    """token -> the visit_refs it names in domain `domain_id` (absent tokens are left out)."""
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


# --- OPRF: the operator's step, rate-limited per data user --------------------------------


class TokenBucket:
    """`capacity` ids at once, refilled at `refill` ids per second."""

    def __init__(self, capacity: int, refill: float) -> None:
        self.capacity, self.refill = capacity, refill
        self.level = float(capacity)
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self, cost: int) -> bool:
        with self.lock:
            now = time.monotonic()
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.refill)
            self.stamp = now
            if cost > self.level:
                return False
            self.level -= cost
            return True


def rate_limit() -> tuple[int, float]:
    """(capacity, refill per second) from $COGOV_OPRF_RATE_LIMIT, else the default."""
    raw = os.environ.get(RATE_ENV)
    if not raw:
        return DEFAULT_RATE
    capacity, _, refill = raw.partition("/")
    return int(capacity), float(refill or 0)


class OprfBuckets:
    def __init__(self) -> None:
        self.by_user: dict[str, TokenBucket] = {}


def _bucket(ctx: NodeContext, data_user: str) -> TokenBucket:
    buckets = ctx.component(OprfBuckets, OprfBuckets).by_user
    with ctx.store.lock:
        if data_user not in buckets:
            buckets[data_user] = TokenBucket(*rate_limit())
        return buckets[data_user]


def evaluate_for_data_user(
    ctx: NodeContext, scenario: str, data_user: str, points: Sequence[bytes]
) -> list[bytes]:
    """k2[d]·k1·P for blinded points P of `data_user`'s domain; k1 applied by the authority."""
    domain_id = live_domain(ctx, scenario, data_user)
    if not _bucket(ctx, data_user).take(len(points)):
        record_event(ctx, "query_refused", {
            "reason": "oprf_rate_limited", "data_user": data_user, "domain": domain_id,
            "points": len(points),
        })
        raise RateLimited(f"{data_user} exceeded its OPRF budget ({rate_limit()[0]} ids, "
                          f"{rate_limit()[1]:g} per second)")
    key = ctx.secrets.xid_key(_key_name(domain_id))
    xid.evaluate_blinded(key, points)  # refuse malformed points before the authority sees them
    authority = ctx.topology.nodes_with_role(Role.HEALTH_AUTHORITY)[0].name
    with ctx.client() as client:
        body = client.post(authority, "/v1/oprf/level1", kind="oprf",
                           json={"points": [bytes(p).hex() for p in points]}).json()
    stepped = [bytes.fromhex(p) for p in body["points"]]
    if len(stepped) != len(points):
        raise DomainError("the health authority returned the wrong number of points")
    result = xid.evaluate_blinded(key, stepped)
    record_event(ctx, OPRF_EVALUATED, {
        "data_user": data_user, "domain": domain_id, "scenario": scenario, "points": len(points),
    })
    ctx.log.event("oprf_evaluated", data_user=data_user, domain=domain_id, points=len(points))
    return result


# --- leak tracing ---------------------------------------------------------------------------


class _DomainLookup:
    """A domain's token set as a batch lookup (with its size, for the chance bound)."""

    def __init__(self, ctx: NodeContext, domain_id: str, size: int) -> None:
        self.ctx, self.domain_id, self.size = ctx, domain_id, size

    def __len__(self) -> int:
        return max(1, self.size)

    def __call__(self, tokens: Sequence[bytes]) -> set[bytes]:
        return set(lookup_tokens(self.ctx, self.domain_id, tokens))


class DomainAttribution(BaseModel):
    domain_id: str
    scenario: str
    data_user: str
    matched: int
    share: float
    chance_log10: float


class LeakTrace(BaseModel):
    report: LeakReport
    attributed: list[DomainAttribution]
    summary: str


def trace_leaked_tokens(ctx: NodeContext, tokens: Sequence[str]) -> LeakTrace:
    """Name the domain (and so the data user) leaked domain tokens came from."""
    domains = {d.domain_id: d for d in list_domains(ctx)}
    lookups = {d: _DomainLookup(ctx, d, info.persons) for d, info in domains.items()}
    report = trace_leak(tokens, lookups)
    attributed = [
        DomainAttribution(domain_id=m.domain, scenario=domains[m.domain].scenario,
                          data_user=domains[m.domain].data_user, matched=m.matched,
                          share=m.share, chance_log10=m.chance_log10)
        for m in report.matches if m.domain in report.attributed
    ]
    record_event(ctx, "leak_traced", {
        "leaked": report.leaked, "unparseable": report.unparseable, "unmatched": report.unmatched,
        "domains": [a.domain_id for a in attributed],
        "data_users": [a.data_user for a in attributed],
        "matched": [a.matched for a in attributed],
    })
    text = "; ".join(f"{a.matched} of {report.leaked} ({a.share:.0%}) from domain {a.domain_id} "
                     f"of {a.data_user} ({a.scenario})" for a in attributed)
    return LeakTrace(report=report, attributed=attributed,
                     summary=text or f"none of {report.leaked} tokens matches a live domain")


# --- routes ----------------------------------------------------------------------------------

HexPoint = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]


class DomainRequest(BaseModel):
    scenario: Annotated[str, Field(pattern=SCENARIO_PATTERN)] = "claim_check"
    data_user: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")]


class OprfRequest(BaseModel):
    scenario: Annotated[str, Field(pattern=SCENARIO_PATTERN)] = "claim_check"
    data_user: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
    points: Annotated[list[HexPoint], Field(min_length=1, max_length=MAX_POINTS)]


class Points(BaseModel):
    points: list[str]


class TokenLookup(BaseModel):
    tokens: Annotated[list[HexPoint], Field(min_length=1, max_length=10_000)]


class LookupResult(BaseModel):
    domain_id: str
    matched: int
    visits: int


class LeakedTokens(BaseModel):
    tokens: Annotated[list[Annotated[str, Field(max_length=200)]],
                      Field(min_length=1, max_length=200_000)]


DomainId = Annotated[str, Path(pattern=DOMAIN_ID_PATTERN)]


def _routes(ctx: NodeContext) -> list[APIRouter]:
    domains = APIRouter(prefix="/v1/domains", tags=["domains"])
    admin = CallerPolicy("admin")

    @domains.post("", response_model=DomainInfo)
    def post_domain(body: DomainRequest, caller: Caller = Depends(admin)) -> DomainInfo:
        """Create the anonymous shared domain of (scenario, data user) with a fresh key."""
        return create_domain(ctx, body.scenario, body.data_user)

    @domains.get("", response_model=list[DomainInfo])
    def get_domains(include_deleted: bool = False,
                    caller: Caller = Depends(admin)) -> list[DomainInfo]:
        return list_domains(ctx, include_deleted=include_deleted)

    @domains.delete("/{domain_id}", response_model=DomainInfo)
    def remove_domain(domain_id: DomainId, caller: Caller = Depends(admin)) -> DomainInfo:
        """Destroy the domain's key and tokens (irreversible)."""
        return delete_domain(ctx, domain_id)

    @domains.post("/{domain_id}/lookup", response_model=LookupResult)
    def post_lookup(domain_id: DomainId, body: TokenLookup,
                    caller: Caller = Depends(admin)) -> LookupResult:
        """How many of these domain tokens the domain knows (counts only)."""
        found = lookup_tokens(ctx, domain_id, [bytes.fromhex(t) for t in body.tokens])
        return LookupResult(domain_id=domain_id, matched=len(found),
                            visits=sum(len(v) for v in found.values()))

    @domains.post("/trace-leak", response_model=LeakTrace)
    def post_trace(body: LeakedTokens, caller: Caller = Depends(admin)) -> LeakTrace:
        """Attribute leaked domain tokens (hex or base64) to the domain they came from."""
        return trace_leaked_tokens(ctx, body.tokens)

    oprf = APIRouter(prefix="/v1/oprf", tags=["oprf"])

    @oprf.post("/evaluate", response_model=Points)
    def post_evaluate(
        body: OprfRequest, caller: Caller = Depends(CallerPolicy("oprf", (Role.REGULATOR,)))
    ) -> Points:
        """Apply k1 (via the health authority) and k2 of the data user's domain to blinded points.

        The regulator relays for the insurer it authenticated and names it in `data_user`.
        """
        points = [bytes.fromhex(p) for p in body.points]
        out = evaluate_for_data_user(ctx, body.scenario, body.data_user, points)
        return Points(points=[p.hex() for p in out])

    return [domains, oprf]


OPERATOR_DOMAINS_SERVICE = Service(
    name="domains",
    roles=(Role.OPERATOR,),
    routers=_routes,
    components=((COMPONENT, MIGRATIONS),),
)
