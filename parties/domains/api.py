"""The shared-domains capability's contract: the operator's shared domains, the OPRF chain
to their tokens, and the rotation of the keys behind them.

A shared domain belongs to one (scenario, data user); its tokens T_d = k2[d]·k1·H(id)
are unlinkable to another shared domain's. The operator's local operator creates,
lists, deletes (crypto-shreds) and rotates them and traces leaked tokens. A data
user reaches its tokens only through the blinded chain:

    insurer --DOMAIN_TOKENS--> regulator --EVALUATE--> operator --LEVEL1_STEP--> authority

Every hop carries the insurer's `SignedBatch`: the blinded points B signed with the
insurer's node key together with the request id, a fresh batch id and an expiry. The
operator applies k2[d] first (Z' = k2[d]·B, with an RFC 9497 DLEQ proof); the authority
applies k1 only to Z' of such a batch whose proof holds, once, within the insurer's daily
id budget (`OPRF_BUDGETS`, `RESET_OPRF_BUDGET`), so neither relay can have k1 applied to
points of its own choosing or name another data user. Both steps come back to the
insurer with their proofs (`EvaluatedBatch`), checked against the key commitments k·G
the key holders publish in the log (`KEY_COMMITTED_KIND`).

k1 rotates at the health authority (`ROTATE_LEVEL1`), which streams the old -> new
p1 mapping to the operator (`LEVEL1_MAPPING`) and commits it (`LEVEL1_COMMIT`).
"""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from governance.errors import GovernanceError
from governance.leak_tracing import LeakReport
from mpc.claim.constants import CLAIM_SCENARIO
from parties.runtime.batch_routes import batch_stream_routes
from parties.runtime.routes import Kind, Route
from parties.runtime.topology import Role

DEFAULT_SCENARIO = CLAIM_SCENARIO
SCENARIO_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
DATA_USER_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
DOMAIN_ID_PATTERN = r"^dom-[0-9a-f]{16}$"
MAX_POINTS = 1000  # blinded points per OPRF request

Scenario = Annotated[str, Field(pattern=SCENARIO_PATTERN)]
DataUser = Annotated[str, Field(pattern=DATA_USER_PATTERN)]
HexPoint = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]
RequestId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
HexProof = Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]
#: the log entry kind by which a key holder publishes k·G of an xID key version
KEY_COMMITTED_KIND = "xid_key_committed"
BatchId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


# --- errors ---------------------------------------------------------------------------------


class DomainError(GovernanceError):
    http_status = 400


class UnknownDomain(DomainError):
    http_status = 404


class DomainDeleted(DomainError):
    """The shared domain was deleted and its key destroyed: nothing on it can be answered."""

    http_status = 410


class DomainExists(DomainError):
    http_status = 409


class NotADataUser(DomainError):
    """Shared domains are created for data users (insurer nodes of the topology) only."""

    http_status = 422


class BatchSignatureInvalid(DomainError):
    """The batch does not carry a valid signature of the insurer it names, or the caller
    relays for another insurer than the one who signed."""

    http_status = 403


class BatchExpired(DomainError):
    """The batch's expiry has passed, or lies further ahead than a batch may live."""

    http_status = 403


class BatchReplayed(DomainError):
    """This batch id was already evaluated: a signed batch is served once."""

    http_status = 409


class OprfBudgetSpent(DomainError):
    """The data user's daily OPRF id budget tripped: refused until the next UTC day or an
    administrator's reset."""

    http_status = 429


class OprfProofInvalid(DomainError):
    """A key holder's step does not carry a valid DLEQ proof against the key commitment
    published in the log: its output is refused, never used or stored."""

    http_status = 403


class RotationRefused(GovernanceError):
    """The staged mapping does not match what was announced or what the operator holds."""

    http_status = 409


class NothingToRotate(GovernanceError):
    """No data was governed yet, so there is no k1."""

    http_status = 409


# --- shared domains at the operator -----------------------------------------------------------


class SharedDomainRequest(BaseModel):
    scenario: Scenario = DEFAULT_SCENARIO
    data_user: DataUser


class SharedDomain(BaseModel):
    domain_id: str
    scenario: str
    data_user: str
    tokens: int
    persons: int
    created_at: str
    deleted_at: str | None


class TokenLookup(BaseModel):
    tokens: Annotated[list[HexPoint], Field(min_length=1, max_length=10_000)]


class LookupResult(BaseModel):
    domain_id: str
    matched: int
    visits: int


class LeakedTokens(BaseModel):
    tokens: Annotated[list[Annotated[str, Field(max_length=200)]],
                      Field(min_length=1, max_length=200_000)]


class SharedDomainAttribution(BaseModel):
    domain_id: str
    scenario: str
    data_user: str
    matched: int
    share: float
    chance_log10: float


class LeakTrace(BaseModel):
    report: LeakReport
    attributed: list[SharedDomainAttribution]
    summary: str


class SharedDomainKeyRotated(BaseModel):
    domain_id: str
    key_id: str
    old_version: int
    new_version: int
    tokens: int
    persons: int


# --- the OPRF chain -------------------------------------------------------------------------


class SignedBatch(BaseModel):
    """An insurer's blinded points, signed by its node key (`parties.domains.batch`).

    The signature covers every field but itself, the points through their SHA-256
    (`points_sha256` is recomputed, never sent), so a relay that alters, adds or drops a
    point, renames the data user or the scenario, or reuses the batch for another request
    breaks it. `batch_id` is the replay key; `expires_at` is UNIX seconds.
    """

    model_config = ConfigDict(extra="forbid")

    data_user: DataUser
    scenario: Scenario = DEFAULT_SCENARIO
    request_id: RequestId
    batch_id: BatchId
    expires_at: Annotated[int, Field(ge=0)]
    points: Annotated[list[HexPoint], Field(min_length=1, max_length=MAX_POINTS)]
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]


class OprfBudget(BaseModel):
    """A data user's OPRF id budget at the health authority, for one UTC day."""

    data_user: str
    day: str
    used: int
    cap: int
    spent: bool
    incidents: int


class ProvenStep(BaseModel):
    """A key holder's step on a batch: k·P for every point, with the RFC 9497 batched DLEQ
    proof (`mpc.voprf`) for the version of the key it names."""

    model_config = ConfigDict(extra="forbid")

    key_id: Annotated[str, Field(min_length=1, max_length=255)]
    key_version: Annotated[int, Field(ge=1)]
    points: Annotated[list[HexPoint], Field(min_length=1, max_length=MAX_POINTS)]
    proof: HexProof


class Level1Request(BaseModel):
    """The operator's request to the authority: the insurer's signed batch B, and the
    operator's step Z' = k2[d]·B proven against `domain_commitment` = k2[d]·G."""

    model_config = ConfigDict(extra="forbid")

    batch: SignedBatch
    domain_step: ProvenStep
    domain_commitment: HexPoint


class EvaluatedBatch(BaseModel):
    """What the insurer gets back: Z' = k2[d]·B and Z = k1·Z', each with its proof."""

    domain_step: ProvenStep
    level1_step: ProvenStep


# --- rotation of k1 -------------------------------------------------------------------------


class RekeyCommit(BaseModel):
    old_version: Annotated[int, Field(ge=1)]
    new_version: Annotated[int, Field(ge=2)]
    pairs: Annotated[int, Field(ge=0)]
    digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class OperatorRekey(BaseModel):
    """The operator's side of a k1 rotation."""

    stream: str
    old_version: int
    new_version: int
    persons: int
    visits: int
    domains: int


class Level1Rotation(BaseModel):
    """What a k1 rotation moved."""

    key_id: str
    old_version: int
    new_version: int
    persons: int
    visits: int
    operator: OperatorRekey


# --- routes ---------------------------------------------------------------------------------

CREATE_DOMAIN = Route("POST", "/v1/domains", Kind.ADMIN, SharedDomainRequest, SharedDomain,
                      tag="domains")
LIST_DOMAINS = Route("GET", "/v1/domains", Kind.ADMIN, None, list[SharedDomain], tag="domains")
DELETE_DOMAIN = Route("DELETE", "/v1/domains/{domain_id}", Kind.ADMIN, None, SharedDomain,
                      tag="domains")
LOOKUP_TOKENS = Route("POST", "/v1/domains/{domain_id}/lookup", Kind.ADMIN, TokenLookup,
                      LookupResult, tag="domains")
TRACE_LEAK = Route("POST", "/v1/domains/trace-leak", Kind.ADMIN, LeakedTokens, LeakTrace,
                   tag="domains")
ROTATE_DOMAIN_KEY = Route("POST", "/v1/domains/{domain_id}/rotate", Kind.ADMIN, None,
                          SharedDomainKeyRotated, tag="domains")

DOMAIN_TOKENS = Route("POST", "/v1/oprf/domain-tokens", Kind.OPRF, SignedBatch, EvaluatedBatch,
                      roles=(Role.INSURER,), tag="oprf")
EVALUATE = Route("POST", "/v1/oprf/evaluate", Kind.OPRF, SignedBatch, EvaluatedBatch,
                 roles=(Role.REGULATOR,), tag="oprf")
LEVEL1_STEP = Route("POST", "/v1/oprf/level1", Kind.OPRF, Level1Request, ProvenStep,
                    roles=(Role.OPERATOR,), tag="oprf")
OPRF_BUDGETS = Route("GET", "/v1/oprf/budgets", Kind.ADMIN, None, list[OprfBudget],
                     tag="health authority")
RESET_OPRF_BUDGET = Route("POST", "/v1/oprf/budgets/{data_user}/reset", Kind.ADMIN, None,
                          OprfBudget, tag="health authority")

ROTATE_LEVEL1 = Route("POST", "/v1/governance/level1/rotate", Kind.ADMIN, None, Level1Rotation,
                      tag="health authority")
LEVEL1_MAPPING = batch_stream_routes("/v1/circulation/level1", Kind.INGEST,
                                     (Role.HEALTH_AUTHORITY,), tag="circulation")
LEVEL1_COMMIT = Route("POST", "/v1/circulation/level1/{stream}/commit", Kind.INGEST,
                      RekeyCommit, OperatorRekey, roles=(Role.HEALTH_AUTHORITY,),
                      tag="circulation")
