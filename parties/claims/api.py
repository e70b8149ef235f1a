"""The claim check's contract: its routes, models, typed errors and the binary framing of the
computing routes.

An insurer calls the regulator (`CHECK`, `HE_PUBLIC_CONTEXT`, `OPERATOR_CERTIFICATE`, kind
`claim`); the regulator calls the operator (`COMPUTE`, `KEEP_HE_CONTEXT`, kind `product`);
the operator hands the regulator its share table (`SHARE_TABLE`, kind `mpc`). Claim values
travel only sealed to the operator or, in `ss`, as the regulator's additive share.
"""

import hashlib
import json
import struct
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

from pydantic import Base64Bytes, BaseModel, ConfigDict, Field

from governance.ledger.proofs import Receipt
from governance.meters import request_document
from mpc.claim.constants import DEFAULT_K, MAX_K, Mode
from mpc.errors import MalformedInput, MpcError
from parties.runtime.errors import NodeError
from parties.runtime.routes import Raw, Route
from parties.runtime.topology import Kind, Role, Topology

MAX_CLAIMS = 10_000  # claims per request
ENVELOPE_PURPOSE = "cogov-claim-envelope-v1"  # the insurer's envelope, sealed to the operator
ANSWER_PURPOSE = "cogov-claim-answer-v1"  # the operator's answer, sealed to the insurer
SHARE_TABLE_DOMAIN_HEADER = "X-Cogov-Domain"  # the shared domain a share table belongs to
CLAIM_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
# The insurer's signature (hex) of the request it sends (`signed_request`): the meter of the
# answer carries it, so a bill counts only requests the payer signed (`governance.meters`).
REQUEST_SIGNATURE_HEADER = "X-Cogov-Request-Signature"

Head = TypeVar("Head", bound=BaseModel)


# --- typed errors -------------------------------------------------------------------------


class ClaimRefused(NodeError):
    """Base of the claim product's own refusals."""

    http_status = 403


class ModeNotAllowed(ClaimRefused):
    """The contract does not serve this mode (plain is the oracle, refused by default)."""


NOT_CHECKABLE = "the claim cannot be checked under this consent; nothing was computed"


class ClaimNotCheckable(ClaimRefused):
    """One refusal for every cause that depends on the person's data, with one message.

    A claim whose token names nobody in the insurer's shared domain (another domain's, a
    stale or an invented one), whose consent is not signed by the key delivered for the
    person behind the token (another person's consent), or whose person has more visits at
    the hospital than the K candidate slots: each tells something about the person
    (present or absent, which key, how many visits), so the insurer receives the
    same name, status and message for all of them, with no count, claim index or reason.
    The cause goes to the refusing node's own log and refusal record (`log_detail`).
    """

    def __init__(self, cause: str = "") -> None:
        super().__init__(NOT_CHECKABLE)
        self.log_detail = cause or None


class CheckBudgetSpent(ClaimRefused):
    """A consent's checks at a hospital for this UTC day are spent (the contract's
    `quota.checks_per_consent_per_day`, refused checks included); nothing was computed."""

    http_status = 429


class HospitalNotInTopology(ClaimRefused):
    """A claim names a hospital that is not a hospital node of the topology: refused before
    anything is computed or billed, so an insurer never reads it as "no visit found".

    (Not `UnknownHospital`: that name is the statistics capability's refusal, and remote
    errors are matched by name.)"""

    http_status = 422


class RequestIdReused(ClaimRefused):
    """The request id was already used for a different request."""

    http_status = 409


class RequestInProgress(ClaimRefused):
    """A request with this id is being answered right now."""

    http_status = 409


class RequestSignatureInvalid(ClaimRefused):
    """The request carries no valid signature of the insurer's node key (`REQUEST_SIGNATURE_
    HEADER`): nothing is served, so nothing can be metered without the payer's signature."""


class AnswerNotLogged(ClaimRefused):
    """The log did not take the answer's meter in time: the answer was withheld (it never
    leaves before its entry), nothing is billed, the quota is given back; retry later."""

    http_status = 503


class ComputeUnavailable(ClaimRefused):
    """A computing node is down or lost its session; nothing was billed, retry later."""

    http_status = 503


class ComputeFailed(ClaimRefused):
    """A computing node failed the request; nothing was billed."""

    http_status = 502


class UnknownShareTable(MpcError):
    """The follower holds no share table with this id (it restarted, or the table is new)."""

    http_status = 409


class UnknownHeContext(MpcError):
    """The he claims are encrypted under a context that is not the regulator's key (the
    regulator's check), or the operator was never handed it (the operator's)."""

    http_status = 404


def refuse_unknown_hospitals(topology: Topology, hospitals: Sequence[str],
                             claims: Sequence[str]) -> None:
    """Raise `HospitalNotInTopology` for the first of `claims` (labels, e.g. "claim C1") whose
    hospital is not a hospital node of `topology`."""
    known = {n.name for n in topology.nodes_with_role(Role.HOSPITAL)}
    for claim, hospital in zip(claims, hospitals, strict=True):
        if hospital not in known:
            raise HospitalNotInTopology(
                f"{claim}: hospital_id {hospital!r} is not a hospital of the federation "
                f"({', '.join(sorted(known))})")


# --- the insurer-facing models ------------------------------------------------------------

ClaimId = Annotated[str, Field(pattern=CLAIM_ID_PATTERN)]
ConsentId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{8,128}$")]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ClaimRef(BaseModel):
    """What the regulator sees of one claim: its id and its consent, never its values."""

    model_config = ConfigDict(extra="forbid")

    claim_id: ClaimId
    consent_id: ConsentId
    hospital_tag: Hex64 = Field(
        description="HMAC-SHA256 under the person's domain token of (consent_id, hospital): "
        "the check budget's (consent, hospital) bucket, without naming the hospital; the "
        "operator checks it against the sealed token and hospital "
        "(`parties.claims.fingerprints`)")
    claim_digest: Hex64 = Field(
        description="HMAC-SHA256 under the insurer's own secret of the claim (consent, token, "
        "hospital, encoded day, amount, category): an identical check asked again is "
        "answered from the book, computed and charged once")


class ClaimCheckRequest(BaseModel):
    """A batch of claims of one mode. Claim values travel only inside the sealed envelope
    (tokens, hospitals, the operator's share or ciphertexts) and, in `ss`, the
    regulator's own additive share."""

    model_config = ConfigDict(extra="forbid")

    contract_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{3,128}$")]
    mode: Mode
    k: Annotated[int, Field(ge=1, le=MAX_K)] = DEFAULT_K
    claims: Annotated[list[ClaimRef], Field(min_length=1, max_length=MAX_CLAIMS)]
    operator_envelope: Base64Bytes = Field(
        description="sealed to the operator's X25519 key: tokens, hospitals, the operator's "
        "part of the encoded claims, the insurer's reply key")
    regulator_share: Base64Bytes | None = Field(
        None, description="ss only: the regulator's additive share of the encoded claims")
    he_context: Hex64 | None = Field(
        None, description="he only: SHA-256 of the regulator's public TenSEAL context the "
        "claims are encrypted under (`HE_PUBLIC_CONTEXT`)")


class ClaimCheckResponse(BaseModel):
    """The answer: the verdict bits, shared (ss), sealed (plain) or, in he, from the regulator
    that holds the key."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    mode: Mode
    claim_ids: list[str]
    operator_answer: Base64Bytes = Field(
        description="sealed to the insurer's reply key: the operator's result share (ss), "
        "the plain bits, or (he) nothing but the request it answered")
    regulator_answer: Base64Bytes | None = Field(
        None, description="ss: the regulator's result share; he: the verdict bits the "
        "regulator decrypted")
    log_entry: Base64Bytes = Field(
        description="the answer's `query_answered` entry as the log stores it (the Merkle "
        "leaf), committed before the answer left")
    receipt: Receipt = Field(
        description="the entry's index and audit path against a checkpoint the log signed "
        "(`governance.ledger.proofs`); the insurer proves it one history with the witnesses' "
        "cosigned checkpoint (`parties.ledger.log_view`)")


def body_digest(body: ClaimCheckRequest) -> str:
    """SHA-256 (hex) of a check request's content: the same request hashes alike on both
    sides of the wire (the bulk fields are hashed apart, not re-encoded)."""
    h = hashlib.sha256()
    head = body.model_dump(mode="json", exclude={"operator_envelope", "regulator_share"})
    h.update(json.dumps(head, sort_keys=True, separators=(",", ":")).encode())
    h.update(hashlib.sha256(body.operator_envelope).digest())
    h.update(hashlib.sha256(body.regulator_share or b"").digest())
    return h.hexdigest()


def signed_request(log_id: str, insurer: str, body: ClaimCheckRequest) -> dict[str, Any]:
    """What the insurer signs for a check request known to the log as `log_id`."""
    return request_document(CHECK.method, CHECK.path, log_id, body_digest(body),
                            body.contract_id, insurer, len(body.claims))


class HeContext(BaseModel):
    """The regulator's public TenSEAL context, which he claims are encrypted under."""

    digest: Hex64 = Field(description="SHA-256 of `context`")
    context: Base64Bytes = Field(description="serialized public TenSEAL context (no secret key)")


class HeContextRegistered(BaseModel):
    digest: Hex64


class OperatorCertificate(BaseModel):
    """The operator's certificate: the insurer checks it against the federation CA and seals
    its envelopes to the X25519 form of the signing key it carries."""

    node: str
    certificate_pem: str


# --- regulator <-> operator and operator -> regulator (binary-framed) ----------------------


class ComputeHead(BaseModel):
    """Head of the regulator's compute request; the sealed envelope follows it."""

    contract_id: str
    insurer: str
    mode: Mode
    k: int
    n_claims: int
    consent_of_claim: list[str]
    consents: list[dict[str, Any]]  # the distinct consent documents, as registered
    hospital_tags: list[Hex64] = []  # per claim, as the regulator counted its budget
    he_context: str | None = None


class ComputeResult(BaseModel):
    """Head of the operator's answer; the sealed answer for the insurer follows it, then (he)
    the answer ciphertexts for the regulator, the last `he_answer_bytes` bytes."""

    records_touched: int
    compute_ms: int
    table_id: str | None = None
    he_answer_bytes: int = 0


class ShareTableKept(BaseModel):
    table_id: str
    rows: int


def frame(head: BaseModel, payload: bytes) -> bytes:
    """A computing route's binary body: u32 head length | head JSON | payload."""
    data = head.model_dump_json().encode()
    return struct.pack("!I", len(data)) + data + payload


def unframe(model: type[Head], body: bytes) -> tuple[Head, bytes]:
    """The head and payload of a framed body; refuses a body that does not parse."""
    try:
        (size,) = struct.unpack_from("!I", body, 0)
        head = model.model_validate_json(body[4:4 + size])
    except (struct.error, ValueError) as exc:
        raise MalformedInput(f"malformed {model.__name__} body: {exc}") from None
    return head, bytes(body[4 + size:])


# --- routes ----------------------------------------------------------------------------------

_INSURERS = (Role.INSURER,)
_TAG = "claim check"
_COMPUTING_TAG = "claim check (computing)"

CHECK = Route("POST", "/v1/claims/check", Kind.CLAIM, ClaimCheckRequest, ClaimCheckResponse,
              roles=_INSURERS, tag=_TAG)
HE_PUBLIC_CONTEXT = Route("GET", "/v1/claims/he-context", Kind.CLAIM, None, HeContext,
                          roles=_INSURERS, tag=_TAG)
OPERATOR_CERTIFICATE = Route("GET", "/v1/claims/operator-certificate", Kind.CLAIM, None,
                             OperatorCertificate, roles=_INSURERS, tag=_TAG)

# Body and answer: `frame(ComputeHead, envelope)` -> `frame(ComputeResult, sealed answer)`.
COMPUTE = Route("POST", "/v1/claims/compute", Kind.PRODUCT, Raw, Raw,
                roles=(Role.REGULATOR,), tag=_COMPUTING_TAG)
# Body: the regulator's public context (the bytes `HE_PUBLIC_CONTEXT` serves).
KEEP_HE_CONTEXT = Route("POST", "/v1/claims/he-contexts", Kind.PRODUCT, Raw,
                        HeContextRegistered, roles=(Role.REGULATOR,), tag=_COMPUTING_TAG)
# Body: `ss_shares.pack(KIND_ROWS, shares)`, the shared domain in `SHARE_TABLE_DOMAIN_HEADER`.
SHARE_TABLE = Route("PUT", "/v1/claims/share-tables/{table_id}", Kind.MPC, Raw,
                    ShareTableKept, roles=(Role.OPERATOR,), tag=_COMPUTING_TAG)
