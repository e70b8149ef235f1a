"""Shared domains as node services: the operator's registry routes, its OPRF step and leak
tracing, and the health authority's level-1 OPRF step.

Data users reach their shared domain's tokens only through the blinded OPRF chain
(`EVALUATE`, called by the regulator with the insurer's signed batch): the operator has
the health authority apply k1 (`LEVEL1_STEP`; k1 never leaves it), then applies k2[d] of
the signing insurer's shared domain. The authority evaluates only insurer-signed batches,
once each, within the insurer's daily id budget (`parties.domains.budget`).
Leak tracing matches leaked tokens against every live shared domain.
"""

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Path

from governance.leak_tracing import trace_leak
from governance.ledger.events import register_event_kind
from mpc import xid
from parties.domains.api import (
    CREATE_DOMAIN,
    DATA_USER_PATTERN,
    DELETE_DOMAIN,
    DOMAIN_ID_PATTERN,
    EVALUATE,
    LEVEL1_STEP,
    LIST_DOMAINS,
    LOOKUP_TOKENS,
    OPRF_BUDGETS,
    RESET_OPRF_BUDGET,
    TRACE_LEAK,
    BlindedPoints,
    DomainError,
    LeakedTokens,
    LeakTrace,
    LookupResult,
    OprfBudget,
    Points,
    SharedDomain,
    SharedDomainAttribution,
    SharedDomainRequest,
    SignedBatch,
    TokenLookup,
)
from parties.domains.batch import insurer_keys, verify_batch
from parties.domains.budget import COMPONENT as BUDGET_COMPONENT
from parties.domains.budget import MIGRATIONS as BUDGET_MIGRATIONS
from parties.domains.budget import admit_batch, list_budgets, reset_budget
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
from parties.runtime.errors import NodeError
from parties.runtime.mount import mount
from parties.runtime.service import Service
from parties.runtime.topology import Role

OPRF_EVALUATED = register_event_kind("oprf_evaluated")

DomainId = Annotated[str, Path(pattern=DOMAIN_ID_PATTERN)]


# --- OPRF: the operator's step, for the insurer that signed the batch -----------------------


def evaluate_signed_batch(ctx: NodeContext, batch: SignedBatch) -> list[bytes]:
    """k2[d]·k1·P for the blinded points of an insurer's signed batch, d being the shared
    domain of the insurer who signed it; k1 applied by the authority, which checks the
    signature again, refuses replays and charges the insurer's daily budget."""
    digest = verify_batch(batch, insurer_keys(ctx))
    domain_id = live_domain(ctx, batch.scenario, batch.data_user)
    key = ctx.secrets.xid_key(domain_key_name(domain_id))
    points = [bytes.fromhex(p) for p in batch.points]
    xid.evaluate_blinded(key, points)  # refuse malformed points before the authority sees them
    authority = ctx.topology.node_of(Role.HEALTH_AUTHORITY)
    with ctx.client() as client:
        stepped = client.call(authority, LEVEL1_STEP, batch)
    if len(stepped.points) != len(points):
        raise DomainError("the health authority returned the wrong number of points")
    result = xid.evaluate_blinded(key, [bytes.fromhex(p) for p in stepped.points])
    append_entry(ctx, OPRF_EVALUATED, {
        "data_user": batch.data_user, "domain": domain_id, "scenario": batch.scenario,
        "points": len(points), "batch_id": batch.batch_id, "batch_digest": digest,
    })
    ctx.log.event("oprf_evaluated", data_user=batch.data_user, domain=domain_id,
                  points=len(points), batch_id=batch.batch_id)
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
    def post_evaluate(body: SignedBatch, caller: Caller) -> Points:
        """Apply k1 (via the health authority) and k2 of the signing insurer's shared domain
        to its signed batch of blinded points, relayed by the regulator."""
        return Points(points=[p.hex() for p in evaluate_signed_batch(ctx, body)])

    return [router]


def _authority_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, LEVEL1_STEP)
    def level1(body: SignedBatch, caller: Caller) -> BlindedPoints:
        """k1·P for an insurer's signed batch of blinded points, relayed by the operator (the
        authority never sees an id).

        Only a batch signed by the insurer it names, alive, never served before and within
        that insurer's daily budget is evaluated; each is recorded and logged (count and
        digest, never points). k1 exists once data was governed; this route never creates
        it, so a refused request leaves no key behind.
        """
        try:
            digest = verify_batch(body, insurer_keys(ctx))
        except DomainError as exc:
            _log_batch_refused(ctx, body, caller.name, exc)
            raise
        points = [bytes.fromhex(p) for p in body.points]
        xid.check_points(points)
        key = ctx.secrets.xid_key(K1_NAME)
        try:
            admit_batch(ctx, body, digest)
        except DomainError as exc:
            _log_batch_refused(ctx, body, caller.name, exc)
            raise
        out = xid.evaluate_blinded(key, points)
        ctx.log.event("oprf_level1", caller=caller.name, data_user=body.data_user,
                      batch_id=body.batch_id, points=len(out), batch_digest=digest)
        return BlindedPoints(points=[p.hex() for p in out])

    @mount(router, OPRF_BUDGETS)
    def get_budgets(caller: Caller) -> list[OprfBudget]:
        """Today's OPRF id budget of every data user."""
        return list_budgets(ctx)

    @mount(router, RESET_OPRF_BUDGET)
    def post_reset(data_user: Annotated[str, Path(pattern=DATA_USER_PATTERN)],
                   caller: Caller) -> OprfBudget:
        """Lift a tripped OPRF budget and zero the data user's count of today (logged)."""
        return reset_budget(ctx, data_user, caller.name)

    return [router]


def _log_batch_refused(ctx: NodeContext, batch: SignedBatch, relay: str,
                       exc: DomainError) -> None:
    """A refused batch is a possible attack by the relay or the insurer: logged here and in
    the federation's log (data user as named, batch id, count; never points)."""
    ctx.log.event("oprf_batch_refused", relay=relay, data_user=batch.data_user,
                  batch_id=batch.batch_id, points=len(batch.points), error=type(exc).__name__)
    try:
        append_entry(ctx, "query_refused", {
            "reason": "oprf_batch_refused", "error": type(exc).__name__, "relay": relay,
            "data_user": batch.data_user, "batch_id": batch.batch_id,
            "points": len(batch.points)})
    except NodeError as failed:  # the refusal stands; the node's own log has it
        ctx.log.event("log_append_failed", kind="query_refused", error=repr(failed))


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
    components=((BUDGET_COMPONENT, BUDGET_MIGRATIONS),),
)
