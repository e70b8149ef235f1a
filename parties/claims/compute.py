"""The operator's side of the claim check: it opens the insurer's envelope, checks each
claim's hospital and consent against the person behind its domain token, and evaluates
the batch in the requested mode.

Refusals come in two kinds. Those that depend only on the insurer's input and the
documents (a malformed envelope, a hospital that is not in the topology, a hospital tag
that does not name the sealed token and hospital, a consent not given to this insurer)
keep their names and say what is wrong. Those that depend on the person's records (the
token names nobody in the domain, the consent is not signed by the key delivered for the
person behind the token, the person has more visits at the hospital than the K slots)
are one refusal, `ClaimNotCheckable`, with one message: every claim of the batch is
checked for all three, the candidate slots are planned, and only then is the batch
refused, so neither the answer nor the point at which it comes tells the causes apart.
The causes go to this node's log (`claim_not_checkable`) and refusal record.

What the operator learns: which anonymous rows each claim is checked against (its K
candidate slots, padded with dummies) and the hospital, never a claim value. The rows
come from the insurer's shared-domain table (`parties.claims.tables`); `ss` runs on the
secret-sharing session the operator leads (`parties.claims.sessions`).
"""

import hmac
import time
from typing import Any

import nacl.public
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from governance.consent import Consent, ConsentMismatch
from mpc.claim import CandidateSlots, TooManyCandidates, evaluate_he, evaluate_plain
from mpc.errors import MalformedInput
from parties.claims.api import (
    ANSWER_PURPOSE,
    COMPUTE,
    ENVELOPE_PURPOSE,
    KEEP_HE_CONTEXT,
    ClaimNotCheckable,
    ComputeHead,
    ComputeResult,
    HeContextRegistered,
    UnknownHeContext,
    frame,
    refuse_unknown_hospitals,
    unframe,
)
from parties.claims.checked_claimants import COMPONENT as CHECKED_COMPONENT
from parties.claims.checked_claimants import MIGRATIONS as CHECKED_MIGRATIONS
from parties.claims.checked_claimants import record_checked
from parties.claims.fingerprints import hospital_tag
from parties.claims.sessions import leader_host, session_background
from parties.claims.tables import SharedDomainTable, shared_domain_table
from parties.runtime.access import Caller
from parties.runtime.batches import read_limited_body
from parties.runtime.context import NodeContext
from parties.runtime.mount import mount
from parties.runtime.node_log import current_request_id
from parties.runtime.sealing import open_sealed, seal, sealing_private_key
from parties.runtime.service import Service
from parties.runtime.topology import Role

MAX_BATCH_BYTES = 512 * 1024 * 1024
MAX_HE_CONTEXT_BYTES = 16 * 1024 * 1024


# --- the regulator's HE public context, kept at the operator ------------------------------------

class HeContexts:
    """The regulator's public contexts the operator was handed, parsed once, by digest."""

    def __init__(self) -> None:
        self.by_digest: dict[str, Any] = {}


HE_COMPONENT = "claims_he_contexts"
HE_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE claim_he_contexts (
        insurer TEXT NOT NULL, digest TEXT NOT NULL, context BLOB NOT NULL,
        registered_at TEXT NOT NULL DEFAULT (datetime('now')),
        PRIMARY KEY (insurer, digest)
    )
    """,
    # the key moved from each insurer to the regulator (issue 14): contexts by digest only
    "DROP TABLE claim_he_contexts",
    """
    CREATE TABLE he_public_contexts (
        digest TEXT PRIMARY KEY, context BLOB NOT NULL,
        kept_at TEXT NOT NULL DEFAULT (datetime('now'))
    )
    """,
)


def store_he_context(ctx: NodeContext, data: bytes) -> str:
    from mpc.he import HePublicContext  # TenSEAL: loaded by the operator on its first he query

    public = HePublicContext.from_bytes(data)  # refuses secret keys and other parameters
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute("INSERT OR IGNORE INTO he_public_contexts (digest, context) VALUES (?, ?)",
                     (public.digest, data))
    ctx.component(HeContexts, HeContexts).by_digest[public.digest] = public
    ctx.log.event("he_context_kept", digest=public.digest)
    return public.digest


def he_context(ctx: NodeContext, digest: str) -> Any:
    """The regulator's public context (an `mpc.he.HePublicContext`) by digest, parsed once."""
    from mpc.he import HePublicContext  # TenSEAL: loaded by the operator on its first he query

    cache = ctx.component(HeContexts, HeContexts).by_digest
    found = cache.get(digest)
    if found is None:
        with ctx.store.lock:
            row = ctx.store.conn.execute(
                "SELECT context FROM he_public_contexts WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            raise UnknownHeContext(f"the regulator handed over no HE context {digest[:12]}")
        found = cache[digest] = HePublicContext.from_bytes(bytes(row[0]))
    return found


# --- the operator's evaluation -------------------------------------------------------------


def _sealing_key(ctx: NodeContext) -> nacl.public.PrivateKey:
    return ctx.component(nacl.public.PrivateKey, lambda: sealing_private_key(ctx.signing_key))


def _consent_documents(head: ComputeHead) -> dict[str, Consent]:
    """The forwarded consents, each signed by its subject and given to this insurer, and
    one for every claim (checks on the documents alone)."""
    consents: dict[str, Consent] = {}
    for document in head.consents:
        consent = Consent.parse(document)
        if not consent.signature_valid():
            raise ConsentMismatch(f"consent {consent.consent_id}: bad signature")
        if consent.terms.insurer != head.insurer:
            raise ConsentMismatch(f"consent {consent.consent_id} is not given to {head.insurer}")
        consents[consent.consent_id] = consent
    for i, consent_id in enumerate(head.consent_of_claim):
        if consent_id not in consents:
            raise ConsentMismatch(f"claim {i}: consent {consent_id} was not forwarded")
    return consents


def _check_hospital_tags(head: ComputeHead, tokens: list[bytes], hospitals: list[str]) -> None:
    """Each claim's hospital tag (its check-budget bucket at the regulator) names its own
    token and hospital: an insurer cannot buy a fresh budget by inventing tags."""
    for i, (tag, token, consent_id, hospital) in enumerate(zip(
            head.hospital_tags, tokens, head.consent_of_claim, hospitals, strict=True)):
        if not hmac.compare_digest(tag, hospital_tag(token, consent_id, hospital)):
            raise MalformedInput(f"claim {i}: hospital_tag does not name the claim's token and "
                                 "hospital (parties.claims.fingerprints.hospital_tag)")


def _person_causes(head: ComputeHead, table: SharedDomainTable, tokens: list[bytes],
                   consents: dict[str, Consent]) -> list[dict[str, Any]]:
    """What, about the person behind each claim's token, keeps the claim from being checked:
    no person, or a consent not signed by the key delivered for that person."""
    causes = []
    for i, (token, consent_id) in enumerate(zip(tokens, head.consent_of_claim, strict=True)):
        person = table.person_of_token.get(token)
        delivered = None if person is None else table.key_of_person.get(person)
        signed_by = consents[consent_id].terms.subject.public_key
        if person is None:
            causes.append({"claim": i, "cause": "unknown_token"})
        elif delivered is None or not hmac.compare_digest(delivered.hex(), signed_by):
            causes.append({"claim": i, "cause": "consent_key_mismatch"})
    return causes


def _plan_or_refuse(ctx: NodeContext, head: ComputeHead, table: SharedDomainTable,
                    tokens: list[bytes], hospitals: list[str],
                    causes: list[dict[str, Any]]) -> CandidateSlots:
    """The candidate slots, planned whatever the person checks found; then the uniform
    refusal if anything about a person keeps the batch from being checked."""
    slots = None
    try:
        slots = table.index.plan(list(zip(tokens, hospitals, strict=True)), head.k)
    except TooManyCandidates as exc:  # its message counts the visits: for this log only
        causes = [*causes, {"cause": "too_many_candidates", "detail": str(exc)}]
    if causes:
        ctx.log.event("claim_not_checkable", insurer=head.insurer, causes=causes)
        raise ClaimNotCheckable("; ".join(_cause_text(c) for c in causes))
    assert slots is not None
    return slots


def _cause_text(cause: dict[str, Any]) -> str:
    where = f"claim {cause['claim']}: " if "claim" in cause else ""
    return where + cause["cause"] + (f" ({cause['detail']})" if "detail" in cause else "")


def compute(ctx: NodeContext, head: ComputeHead, envelope: bytes) -> tuple[ComputeResult, bytes]:
    """Open the insurer's envelope, check hospitals and consents, evaluate, seal."""
    rid = current_request_id.get()
    t0 = time.perf_counter()
    sealed_head, payload = open_sealed(_sealing_key(ctx), ENVELOPE_PURPOSE, envelope)
    tokens, hospitals = sealed_head.get("tokens"), sealed_head.get("hospitals")
    if (sealed_head.get("request_id") != rid or sealed_head.get("mode") != head.mode
            or sealed_head.get("k") != head.k or not isinstance(tokens, list)
            or not isinstance(hospitals, list) or len(tokens) != head.n_claims
            or len(hospitals) != head.n_claims or len(head.consent_of_claim) != head.n_claims
            or len(head.hospital_tags) != head.n_claims):
        raise MalformedInput("the envelope does not match this request")
    try:
        token_bytes = [bytes.fromhex(t) for t in tokens]
        reply_key = bytes.fromhex(sealed_head["reply_key"])
    except (ValueError, TypeError, KeyError) as exc:
        raise MalformedInput("malformed token or reply key in the envelope") from exc
    if any(len(t) != 32 for t in token_bytes) or len(reply_key) != 32:
        raise MalformedInput("tokens and the reply key are 32-byte values")
    hospitals = [str(h) for h in hospitals]
    # Before any row is touched: an unknown hospital is a refusal, never "no visit found".
    refuse_unknown_hospitals(ctx.topology, hospitals, [f"claim {i}" for i in range(head.n_claims)])
    _check_hospital_tags(head, token_bytes, hospitals)
    consents = _consent_documents(head)
    if head.mode == "he":  # before any row: the regulator re-delivers a context we lack
        if head.he_context is None:
            raise MalformedInput("he requests name their public context")
        public = he_context(ctx, head.he_context)
    ctx.log.event("claims_compute_started", insurer=head.insurer, mode=head.mode,
                  claims=head.n_claims)
    t1 = time.perf_counter()
    table = shared_domain_table(ctx, head.insurer)
    t2 = time.perf_counter()
    causes = _person_causes(head, table, token_bytes, consents)
    slots = _plan_or_refuse(ctx, head, table, token_bytes, hospitals, causes)
    # Every claim's consent is now bound to its person: these are claimants the insurer
    # really submitted with consent, the only ones a statistic may count.
    record_checked(ctx, head.insurer, table.domain_id,
                   zip(token_bytes, head.consent_of_claim, strict=True))
    started = time.perf_counter()
    he_answer = b""
    if head.mode == "plain":
        answer = evaluate_plain(payload, table.rows, slots)
    elif head.mode == "he":
        # for the regulator, which holds the key; the insurer gets a receipt only
        he_answer = evaluate_he(public, payload, table.rows, slots)
        answer = b""
    else:
        host = leader_host(ctx)
        before = host.traffic()
        answer = host.evaluate(ctx, rid or "", table, payload, slots)
        mpc_bytes = {peer: host.traffic().get(peer, 0) - sent for peer, sent in before.items()}
    compute_ms = round((time.perf_counter() - started) * 1000)
    sealed = seal(reply_key, ANSWER_PURPOSE,
                  {"request_id": rid, "mode": head.mode, "n": head.n_claims}, answer)
    ctx.log.event("claims_computed", insurer=head.insurer, mode=head.mode,
                  claims=head.n_claims, compute_ms=compute_ms, table=table.table_id,
                  envelope_bytes=len(envelope), answer_bytes=len(sealed) + len(he_answer),
                  ms={"open": round((t1 - t0) * 1000, 1), "table": round((t2 - t1) * 1000, 1),
                      "consents_plan": round((started - t2) * 1000, 1),
                      "seal": round((time.perf_counter() - started) * 1000 - compute_ms, 1)},
                  mpc_bytes=mpc_bytes if head.mode == "ss" else {})
    return ComputeResult(records_touched=head.n_claims * head.k, compute_ms=compute_ms,
                         table_id=table.table_id if head.mode == "ss" else None,
                         he_answer_bytes=len(he_answer)), sealed + he_answer


# --- routes ----------------------------------------------------------------------------------


def _operator_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, COMPUTE)
    async def post_compute(request: Request, caller: Caller) -> Response:
        """Evaluate a batch the regulator authorized (binary: ComputeHead + sealed envelope)."""
        body = await read_limited_body(request, MAX_BATCH_BYTES)
        head, envelope = unframe(ComputeHead, body)
        result, answer = await run_in_threadpool(compute, ctx, head, envelope)
        return Response(frame(result, answer), media_type="application/octet-stream")

    @mount(router, KEEP_HE_CONTEXT)
    async def post_he_context(request: Request, caller: Caller) -> HeContextRegistered:
        """Keep the regulator's public TenSEAL context, which he claims are encrypted under."""
        body = await read_limited_body(request, MAX_HE_CONTEXT_BYTES)
        digest = await run_in_threadpool(store_he_context, ctx, body)
        return HeContextRegistered(digest=digest)

    return [router]


OPERATOR_COMPUTE_SERVICE = Service(
    name="claims-compute",
    roles=(Role.OPERATOR,),
    routers=_operator_routes,
    components=((HE_COMPONENT, HE_MIGRATIONS), (CHECKED_COMPONENT, CHECKED_MIGRATIONS)),
    background=session_background(leader_host),
)
