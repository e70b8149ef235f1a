"""The fast-claim check, served by the regulator to insurers (issue 5).

An insurer asks whether a claim holds against the anonymized hospital records and
gets the verdict and nothing else. The product endpoint (`POST /v1/claims/check`,
kind `claim`) enforces, before any data is touched, in this order: the mode is
served under the contract; the contract is live and the query fits its quota
(`ContractBook.authorize`, which reserves it); every claim's consent is registered,
unrevoked, unexpired, given to this insurer for the contract's purpose and scope,
and about the person the insurer names (the insurer presents the commitment
`subject_commitment(national_id, consent_id, nonce)`). Only then does it ask the
operator to compute (kind `product`); the operator checks, per claim, that the
consent's key is the key the health authority delivered for the person behind the
queried domain token (`parties.claims.compute`).

What travels where (per mode; see `claim_compute` for the computing side):

- the insurer seals to the operator's X25519 key (derived from its CA-certified
  Ed25519 signing key) an envelope: the claims' domain tokens and hospitals, the
  operator's part of the encoded claims and a fresh reply key. The regulator relays
  it unopened, so it never sees tokens, hospitals or claim values;
- `ss`: the insurer also sends the regulator its own additive share of the claims;
  the operator (leader) and the regulator (follower) evaluate the verdict circuit
  on shares, the health authority dealing the correlated randomness; each answers
  its result share, the operator's sealed to the insurer's reply key;
- `he`: the operator part is the claims encrypted under the insurer's TenSEAL key;
  the answer is ciphertexts that decrypt to the verdict bits;
- `plain`: the reference, readable by the operator; refused unless the contract
  lists `mode.plain` in its allowed outputs.

The response carries only the answers; the insurer adds the two shares (or
decrypts) and finishes the verdict with its own policy (covered categories,
deductible). Every answered request is metered once (`query_answered`, keyed by
the request id: a retry with the same id and the same body returns the stored
answer and is not billed again); every refusal is logged (`query_refused`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import Base64Bytes, BaseModel, ConfigDict, Field

from governance.consent import ConsentError, ConsentMissing
from governance.contracts import ContractError, ContractTerms
from governance.errors import GovernanceError
from mpc.errors import MalformedInput, MpcError
from parties.runtime.access import Caller, CallerPolicy
from parties.runtime.client import NodeClient
from parties.runtime.context import NodeContext
from parties.runtime.errors import NodeError, NodeUnavailable, RemoteError
from parties.runtime.node_log import current_request_id
from parties.runtime.service import Service
from parties.runtime.topology import Role

SCENARIO = "claim_check"
MODES = ("ss", "he", "plain")
DEFAULT_MODES = ("ss", "he")  # plain is the oracle: served only when the contract lists it
MODE_OUTPUT_PREFIX = "mode."  # e.g. allowed_outputs = [..., "mode.plain"]
RECORD_COLUMNS = ("admission_date", "diagnosis_code", "self_pay_fen")
VERDICT_OUTPUTS = ("visit_found", "amount_consistent", "diagnosis_covered", "payable")
MAX_CLAIMS = 10_000
DEFAULT_K = 4
RESPONSE_RETENTION_S = 3600  # stored answers for retried request ids
ENVELOPE_PURPOSE = "cogov-claim-envelope-v1"
ANSWER_PURPOSE = "cogov-claim-answer-v1"
COMPUTE_PATH = "/v1/claims/compute"
HE_CONTEXT_PATH = "/v1/claims/he-contexts"


# --- typed errors -------------------------------------------------------------------------


class ClaimRefused(NodeError):
    """Base of the claim product's own refusals."""

    http_status = 403


class ModeNotAllowed(ClaimRefused):
    """The contract does not serve this mode (plain is the oracle, refused by default)."""


class UnknownToken(ClaimRefused):
    """A claim's domain token is not one of the insurer's domain (e.g. another domain's)."""


class RequestIdReused(ClaimRefused):
    """The request id was already used for a different request."""

    http_status = 409


class RequestInProgress(ClaimRefused):
    """A request with this id is being answered right now."""

    http_status = 409


class ComputeUnavailable(ClaimRefused):
    """A computing node is down or lost its session; nothing was billed, retry later."""

    http_status = 503


class ComputeFailed(ClaimRefused):
    """A computing node failed the request; nothing was billed."""

    http_status = 502


def frame(head: BaseModel, payload: bytes) -> bytes:
    """Internal binary body: u32 head length | head JSON | payload."""
    data = head.model_dump_json().encode()
    return struct.pack("!I", len(data)) + data + payload


def unframe(model: type[BaseModel], body: bytes) -> tuple[Any, bytes]:
    try:
        (size,) = struct.unpack_from("!I", body, 0)
        head = model.model_validate_json(body[4:4 + size])
    except (struct.error, ValueError) as exc:
        raise MalformedInput(f"malformed {model.__name__} body: {exc}") from None
    return head, bytes(body[4 + size:])


# --- the insurer-facing models ------------------------------------------------------------

ClaimId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
ConsentId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{8,128}$")]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ClaimRef(BaseModel):
    """What the regulator sees of one claim: its id and its consent, never its values."""

    model_config = ConfigDict(extra="forbid")

    claim_id: ClaimId
    consent_id: ConsentId
    subject_commitment: Hex64 = Field(
        description="subject_commitment(national_id, consent_id, consent nonce): proves the "
        "consent is about the person the insurer names")


class ClaimCheckRequest(BaseModel):
    """A batch of claims of one mode. Claim values travel only inside the sealed envelope
    (tokens, hospitals, the operator's share or ciphertexts) and, in `ss`, the
    regulator's own additive share."""

    model_config = ConfigDict(extra="forbid")

    contract_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{3,128}$")]
    mode: Literal["ss", "he", "plain"]
    k: Annotated[int, Field(ge=1, le=16)] = DEFAULT_K
    claims: Annotated[list[ClaimRef], Field(min_length=1, max_length=MAX_CLAIMS)]
    operator_envelope: Base64Bytes = Field(
        description="sealed to the operator's X25519 key: tokens, hospitals, the operator's "
        "part of the encoded claims, the insurer's reply key")
    regulator_share: Base64Bytes | None = Field(
        None, description="ss only: the regulator's additive share of the encoded claims")
    he_context: Hex64 | None = Field(
        None, description="he only: SHA-256 of the public TenSEAL context registered before")


class ClaimCheckResponse(BaseModel):
    """The answer: the verdict bits, shared or encrypted for the insurer alone."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    mode: Literal["ss", "he", "plain"]
    claim_ids: list[str]
    operator_answer: Base64Bytes = Field(
        description="sealed to the insurer's reply key: the operator's result share (ss), "
        "the result ciphertexts (he) or the plain bits")
    regulator_answer: Base64Bytes | None = Field(
        None, description="ss only: the regulator's result share")


class HeContextUpload(BaseModel):
    context: Base64Bytes = Field(description="serialized public TenSEAL context (no secret key)")


class HeContextRegistered(BaseModel):
    digest: Hex64


class OperatorCertificate(BaseModel):
    """The operator's certificate: the insurer checks it against the federation CA and seals
    its envelopes to the X25519 form of the signing key it carries."""

    node: str
    certificate_pem: str


# --- regulator <-> operator (internal, binary-framed) ------------------------------------


class ComputeHead(BaseModel):
    """Head of the regulator's compute request; the sealed envelope follows it."""

    contract_id: str
    insurer: str
    mode: Literal["ss", "he", "plain"]
    k: int
    n_claims: int
    consent_of_claim: list[str]
    consents: list[dict[str, Any]]  # the distinct consent documents, as registered
    he_context: str | None = None


class ComputeResult(BaseModel):
    """Head of the operator's answer; the sealed answer for the insurer follows it."""

    records_touched: int
    compute_ms: int
    table_id: str | None = None


# --- the regulator's request book: idempotency, reservations, metering ----------------------

COMPONENT = "claims_product"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE claim_requests (
        request_id TEXT PRIMARY KEY,
        insurer TEXT NOT NULL,
        contract_id TEXT NOT NULL,
        digest TEXT NOT NULL,
        mode TEXT NOT NULL,
        claims INTEGER NOT NULL,
        status TEXT NOT NULL,          -- pending | answered | failed | refused
        usage_id INTEGER,              -- the contract quota reservation
        meter TEXT,                    -- JSON metering payload once answered
        logged INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE claim_responses (      -- stored answers, for retries (purged after an hour)
        request_id TEXT PRIMARY KEY REFERENCES claim_requests (request_id),
        response BLOB NOT NULL,
        stored_at REAL NOT NULL
    );
    CREATE INDEX claim_responses_by_age ON claim_responses (stored_at)
    """,
)


class RequestBook:
    """The regulator's table of claim requests (one row per request id)."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.in_flight: set[str] = set()
        self.metering: set[str] = set()  # answered, entry on its way to the log
        self.lock = threading.Lock()
        self.purged_at = 0.0
        # Metering runs off the request path, in order, on one thread of its own.
        self.meter_queue = ThreadPoolExecutor(1, thread_name_prefix="claims-meter")

    def _conn(self) -> sqlite3.Connection:
        return self.ctx.store.conn

    def begin(self, rid: str, insurer: str, contract_id: str, digest: str, mode: str,
              claims: int) -> tuple[str, bytes | None, dict | None]:
        """('new', None, None) | ('answered', response, meter-if-unlogged)."""
        now = time.time()
        with self.lock:
            if rid in self.in_flight:
                raise RequestInProgress(f"request {rid} is being answered")
            with self.ctx.store.lock, self._conn() as conn:
                row = conn.execute(
                    "SELECT r.insurer, r.digest, r.status, a.response, r.meter, r.logged,"
                    " r.usage_id FROM claim_requests r LEFT JOIN claim_responses a"
                    " ON a.request_id = r.request_id WHERE r.request_id = ?", (rid,)).fetchone()
                if row is not None:
                    if row[0] != insurer or row[1] != digest:
                        raise RequestIdReused(
                            f"request id {rid} was used for another request; use a fresh id")
                    if row[2] == "answered" and row[3] is not None:
                        unlogged = not row[5] and rid not in self.metering
                        if unlogged:
                            self.metering.add(rid)
                        return "answered", bytes(row[3]), json.loads(row[4]) if unlogged \
                            else None
                    if row[6] is not None:  # a crashed attempt's reservation
                        _release_usage(conn, int(row[6]))
                conn.execute(
                    "INSERT OR REPLACE INTO claim_requests (request_id, insurer, contract_id,"
                    " digest, mode, claims, status, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                    (rid, insurer, contract_id, digest, mode, claims, now, now))
                if now - self.purged_at > 60:
                    conn.execute("DELETE FROM claim_responses WHERE stored_at < ?",
                                 (now - RESPONSE_RETENTION_S,))
                    self.purged_at = now
            self.in_flight.add(rid)
        return "new", None, None

    def reserved(self, rid: str, usage_id: int) -> None:
        with self.ctx.store.lock, self._conn() as conn:
            conn.execute("UPDATE claim_requests SET usage_id = ? WHERE request_id = ?",
                         (usage_id, rid))

    def answered(self, rid: str, response: bytes, meter: dict) -> None:
        with self.lock:
            self.metering.add(rid)
        with self.ctx.store.lock, self._conn() as conn:
            now = time.time()
            conn.execute(
                "UPDATE claim_requests SET status = 'answered', meter = ?, updated_at = ?"
                " WHERE request_id = ?", (json.dumps(meter), now, rid))
            conn.execute("INSERT OR REPLACE INTO claim_responses VALUES (?, ?, ?)",
                         (rid, response, now))
        self._done(rid)

    def failed(self, rid: str, status: str) -> None:
        """Give back the quota reservation: a refused or failed request costs nothing."""
        with self.ctx.store.lock, self._conn() as conn:
            row = conn.execute("SELECT usage_id FROM claim_requests WHERE request_id = ?",
                               (rid,)).fetchone()
            if row is not None and row[0] is not None:
                _release_usage(conn, int(row[0]))
            conn.execute(
                "UPDATE claim_requests SET status = ?, usage_id = NULL, updated_at = ?"
                " WHERE request_id = ?", (status, time.time(), rid))
        self._done(rid)

    def logged(self, rid: str, ok: bool = True) -> None:
        if ok:
            with self.ctx.store.lock, self._conn() as conn:
                conn.execute("UPDATE claim_requests SET logged = 1 WHERE request_id = ?",
                             (rid,))
        with self.lock:
            self.metering.discard(rid)

    def _done(self, rid: str) -> None:
        with self.lock:
            self.in_flight.discard(rid)

    def release_dead(self) -> int:
        """At start, before serving: requests left pending died with the last process; give
        back their quota reservations."""
        with self.ctx.store.lock, self._conn() as conn:
            dead = conn.execute(
                "SELECT request_id, usage_id FROM claim_requests WHERE status = 'pending'"
            ).fetchall()
            for _, usage_id in dead:
                if usage_id is not None:
                    _release_usage(conn, int(usage_id))
            conn.execute("UPDATE claim_requests SET status = 'failed', usage_id = NULL"
                         " WHERE status = 'pending'")
        return len(dead)

    def unlogged(self) -> list[tuple[str, dict]]:
        """Answered requests whose metering entry never reached the log (not in progress)."""
        with self.ctx.store.lock, self._conn() as conn:
            unlogged = conn.execute(
                "SELECT request_id, meter FROM claim_requests"
                " WHERE status = 'answered' AND logged = 0").fetchall()
        with self.lock:
            unlogged = [(rid, m) for rid, m in unlogged if rid not in self.metering]
            self.metering.update(rid for rid, _ in unlogged)
        return [(rid, json.loads(meter)) for rid, meter in unlogged]


def _release_usage(conn: sqlite3.Connection, usage_id: int) -> None:
    # Drop the reservation row `ContractBook.authorize` made, inside the caller's
    # transaction, so the request's status and its quota change together.
    conn.execute("DELETE FROM contract_usage WHERE usage_id = ?", (usage_id,))


def request_book(ctx: NodeContext) -> RequestBook:
    return ctx.component(RequestBook)


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
    """Every rule before any data is touched; returns (terms, usage id, consent documents).

    Raises the typed refusal (contract, consent, quota, mode); on a refusal after the
    quota was reserved the caller releases it.
    """
    from parties.services.agreements import consent_registry, contract_book

    book = contract_book(ctx)
    terms = book.get(body.contract_id).terms
    if body.mode not in served_modes(terms):
        raise ModeNotAllowed(
            f"contract {body.contract_id} does not serve mode {body.mode!r} "
            f"(served: {', '.join(served_modes(terms))})")
    if body.mode == "ss" and body.regulator_share is None:
        raise MalformedInput("ss requests carry the regulator's share of the claims")
    if body.mode == "he" and body.he_context is None:
        raise MalformedInput("he requests name the registered public context")
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
    checked: set[tuple[str, str]] = set()
    for claim in body.claims:
        pair = (claim.consent_id, claim.subject_commitment)
        if pair in checked:
            continue
        consent = registry.get(claim.consent_id)
        if consent is None:
            raise ConsentMissing(f"consent {claim.consent_id} is not registered")
        registry.check(consent, claim.subject_commitment, insurer, terms.purpose, now,
                       scenario=terms.scenario, columns=RECORD_COLUMNS, outputs=outputs)
        checked.add(pair)
        documents.setdefault(claim.consent_id, consent.model_dump(mode="json"))
    return terms, authorization.usage_id, list(documents.values())


# --- the orchestration ---------------------------------------------------------------------


def request_digest(body: ClaimCheckRequest) -> str:
    h = hashlib.sha256()
    head = body.model_dump(mode="json", exclude={"operator_envelope", "regulator_share"})
    h.update(json.dumps(head, sort_keys=True, separators=(",", ":")).encode())
    h.update(hashlib.sha256(body.operator_envelope).digest())
    h.update(hashlib.sha256(body.regulator_share or b"").digest())
    return h.hexdigest()


def _operator(ctx: NodeContext) -> str:
    return ctx.topology.nodes_with_role(Role.OPERATOR)[0].name


def node_client(ctx: NodeContext, timeout: float = 300.0):
    """One long-lived mTLS client per node process (kept-alive connections, no handshake per
    call)."""
    return ctx.component(NodeClient, lambda: ctx.client(timeout))


_REMOTE_REFUSALS: dict[str, type[Exception]] = {}


def _remote_refusal(exc: RemoteError) -> Exception:
    """The operator's typed refusal, re-raised under its own name for the insurer."""
    if not _REMOTE_REFUSALS:
        import governance.consent as consent_lib
        from parties.services import operator_domains

        for module in (consent_lib, operator_domains):
            for name in dir(module):
                obj = getattr(module, name)
                if isinstance(obj, type) and issubclass(obj, GovernanceError):
                    _REMOTE_REFUSALS[name] = obj
        for cls in (UnknownToken, ModeNotAllowed, MalformedInput):
            _REMOTE_REFUSALS[cls.__name__] = cls
        from mpc.claim.errors import EngineMismatch, TooManyCandidates
        from parties.claims.compute import UnknownHeContext

        for cls in (TooManyCandidates, EngineMismatch, UnknownHeContext):
            _REMOTE_REFUSALS[cls.__name__] = cls
    cls = _REMOTE_REFUSALS.get(exc.error)
    if cls is not None and exc.http_status < 500:
        return cls(f"operator: {exc.detail}")
    if exc.http_status in (502, 503, 504):
        return ComputeUnavailable(f"operator: {exc.error}: {exc.detail}; nothing was billed, "
                                  "retry with the same request id")
    return ComputeFailed(f"operator: {exc.error}: {exc.detail}; nothing was billed")


def compute_at_operator(
    ctx: NodeContext, insurer: str, body: ClaimCheckRequest, consents: list[dict[str, Any]]
) -> tuple[ComputeResult, bytes]:
    head = ComputeHead(
        contract_id=body.contract_id, insurer=insurer, mode=body.mode, k=body.k,
        n_claims=len(body.claims), consent_of_claim=[c.consent_id for c in body.claims],
        consents=consents, he_context=body.he_context,
    )
    try:
        response = node_client(ctx).post(
            _operator(ctx), COMPUTE_PATH, kind="product",
            content=frame(head, body.operator_envelope),
            headers={"Content-Type": "application/octet-stream"})
    except RemoteError as exc:
        raise _remote_refusal(exc) from None
    except NodeUnavailable as exc:
        raise ComputeUnavailable(f"{exc}; nothing was billed, retry with the same request id"
                                 ) from None
    return unframe(ComputeResult, response.content)


def check_claims(ctx: NodeContext, insurer: str, body: ClaimCheckRequest) -> bytes:
    """Enforce, compute, meter once; the JSON of the `ClaimCheckResponse`."""
    from parties.claims.compute import follower_host

    rid = current_request_id.get() or ""
    book = request_book(ctx)
    t0 = time.perf_counter()
    state, stored, meter = book.begin(rid, insurer, body.contract_id, request_digest(body),
                                      body.mode, len(body.claims))
    if state == "answered":
        assert stored is not None
        ctx.log.event("claims_replayed", insurer=insurer, claims=len(body.claims))
        if meter is not None:  # answered before a crash that kept it from the log
            book.meter_queue.submit(_meter, ctx, rid, meter)
        return stored
    ctx.log.event("claims_received", insurer=insurer, mode=body.mode, claims=len(body.claims),
                  contract=body.contract_id)
    status = "failed"
    try:
        try:
            t1 = time.perf_counter()
            terms, _usage, consents = enforce(ctx, insurer, body, rid)
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
            except (GovernanceError, UnknownToken, MpcError) as exc:
                status = "refused"
                _refused(ctx, insurer, body, exc)
                raise
            regulator_answer = None
            if follower is not None:
                regulator_answer = follower.result(rid)
        finally:
            if follower is not None:
                follower.forget(rid)
        compute_ms = round((time.perf_counter() - started) * 1000)
        response = ClaimCheckResponse(
            request_id=rid, mode=body.mode, claim_ids=[c.claim_id for c in body.claims],
            operator_answer=base64.b64encode(answer),
            regulator_answer=None if regulator_answer is None else base64.b64encode(
                regulator_answer),
        ).model_dump_json().encode()
        meter = {
            "contract_id": body.contract_id, "party": insurer,
            "records_touched": result.records_touched, "rows_returned": len(body.claims),
            "compute_ms": compute_ms, "mode": body.mode, "claims": len(body.claims),
            "scenario": terms.scenario,
        }
        t2 = time.perf_counter()
        book.answered(rid, response, meter)
        status = "answered"
    finally:
        if status != "answered":
            book.failed(rid, status)
    ms = {"book": (t1 - t0) * 1000, "enforce": (started - t1) * 1000, "compute": compute_ms,
          "respond": (time.perf_counter() - t2) * 1000}
    ctx.log.event("claims_answered", insurer=insurer, mode=body.mode, claims=len(body.claims),
                  records_touched=result.records_touched,
                  ms={k: round(v, 1) for k, v in ms.items()})
    book.meter_queue.submit(_meter, ctx, rid, meter)
    return response


def _meter(ctx: NodeContext, rid: str, meter: dict) -> None:
    """Append the request's `query_answered` entry (once; retried after a crash)."""
    from parties.services.ledger import record_event

    token = current_request_id.set(rid)
    try:
        record_event(ctx, "query_answered", meter)
        request_book(ctx).logged(rid)
    except Exception as exc:  # the entry is retried at the next start or replay
        request_book(ctx).logged(rid, ok=False)
        ctx.log.event("metering_deferred", error=type(exc).__name__, detail=str(exc))
    finally:
        current_request_id.reset(token)


def _refused(ctx: NodeContext, insurer: str, body: ClaimCheckRequest, exc: Exception) -> None:
    from parties.services.ledger import record_event

    try:
        record_event(ctx, "query_refused", {
            "contract_id": body.contract_id, "party": insurer, "reason": type(exc).__name__,
            "mode": body.mode, "claims": len(body.claims), "scenario": SCENARIO,
        })
    except Exception as log_exc:  # the refusal stands even if the log is unreachable
        ctx.log.event("refusal_not_logged", error=type(log_exc).__name__)


def register_he_context(ctx: NodeContext, insurer: str, context: bytes) -> HeContextRegistered:
    head = json.dumps({"insurer": insurer}).encode()
    try:
        response = node_client(ctx).post(
            _operator(ctx), HE_CONTEXT_PATH, kind="product",
            content=struct.pack("!I", len(head)) + head + context,
            headers={"Content-Type": "application/octet-stream"})
    except RemoteError as exc:
        raise _remote_refusal(exc) from None
    return HeContextRegistered.model_validate(response.json())


def meter_unlogged(ctx: NodeContext) -> None:
    """Meter the answered requests whose entry never reached the log (a crash in between)."""
    for rid, meter in request_book(ctx).unlogged():
        _meter(ctx, rid, meter)


# --- routes --------------------------------------------------------------------------------


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter(prefix="/v1/claims", tags=["claim check"])
    insurers = CallerPolicy("claim", (Role.INSURER,))
    released = request_book(ctx).release_dead()  # before the node serves its first request
    if released:
        ctx.log.event("claims_released_dead_requests", requests=released)

    @router.post("/check", response_model=ClaimCheckResponse,
                 responses={403: {"description": "refused: contract, consent, mode or flow"},
                            409: {"description": "request id reused or in progress"},
                            429: {"description": "over the contract's quota"},
                            503: {"description": "a computing node is down; nothing billed"}})
    def post_check(body: ClaimCheckRequest, caller: Caller = Depends(insurers)) -> Response:
        """Check a batch of claims; the answer decodes to the verdict at the insurer only.

        Send `X-Request-ID`: a retry with the same id and body returns the same answer and
        is not billed again.
        """
        return Response(check_claims(ctx, caller.name, body),
                        media_type="application/json")

    @router.post("/he-contexts", response_model=HeContextRegistered)
    def post_he_context(body: HeContextUpload,
                        caller: Caller = Depends(insurers)) -> HeContextRegistered:
        """Register the insurer's public TenSEAL context (once per key) with the operator."""
        return register_he_context(ctx, caller.name, body.context)

    @router.get("/operator-certificate", response_model=OperatorCertificate)
    def get_operator_certificate(caller: Caller = Depends(insurers)) -> OperatorCertificate:
        """The certificate whose signing key the insurer seals its envelopes to."""
        operator = _operator(ctx)
        pem = ctx.state.node(operator).cert.read_text()
        return OperatorCertificate(node=operator, certificate_pem=pem)

    return [router]


def _recover_in_background(ctx: NodeContext) -> None:
    time.sleep(1.0)  # let the node serve first: metering talks to the operator's log
    try:
        meter_unlogged(ctx)
    except Exception as exc:
        ctx.log.event("claims_recovery_failed", error=type(exc).__name__, detail=str(exc))


REGULATOR_PRODUCT_SERVICE = Service(
    name="claims",
    roles=(Role.REGULATOR,),
    routers=_routes,
    components=((COMPONENT, MIGRATIONS),),
    background=_recover_in_background,
)
