"""Shared domains as node services: the operator's registry routes, its OPRF step and leak
tracing, and the health authority's level-1 OPRF step.

Data users reach their shared domain's tokens only through the blinded OPRF chain
(`EVALUATE`, called by the regulator on behalf of an authenticated insurer): the
operator has the health authority apply k1 (`LEVEL1_STEP`; k1 never leaves it), then
applies k2[d] of the caller's shared domain. Requests are rate-limited per data user.
Leak tracing matches leaked tokens against every live shared domain.
"""

import os
import threading
import time
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Path

from governance.leak_tracing import trace_leak
from governance.ledger.events import register_event_kind
from mpc import xid
from mpc.errors import MalformedInput
from parties.domains.api import (
    CREATE_DOMAIN,
    DELETE_DOMAIN,
    DOMAIN_ID_PATTERN,
    EVALUATE,
    LEVEL1_STEP,
    LIST_DOMAINS,
    LOOKUP_TOKENS,
    TRACE_LEAK,
    BlindedPoints,
    DomainError,
    LeakedTokens,
    LeakTrace,
    LookupResult,
    OprfRequest,
    Points,
    RateLimited,
    SharedDomain,
    SharedDomainAttribution,
    SharedDomainRequest,
    TokenLookup,
)
from parties.domains.keys import K1_NAME, domain_key_name
from parties.domains.registry import (
    COMPONENT,
    MIGRATIONS,
    create_domain,
    delete_domain,
    list_domains,
    live_domain,
    lookup_tokens,
)
from parties.ledger.client import append_entry
from parties.runtime.access import Caller
from parties.runtime.context import NodeContext
from parties.runtime.mount import mount
from parties.runtime.service import Service
from parties.runtime.topology import Role

#: default OPRF budget per data user: burst capacity and refill, in ids (points)
DEFAULT_RATE = (20_000, 2_000.0)
RATE_ENV = "COGOV_OPRF_RATE_LIMIT"  # "capacity/refill_per_second", e.g. "5000/500"
OPRF_EVALUATED = register_event_kind("oprf_evaluated")

DomainId = Annotated[str, Path(pattern=DOMAIN_ID_PATTERN)]


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
    """k2[d]·k1·P for blinded points P of `data_user`'s shared domain; k1 applied by the
    authority."""
    domain_id = live_domain(ctx, scenario, data_user)
    if not _bucket(ctx, data_user).take(len(points)):
        append_entry(ctx, "query_refused", {
            "reason": "oprf_rate_limited", "data_user": data_user, "domain": domain_id,
            "points": len(points),
        })
        raise RateLimited(f"{data_user} exceeded its OPRF budget ({rate_limit()[0]} ids, "
                          f"{rate_limit()[1]:g} per second)")
    key = ctx.secrets.xid_key(domain_key_name(domain_id))
    xid.evaluate_blinded(key, points)  # refuse malformed points before the authority sees them
    authority = ctx.topology.node_of(Role.HEALTH_AUTHORITY)
    with ctx.client() as client:
        stepped = client.call(authority, LEVEL1_STEP,
                              BlindedPoints(points=[bytes(p).hex() for p in points]))
    if len(stepped.points) != len(points):
        raise DomainError("the health authority returned the wrong number of points")
    result = xid.evaluate_blinded(key, [bytes.fromhex(p) for p in stepped.points])
    append_entry(ctx, OPRF_EVALUATED, {
        "data_user": data_user, "domain": domain_id, "scenario": scenario, "points": len(points),
    })
    ctx.log.event("oprf_evaluated", data_user=data_user, domain=domain_id, points=len(points))
    return result


# --- leak tracing ---------------------------------------------------------------------------


class _DomainLookup:
    """A shared domain's token set as a batch lookup (with its size, for the chance bound)."""

    def __init__(self, ctx: NodeContext, domain_id: str, size: int) -> None:
        self.ctx, self.domain_id, self.size = ctx, domain_id, size

    def __len__(self) -> int:
        return max(1, self.size)

    def __call__(self, tokens: Sequence[bytes]) -> set[bytes]:
        return set(lookup_tokens(self.ctx, self.domain_id, tokens))


def trace_leaked_tokens(ctx: NodeContext, tokens: Sequence[str]) -> LeakTrace:
    """Name the shared domain (and so the data user) leaked tokens came from."""
    domains = {d.domain_id: d for d in list_domains(ctx)}
    lookups = {d: _DomainLookup(ctx, d, info.persons) for d, info in domains.items()}
    report = trace_leak(tokens, lookups)
    attributed = [
        SharedDomainAttribution(domain_id=m.domain, scenario=domains[m.domain].scenario,
                          data_user=domains[m.domain].data_user, matched=m.matched,
                          share=m.share, chance_log10=m.chance_log10)
        for m in report.matches if m.domain in report.attributed
    ]
    append_entry(ctx, "leak_traced", {
        "leaked": report.leaked, "unparseable": report.unparseable, "unmatched": report.unmatched,
        "domains": [a.domain_id for a in attributed],
        "data_users": [a.data_user for a in attributed],
        "matched": [a.matched for a in attributed],
    })
    text = "; ".join(f"{a.matched} of {report.leaked} ({a.share:.0%}) from shared domain "
                     f"{a.domain_id} of {a.data_user} ({a.scenario})" for a in attributed)
    return LeakTrace(report=report, attributed=attributed,
                     summary=text or f"none of {report.leaked} tokens matches a live shared domain")


# --- routes ----------------------------------------------------------------------------------


def _operator_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, CREATE_DOMAIN)
    def post_domain(body: SharedDomainRequest, caller: Caller) -> SharedDomain:
        """Create the shared domain of (scenario, data user) with a fresh key."""
        return create_domain(ctx, body.scenario, body.data_user)

    @mount(router, LIST_DOMAINS)
    def get_domains(caller: Caller, include_deleted: bool = False) -> list[SharedDomain]:
        return list_domains(ctx, include_deleted=include_deleted)

    @mount(router, DELETE_DOMAIN)
    def remove_domain(domain_id: DomainId, caller: Caller) -> SharedDomain:
        """Destroy the shared domain's key and tokens (irreversible)."""
        return delete_domain(ctx, domain_id)

    @mount(router, LOOKUP_TOKENS)
    def post_lookup(domain_id: DomainId, body: TokenLookup, caller: Caller) -> LookupResult:
        """How many of these tokens the shared domain knows (counts only)."""
        found = lookup_tokens(ctx, domain_id, [bytes.fromhex(t) for t in body.tokens])
        return LookupResult(domain_id=domain_id, matched=len(found),
                            visits=sum(len(v) for v in found.values()))

    @mount(router, TRACE_LEAK)
    def post_trace(body: LeakedTokens, caller: Caller) -> LeakTrace:
        """Attribute leaked tokens (hex or base64) to the shared domain they came from."""
        return trace_leaked_tokens(ctx, body.tokens)

    @mount(router, EVALUATE)
    def post_evaluate(body: OprfRequest, caller: Caller) -> Points:
        """Apply k1 (via the health authority) and k2 of the data user's shared domain to
        blinded points.

        The regulator relays for the insurer it authenticated and names it in `data_user`.
        """
        points = [bytes.fromhex(p) for p in body.points]
        out = evaluate_for_data_user(ctx, body.scenario, body.data_user, points)
        return Points(points=[p.hex() for p in out])

    return [router]


def _authority_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, LEVEL1_STEP)
    def level1(body: BlindedPoints, caller: Caller) -> BlindedPoints:
        """k1·P for blinded points relayed by the operator (the authority never sees an id).

        k1 exists once data was governed; this route never creates it, so a refused
        request leaves no key behind.
        """
        try:
            points = [bytes.fromhex(p) for p in body.points]
        except ValueError as exc:
            raise MalformedInput(f"points must be hex: {exc}") from None
        xid.check_points(points)
        out = xid.evaluate_blinded(ctx.secrets.xid_key(K1_NAME), points)
        ctx.log.event("oprf_level1", caller=caller.name, points=len(out))
        return BlindedPoints(points=[p.hex() for p in out])

    return [router]


OPERATOR_DOMAINS_SERVICE = Service(
    name="domains",
    roles=(Role.OPERATOR,),
    routers=_operator_routes,
    components=((COMPONENT, MIGRATIONS),),
)

AUTHORITY_LEVEL1_OPRF_SERVICE = Service(
    name="level1-oprf",
    roles=(Role.HEALTH_AUTHORITY,),
    routers=_authority_routes,
)
