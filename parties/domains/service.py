"""Shared domains as node services: the operator's registry routes, its OPRF step and leak
tracing, and the health authority's level-1 OPRF step.

Data users reach their shared domain's tokens only through the blinded OPRF chain
(`EVALUATE`, called by the regulator with the insurer's signed batch B). Both keys are
applied with RFC 9497 batched DLEQ proofs (`mpc.voprf`) against commitments published in
the log (`parties.domains.commitments`), in this order:

    operator:  Z' = k2[d]·B, proof π2 for (G, K2[d], B, Z')
    authority: checks the insurer's signature on B and π2, then Z = k1·Z', proof π1 for
               (G, K1, Z', Z); once per batch, within the insurer's daily id budget
    insurer:   checks π2 and π1 against the log's K2[d] and K1, then r^-1·Z = T_d(id)

Why k2[d] first. A proof of a k1 step on the insurer's own blinded points B = r·H(id) would
hand the insurer k1·r·H(id), which it unblinds to k1·H(id) = P1, the global level-1
pseudonym that links a person across every insurer's domain. In this order the insurer
sees only k2[d]·B and k1·k2[d]·B: it unblinds k2[d]·H(id) (its own domain's, unlinkable to
another insurer's without the keys) and its token; P1 would need k2[d]^-1 or a
Diffie-Hellman solution for (K2[d], k2[d]·H(id), ...). The authority's check of π2
(soundness of the DLEQ) means Z' = k·B for the k behind the commitment the operator
proved against: any Z' the authority applies k1 to is a known multiple of points an
insurer signed and blinded, so the operator learns only k1·k·r·H(id), blinded by an r it
does not know, and can no longer have k1 applied to H(guess). The operator is trusted to
prove against its published K2[d] only towards the insurer, who checks it.

Leak tracing matches leaked tokens against every live shared domain.
"""

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Path

from governance.leak_tracing import trace_leak
from governance.ledger.events import register_event_kind
from mpc import voprf, xid
from mpc.errors import MalformedInput
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
    DomainError,
    EvaluatedBatch,
    LeakedTokens,
    LeakTrace,
    Level1Request,
    LookupResult,
    OprfBudget,
    OprfProofInvalid,
    ProvenStep,
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
from parties.domains.commitments import COMPONENT as COMMITMENTS_COMPONENT
from parties.domains.commitments import MIGRATIONS as COMMITMENTS_MIGRATIONS
from parties.domains.commitments import publish_commitment
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


def proven_step(key: xid.XidKey, points: list[bytes]) -> ProvenStep:
    """k·P for every point with its DLEQ proof, as a step of the chain."""
    out, proof = xid.evaluate_proven(key, points)
    return ProvenStep(key_id=key.key_id, key_version=key.version,
                      points=[p.hex() for p in out], proof=proof.hex())


def evaluate_signed_batch(ctx: NodeContext, batch: SignedBatch) -> EvaluatedBatch:
    """Z' = k2[d]·B and Z = k1·Z' with their proofs for the blinded points B of an insurer's
    signed batch, d being the shared domain of the insurer who signed it; k1 applied by the
    authority, which checks the signature and π2, refuses replays and charges the insurer's
    daily budget."""
    digest = verify_batch(batch, insurer_keys(ctx))
    domain_id = live_domain(ctx, batch.scenario, batch.data_user)
    key = ctx.secrets.xid_key(domain_key_name(domain_id))
    committed = publish_commitment(ctx, key, domain=domain_id, scenario=batch.scenario,
                                   data_user=batch.data_user)
    domain_step = proven_step(key, [bytes.fromhex(p) for p in batch.points])
    authority = ctx.topology.node_of(Role.HEALTH_AUTHORITY)
    with ctx.client() as client:
        level1_step = client.call(authority, LEVEL1_STEP, Level1Request(
            batch=batch, domain_step=domain_step, domain_commitment=committed.hex()))
    if len(level1_step.points) != len(batch.points):
        raise DomainError("the health authority returned the wrong number of points")
    append_entry(ctx, OPRF_EVALUATED, {
        "data_user": batch.data_user, "domain": domain_id, "scenario": batch.scenario,
        "points": len(batch.points), "batch_id": batch.batch_id, "batch_digest": digest,
    })
    ctx.log.event("oprf_evaluated", data_user=batch.data_user, domain=domain_id,
                  points=len(batch.points), batch_id=batch.batch_id)
    return EvaluatedBatch(domain_step=domain_step, level1_step=level1_step)


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
        """Create the shared domain of (scenario, data user) with a fresh key, whose
        commitment k2[d]·G is published in the log."""
        created = create_domain(ctx, body.scenario, body.data_user)
        publish_commitment(ctx, ctx.secrets.xid_key(domain_key_name(created.domain_id)),
                           domain=created.domain_id, scenario=created.scenario,
                           data_user=created.data_user)
        return created

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
    def post_evaluate(body: SignedBatch, caller: Caller) -> EvaluatedBatch:
        """Apply k2 of the signing insurer's shared domain, then k1 (via the health
        authority), each with its proof, to its signed batch of blinded points, relayed by
        the regulator."""
        return evaluate_signed_batch(ctx, body)

    return [router]


def _authority_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, LEVEL1_STEP)
    def level1(body: Level1Request, caller: Caller) -> ProvenStep:
        """Z = k1·Z' with its proof, for the operator's proven step Z' = k2[d]·B on an
        insurer's signed batch B, relayed by the operator (the authority never sees an id).

        Only a batch signed by the insurer it names, alive, never served before and within
        that insurer's daily budget is evaluated, and only when the operator's proof shows
        Z' to be k·B for the k of the commitment it names; each is recorded and logged
        (count and digest, never points). k1 exists once data was governed; this route
        never creates it, so a refused request leaves no key behind.
        """
        batch = body.batch
        try:
            digest = verify_batch(batch, insurer_keys(ctx))
            stepped = _proven_domain_step(body)
        except (DomainError, MalformedInput) as exc:
            _log_batch_refused(ctx, batch, caller.name, exc)
            raise
        key = ctx.secrets.xid_key(K1_NAME)
        publish_commitment(ctx, key)
        try:
            admit_batch(ctx, batch, digest)
        except DomainError as exc:
            _log_batch_refused(ctx, batch, caller.name, exc)
            raise
        out = proven_step(key, stepped)
        ctx.log.event("oprf_level1", caller=caller.name, data_user=batch.data_user,
                      batch_id=batch.batch_id, points=len(out.points), batch_digest=digest)
        return out

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


def _proven_domain_step(body: Level1Request) -> list[bytes]:
    """Z' of the operator's step, once its proof shows Z' = k·B for the insurer's signed B
    (malformed points raise `MalformedInput`, a failed proof `OprfProofInvalid`)."""
    blinded = [bytes.fromhex(p) for p in body.batch.points]
    stepped = [bytes.fromhex(p) for p in body.domain_step.points]
    xid.check_points(stepped)
    if len(stepped) != len(blinded) or not voprf.verify_hop(
            bytes.fromhex(body.domain_commitment), blinded, stepped,
            bytes.fromhex(body.domain_step.proof)):
        raise OprfProofInvalid(
            f"batch {body.batch.batch_id}: the operator's step is not proven on the signed points")
    return stepped


def _log_batch_refused(ctx: NodeContext, batch: SignedBatch, relay: str,
                       exc: DomainError | MalformedInput) -> None:
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
    components=((COMPONENT, MIGRATIONS), (COMMITMENTS_COMPONENT, COMMITMENTS_MIGRATIONS)),
)

AUTHORITY_LEVEL1_OPRF_SERVICE = Service(
    name="level1-oprf",
    roles=(Role.HEALTH_AUTHORITY,),
    routers=_authority_routes,
    components=((BUDGET_COMPONENT, BUDGET_MIGRATIONS),
                (COMMITMENTS_COMPONENT, COMMITMENTS_MIGRATIONS)),
)
