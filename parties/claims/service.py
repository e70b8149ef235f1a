"""The fast-claim check, served by the regulator to insurers.

An insurer asks whether a claim holds against the anonymized hospital records and
gets the verdict and nothing else. The product route (`api.CHECK`, kind `claim`)
enforces, before any data is touched, in this order: the mode is served under the
contract; the contract is live and the query fits its quota (`ContractBook.authorize`,
which reserves it); every claim's consent is registered, unrevoked, unexpired, given to
this insurer for the contract's purpose and scope. Those refusals depend on the documents
and the insurer's own input alone and keep their names. This node sees no national id and
no token, so it does not check the person: the consent's key is its binding to the
person, checked by the operator (below; `governance.consent`). Then:

- a question answered before (`fingerprints.check_key`) gets the stored answer: nothing is
  computed, charged or billed (`request_book`);
- otherwise each claim spends one check of its consent's budget at its hospital
  (`check_budget`; `CheckBudgetSpent`, 429, when spent), refused or not from here on.

Only then does it ask the operator to compute (`api.COMPUTE`, kind `product`); the
operator checks, per claim, that the hospital is one of the topology's, that the hospital
tag names the sealed token and hospital, and then (uniform refusal again) that the token
names a person, that the consent's key is the key the health authority delivered for that
person, and that the person's visits at the hospital fit the K slots
(`parties.claims.compute`).

What travels where (per mode; see `compute` and `sessions` for the computing side):

- the insurer seals to the operator's X25519 key (derived from its CA-certified
  Ed25519 signing key) an envelope: the claims' domain tokens and hospitals, the
  operator's part of the encoded claims and a fresh reply key. The regulator relays
  it unopened, so it never sees tokens, hospitals or claim values;
- `ss`: the insurer also sends the regulator its own additive share of the claims;
  the operator (leader) and the regulator (follower) evaluate the verdict circuit
  on shares, the health authority dealing the correlated randomness; each answers
  its result share, the operator's sealed to the insurer's reply key;
- `he`: the operator part is the claims encrypted under the regulator's public TenSEAL
  context (`mpc.he`); the operator answers masked tests for the regulator, which
  decrypts them (`he_verdicts`) and answers the insurer three verdict bits per claim;
- `plain`: the reference, readable by the operator; refused unless the contract
  lists `mode.plain` in its allowed outputs.

The response carries only the answers; the insurer adds the two shares (or
reads the bits) and finishes the verdict with its own policy (covered categories,
deductible). The insurer signs every request with its node key
(`X-Cogov-Request-Signature` over `api.signed_request`; refused unsigned with
`RequestSignatureInvalid`), and every answered request is metered once
(`query_answered`, keyed by the request's log id and carrying that signature, so the
bill counts it: `governance.meters`; a retry with the same id and the same body returns
the stored answer and is not billed again; `parties.claims.request_book`). The meter is
committed to the log before the answer leaves (`log_before_release`): if the log cannot
take it the answer is withheld (`AnswerNotLogged`, 503), nothing is billed and the quota
is given back. Every refusal is logged (`query_refused`, with the refusal's name: never
the cause of a uniform one; deferred while the log is down, `parties.ledger.deferred`).
The operator's typed refusals reach the insurer unchanged.
"""

import base64
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import Response

from governance.consent import ConsentError, ConsentMissing
from governance.contracts import ContractError, ContractTerms
from governance.errors import GovernanceError
from governance.ledger import SignedEntry
from governance.ledger.proofs import ProofBundle, Receipt
from governance.meters import meter_fields, request_signature_valid
from mpc.claim.constants import CLAIM_SCENARIO, RECORD_COLUMNS, VERDICT_OUTPUTS
from mpc.errors import MalformedInput, MpcError
from parties.agreements.books import consent_registry, contract_book
from parties.claims.api import (
    CHECK,
    COMPUTE,
    HE_PUBLIC_CONTEXT,
    KEEP_HE_CONTEXT,
    OPERATOR_CERTIFICATE,
    REQUEST_SIGNATURE_HEADER,
    AnswerNotLogged,
    ClaimCheckRequest,
    ClaimCheckResponse,
    ClaimRefused,
    ComputeFailed,
    ComputeHead,
    ComputeResult,
    ComputeUnavailable,
    HeContext,
    ModeNotAllowed,
    OperatorCertificate,
    RequestSignatureInvalid,
    UnknownHeContext,
    body_digest,
    frame,
    signed_request,
    unframe,
)
from parties.claims.check_budget import COMPONENT as BUDGET_COMPONENT
from parties.claims.check_budget import MIGRATIONS as BUDGET_MIGRATIONS
from parties.claims.check_budget import check_budget
from parties.claims.fingerprints import check_key
from parties.claims.he_key import COMPONENT as HE_KEY_COMPONENT
from parties.claims.he_key import MIGRATIONS as HE_KEY_MIGRATIONS
from parties.claims.he_key import regulator_he_key
from parties.claims.peers import node_client, operator_node
from parties.claims.request_book import COMPONENT, MIGRATIONS, request_book
from parties.claims.sessions import follower_host
from parties.ledger.client import append_signed, receipt_of, signed_entry
from parties.ledger.deferred import COMPONENT as DEFERRED_COMPONENT
from parties.ledger.deferred import MIGRATIONS as DEFERRED_MIGRATIONS
from parties.ledger.deferred import (
    append_or_defer,
    complete_deferred_forever,
    defer,
    log_unavailable,
)
from parties.ledger.incidents import refuse_under_incident
from parties.runtime.access import Caller
from parties.runtime.context import NodeContext
from parties.runtime.errors import NodeUnavailable, RemoteError
from parties.runtime.mount import mount
from parties.runtime.node_log import current_request_id
from parties.runtime.service import Service
from parties.runtime.topology import Role

DEFAULT_MODES = ("ss", "he")  # plain is the oracle: served only when the contract lists it
MODE_OUTPUT_PREFIX = "mode."  # e.g. allowed_outputs = [..., "mode.plain"]
OCTET_STREAM = {"Content-Type": "application/octet-stream"}
# How long an answer waits for the log to take its meter before it is withheld.
LOG_BEFORE_RELEASE_S = 5.0


# --- enforcement -------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def served_modes(terms: ContractTerms) -> tuple[str, ...]:
    """The modes a contract serves: those listed as `mode.<name>` outputs, else ss and he."""
    listed = tuple(o.removeprefix(MODE_OUTPUT_PREFIX) for o in terms.allowed_outputs
                   if o.startswith(MODE_OUTPUT_PREFIX))
    return listed or DEFAULT_MODES


def enforce(ctx: NodeContext, insurer: str, body: ClaimCheckRequest, rid: str) -> tuple[
        ContractTerms, int, list[dict[str, Any]]]:
    """The rules on the documents and the insurer's input; returns (terms, usage id,
    consent documents).

    Raises the typed refusal (contract, consent, quota, mode); on a refusal after the
    quota was reserved the caller releases it.
    """
    book = contract_book(ctx)
    terms = book.get(body.contract_id).terms
    if body.mode not in served_modes(terms):
        raise ModeNotAllowed(
            f"contract {body.contract_id} does not serve mode {body.mode!r} "
            f"(served: {', '.join(served_modes(terms))})")
    if body.mode == "ss" and body.regulator_share is None:
        raise MalformedInput("ss requests carry the regulator's share of the claims")
    if body.mode == "he" and body.he_context != regulator_he_key(ctx).key().public.digest:
        raise UnknownHeContext("he claims must be encrypted under the regulator's public "
                               "context (GET it from the regulator)")
    ids = [c.claim_id for c in body.claims]
    if len(set(ids)) != len(ids):
        raise MalformedInput("duplicate claim_id in the batch")
    outputs = [*VERDICT_OUTPUTS]
    authorization = book.authorize(body.contract_id, insurer, RECORD_COLUMNS, outputs, _now(),
                                   len(body.claims), request_id=rid)
    request_book(ctx).reserved(rid, authorization.usage_id)
    registry = consent_registry(ctx)
    now = _now()
    documents: dict[str, dict[str, Any]] = {}
    for claim in body.claims:
        if claim.consent_id not in documents:
            consent = registry.get(claim.consent_id)
            if consent is None:
                raise ConsentMissing(f"consent {claim.consent_id} is not registered")
            registry.check(consent, insurer, terms.purpose, now, scenario=terms.scenario,
                           columns=RECORD_COLUMNS, outputs=outputs)
            documents[claim.consent_id] = consent.model_dump(mode="json")
    return terms, authorization.usage_id, list(documents.values())


# --- the orchestration ---------------------------------------------------------------------


def compute_at_operator(
    ctx: NodeContext, insurer: str, body: ClaimCheckRequest, consents: list[dict[str, Any]]
) -> tuple[ComputeResult, bytes]:
    head = ComputeHead(
        contract_id=body.contract_id, insurer=insurer, mode=body.mode, k=body.k,
        n_claims=len(body.claims), consent_of_claim=[c.consent_id for c in body.claims],
        consents=consents, he_context=body.he_context,
        hospital_tags=[c.hospital_tag for c in body.claims],
    )
    def call() -> bytes:
        return node_client(ctx).call(operator_node(ctx), COMPUTE, content=frame(
            head, body.operator_envelope), headers=OCTET_STREAM)

    try:
        if body.mode != "he":
            answer = call()
        else:
            deliver_he_context(ctx)
            try:
                answer = call()
            except UnknownHeContext:  # the operator lost its copy (a rebuilt store): once more
                regulator_he_key(ctx).delivered_to.discard(operator_node(ctx))
                deliver_he_context(ctx)
                answer = call()
    except NodeUnavailable as exc:
        raise ComputeUnavailable(f"{exc}; nothing was billed, retry with the same request id"
                                 ) from None
    except RemoteError as exc:
        if type(exc) is not RemoteError:  # a typed refusal or failure: the insurer gets it
            raise
        raise ComputeFailed(f"operator: {exc.error} ({exc.http_status}): {exc.detail}; "
                            "nothing was billed") from None
    return unframe(ComputeResult, answer)


def he_verdicts(ctx: NodeContext, result: ComputeResult, answer: bytes, n: int, k: int
                ) -> tuple[bytes, bytes]:
    """(the operator's sealed receipt, the verdict bits for the insurer): the operator's masked
    tests, which follow its receipt, decrypted with this node's key."""
    from mpc.claim import he_verdict_payload  # TenSEAL: loaded by the regulator in he only

    split = len(answer) - result.he_answer_bytes
    if result.he_answer_bytes <= 0 or split < 0:
        raise ComputeFailed("operator: an he answer without its ciphertexts; nothing was billed")
    try:
        bits = he_verdict_payload(regulator_he_key(ctx).key(), answer[split:], n, k)
    except MpcError as exc:
        raise ComputeFailed(f"operator: unreadable he answer ({exc}); nothing was billed"
                            ) from None
    return answer[:split], bits


def deliver_he_context(ctx: NodeContext) -> None:
    """Hand the operator this node's public context once per operator and process."""
    holder = regulator_he_key(ctx)
    operator = operator_node(ctx)
    if operator in holder.delivered_to:
        return
    node_client(ctx).call(operator, KEEP_HE_CONTEXT, content=holder.key().public.data,
                          headers=OCTET_STREAM)
    holder.delivered_to.add(operator)


def check_signature(ctx: NodeContext, rid: str, insurer: str, body: ClaimCheckRequest,
                    signature: str | None) -> None:
    """Serve only requests the insurer signed with its node key: the meter carries it."""
    if signature is None or not request_signature_valid(
            ctx.signing_public_keys()[insurer], signed_request(rid, insurer, body), signature):
        raise RequestSignatureInvalid(
            f"sign the request with {insurer}'s node key ({REQUEST_SIGNATURE_HEADER})")


def check_claims(ctx: NodeContext, insurer: str, body: ClaimCheckRequest,
                 signature: str | None) -> bytes:
    """Check the insurer's signature, enforce, compute, meter once; the JSON of the
    `ClaimCheckResponse`."""
    rid = current_request_id.get() or ""
    refuse_under_incident(ctx)  # before any state: a log under incident answers nothing
    check_signature(ctx, rid, insurer, body, signature)
    assert signature is not None
    book = request_book(ctx)
    t0 = time.perf_counter()
    digest = body_digest(body)
    state, stored = book.begin(rid, insurer, body.contract_id, digest, body.mode,
                               len(body.claims))
    if state == "answered":
        assert stored is not None
        ctx.log.event("claims_replayed", insurer=insurer, claims=len(body.claims))
        return stored
    ctx.log.event("claims_received", insurer=insurer, mode=body.mode, claims=len(body.claims),
                  contract=body.contract_id)
    status = "failed"
    try:
        try:
            t1 = time.perf_counter()
            terms, _usage, consents = enforce(ctx, insurer, body, rid)
            question = check_key(body.contract_id, body.mode, body.k, body.he_context,
                                 body.claims)
            stored = book.stored_check(insurer, question)
            if stored is not None:
                book.deduplicated(rid, stored[0])
                status = "answered"
                ctx.log.event("claims_deduplicated", insurer=insurer, claims=len(body.claims),
                              answered_by=stored[0])
                return stored[1]
            spent = check_budget(ctx).spend(rid, body.contract_id, insurer, body.claims,
                                            terms.quota.checks_per_consent_per_day,
                                            _now().date())
            ctx.log.event("check_budget_spent", insurer=insurer, claims=len(body.claims),
                          buckets=len(spent), fullest=max(spent.values()),
                          limit=terms.quota.checks_per_consent_per_day)
        except (ContractError, ConsentError, ClaimRefused, MpcError) as exc:
            status = "refused"
            _refused(ctx, insurer, body, exc)
            raise
        started = time.perf_counter()
        follower = follower_host(ctx) if body.mode == "ss" else None
        if follower is not None:
            assert body.regulator_share is not None
            follower.expect(rid, body.regulator_share)
        try:
            try:
                result, answer = compute_at_operator(ctx, insurer, body, consents)
            except (GovernanceError, ClaimRefused, MpcError) as exc:
                if exc.http_status < 500:  # refused by the operator (token, hospital, consent)
                    status = "refused"
                    _refused(ctx, insurer, body, exc)
                raise
            regulator_answer = None
            if follower is not None:
                regulator_answer = follower.result(rid)
            elif body.mode == "he":
                answer, regulator_answer = he_verdicts(ctx, result, answer, len(body.claims),
                                                       body.k)
        finally:
            if follower is not None:
                follower.forget(rid)
        compute_ms = round((time.perf_counter() - started) * 1000)
        meter = {
            "contract_id": body.contract_id, "party": insurer,
            "records_touched": result.records_touched, "rows_returned": len(body.claims),
            "compute_ms": compute_ms, "mode": body.mode, "claims": len(body.claims),
            "scenario": terms.scenario,
            **meter_fields(CHECK.method, CHECK.path, digest, signature),
        }
        t2 = time.perf_counter()
        logged = log_before_release(ctx, rid, meter)
        response = ClaimCheckResponse(
            request_id=rid, mode=body.mode, claim_ids=[c.claim_id for c in body.claims],
            operator_answer=base64.b64encode(answer),
            regulator_answer=None if regulator_answer is None else base64.b64encode(
                regulator_answer),
            log_entry=logged.entry,
            receipt=Receipt(**logged.model_dump(exclude={"entry"})),
        ).model_dump_json().encode()
        book.answered(rid, response, question)
        status = "answered"
    finally:
        if status != "answered":
            book.failed(rid, status)
    ms = {"book": (t1 - t0) * 1000, "enforce": (started - t1) * 1000, "compute": compute_ms,
          "log": (time.perf_counter() - t2) * 1000}
    ctx.log.event("claims_answered", insurer=insurer, mode=body.mode, claims=len(body.claims),
                  records_touched=result.records_touched,
                  ms={k: round(v, 1) for k, v in ms.items()})
    return response


def log_before_release(ctx: NodeContext, rid: str, meter: dict[str, Any]) -> ProofBundle:
    """Commit the answer's meter (`query_answered`) to the log before the answer leaves;
    the entry as stored, with its receipt for the answer to carry.

    When the log cannot take it (or give its receipt) within `LOG_BEFORE_RELEASE_S` the
    answer is withheld (`AnswerNotLogged`; the caller gives back the quota): nothing left,
    so nothing is billed, and a `query_withheld` entry (deferred until the log takes it)
    voids the meter in case the slow append was committed after all.
    """
    entry = signed_entry(ctx, "query_answered", meter)
    request_book(ctx).metering(rid, entry.model_dump_json())
    try:
        append_signed(ctx, entry, timeout=LOG_BEFORE_RELEASE_S)
        return receipt_of(ctx, entry, timeout=LOG_BEFORE_RELEASE_S)
    except Exception as exc:
        if not log_unavailable(exc):
            raise
        withhold(ctx, entry, type(exc).__name__)
        ctx.log.event("answer_withheld", error=type(exc).__name__, detail=str(exc))
        raise AnswerNotLogged("the log did not take the answer's entry: the answer was "
                              "withheld, nothing is billed and the quota is given back; "
                              "retry with the same request id") from None


def withhold(ctx: NodeContext, meter: SignedEntry, reason: str) -> None:
    """Defer the entry that voids a meter whose answer never left this node."""
    payload = meter.event.payload
    token = current_request_id.set(meter.event.request_id)
    try:
        defer(ctx, signed_entry(ctx, "query_withheld", {
            "contract_id": payload["contract_id"], "party": payload["party"],
            "meter_signature": meter.signature, "reason": reason,
            "scenario": payload["scenario"]}), reason)
    finally:
        current_request_id.reset(token)


def _refused(ctx: NodeContext, insurer: str, body: ClaimCheckRequest, exc: Exception) -> None:
    try:
        append_or_defer(ctx, "query_refused", {
            "contract_id": body.contract_id, "party": insurer, "reason": type(exc).__name__,
            "mode": body.mode, "claims": len(body.claims), "scenario": CLAIM_SCENARIO,
        })
    except Exception as log_exc:  # the refusal stands even if the log refuses its entry
        ctx.log.event("refusal_not_logged", error=type(log_exc).__name__)


# --- routes --------------------------------------------------------------------------------


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()
    released, metered = request_book(ctx).release_dead()  # before serving a first request
    for meter in metered:  # died between the log and the release: the answers never left
        withhold(ctx, SignedEntry.model_validate_json(meter), "node_restarted")
    if released:
        ctx.log.event("claims_released_dead_requests", requests=released,
                      meters_voided=len(metered))

    @mount(router, CHECK,
           responses={403: {"description": "refused: contract, consent, mode or flow"},
                      409: {"description": "request id reused or in progress"},
                      429: {"description": "over the contract's quota, or the consent's "
                                           "checks at a hospital for the day are spent"},
                      503: {"description": "a computing node or the log is down; nothing "
                                           "billed"}})
    def post_check(body: ClaimCheckRequest, caller: Caller, signature: Annotated[
            str | None, Header(alias=REQUEST_SIGNATURE_HEADER)] = None) -> Response:
        """Check a batch of claims; the answer decodes to the verdict at the insurer only.

        Send `X-Request-ID` (1-128 of `[A-Za-z0-9._-]`; the log knows the request by a
        derived id, `parties.runtime.request_ids`): a retry with the same id and body returns
        the same answer and is not billed again. Send `X-Cogov-Request-Signature`: the
        insurer node's Ed25519 signature of the request (`parties.claims.api.signed_request`),
        which its meter carries; unsigned requests are refused. The same question under another id
        (identical claims, tags and mode) gets the stored answer too, at no cost in budget or
        bill. Each new claim spends one check of its consent's daily budget at its hospital,
        refused or not.
        """
        # The stored JSON itself: a retry gets the very bytes of the first answer.
        return Response(check_claims(ctx, caller.name, body, signature),
                        media_type="application/json")

    @mount(router, HE_PUBLIC_CONTEXT)
    def get_he_context(caller: Caller) -> HeContext:
        """The public TenSEAL context to encrypt he claims under; this node holds its key."""
        public = regulator_he_key(ctx).key().public
        return HeContext(digest=public.digest, context=base64.b64encode(public.data))

    @mount(router, OPERATOR_CERTIFICATE)
    def get_operator_certificate(caller: Caller) -> OperatorCertificate:
        """The certificate whose signing key the insurer seals its envelopes to."""
        operator = operator_node(ctx)
        pem = ctx.state.node(operator).cert.read_text()
        return OperatorCertificate(node=operator, certificate_pem=pem)

    return [router]


REGULATOR_PRODUCT_SERVICE = Service(
    name="claims",
    roles=(Role.REGULATOR,),
    routers=_routes,
    components=((COMPONENT, MIGRATIONS), (BUDGET_COMPONENT, BUDGET_MIGRATIONS),
                (HE_KEY_COMPONENT, HE_KEY_MIGRATIONS),
                (DEFERRED_COMPONENT, DEFERRED_MIGRATIONS)),
    background=complete_deferred_forever,
)
