"""The ingest capability's contract: hospital exports, their governing, and circulation.

    hospital --export--> health authority (stages, governs: scan, classify, standardize,
                         tokenize, seal) --ingest--> operator (circulation)

A hospital's local operator starts an export (`HOSPITAL_EXPORT`); the hospital
streams the raw file to the authority (`EXPORT_BATCHES`) and has it governed
(`COMPLETE_EXPORT`). The authority's local operator loads consumers' public keys
(`CONSUMER_KEYS`) and publishes (`PUBLISH`): the visits and keys stream to the
operator (`CIRCULATION_VISITS`, `CIRCULATION_PERSONS`), which registers the
holding against the publisher's digests (`REGISTER`).

A consumer's consent key is per insurer (`governance.consent.consent_signing_key`), so
the keys travel as (person, insurer, public key): `CONSUMER_KEYS` batches have the
columns national_id, insurer, public_key (hex); `CIRCULATION_PERSONS` batches p1,
insurer, public_key. `persons` counts in the summaries below count those keys.
"""

import re
from typing import Annotated

from pydantic import BaseModel, Field

from governance.errors import GovernanceError
from governance.ledger import SignedEntry
from governance.ledger.events import register_event_kind
from parties.runtime.batch_routes import STREAM_PATTERN, batch_stream_routes
from parties.runtime.routes import Kind, Route
from parties.runtime.topology import Role

DEFAULT_BATCH_ROWS = 5000
# Seconds a caller waits on the routes that govern or publish a whole export.
LONG_CALL_S = 600.0

BatchRows = Annotated[int, Field(ge=10, le=200_000)]
EncodingName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,39}$")]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# The insurer a consent key serves: a node name. At the operator a key registered before
# keys were per insurer arrives bound to no insurer ('') and opens no insurer's check.
INSURER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
Grade = Annotated[str, Field(pattern=r"^L\d$")]

# A hospital's signed data asset registration (`parties.ingest.registration`), and the
# authority's record of an export it refused to govern.
ASSET_REGISTERED = register_event_kind("data_asset_registered")
EXPORT_REFUSED = register_event_kind("export_refused")


# --- errors ---------------------------------------------------------------------------------


class ExportFileMissing(GovernanceError):
    http_status = 404


class AuthorityError(GovernanceError):
    http_status = 400


class ExportIncomplete(AuthorityError):
    """Not every batch of the export has arrived (resend the missing ones)."""

    http_status = 409


class ExportRegistrationInvalid(AuthorityError):
    """The export's registration is not its sender's: another owner, another signer, or not
    a registration at all."""

    http_status = 403


class ExportRegistrationMismatch(AuthorityError):
    """The export's signed registration states other rows, digest or stream than arrived."""

    http_status = 409


class NothingToPublish(AuthorityError):
    http_status = 409


class CirculationError(GovernanceError):
    http_status = 400


class TransportSealInvalid(CirculationError):
    """A published batch's sealed key or field does not open: tampered, moved or misaddressed."""

    http_status = 422


class RegistrationMismatch(CirculationError):
    """What the operator holds differs from what the health authority says it published."""

    http_status = 409


# --- the hospital ---------------------------------------------------------------------------


class ExportRequest(BaseModel):
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    batch_rows: BatchRows = DEFAULT_BATCH_ROWS
    # The text encoding of a CSV or JSON-lines file; None detects UTF-8 (BOM or not), GB18030.
    encoding: EncodingName | None = None
    # The grade the hospital registers its asset at; None: the policy's top grade.
    grade: Grade | None = None


class GovernedExport(BaseModel):
    stream: str
    hospital_id: str
    rows: int
    persons: int
    digest: str
    mapped: dict[str, str]  # common field -> raw column
    flagged: dict[str, str]  # raw column -> sensitive type found by content
    raw_grades: dict[str, str]  # raw column -> level
    grades: dict[str, str]  # common field -> level
    sealed_fields: list[str]
    registration_index: int  # the log index of the hospital's signed registration (-1: unknown)


class ExportResult(BaseModel):
    hospital_id: str
    stream: str
    rows: int
    batches: int
    sent: int
    skipped: int
    governed: GovernedExport


# --- the health authority -------------------------------------------------------------------


class ExportComplete(BaseModel):
    batches: Annotated[int, Field(ge=1, le=10**6)]
    rows: Annotated[int, Field(ge=0)]
    # The hospital's signed `ASSET_REGISTERED` entry for this export.
    registration: SignedEntry


class HospitalDigest(BaseModel):
    rows: int
    persons: int
    digest: str


class GovernanceSummary(BaseModel):
    hospitals: dict[str, HospitalDigest]
    rows: int
    consumer_keys: int


class PublishRequest(BaseModel):
    batch_rows: BatchRows = DEFAULT_BATCH_ROWS


class Publication(BaseModel):
    stream: str
    rows: int
    digest: str
    persons: int
    persons_digest: str
    batches: int
    sent: int
    skipped: int
    sealed_fields: list[str]
    alignment: dict[str, int]
    registered_rows: int


# --- the operator's circulation ---------------------------------------------------------------


class Registration(BaseModel):
    stream: Annotated[str, Field(pattern=STREAM_PATTERN)]
    rows: Annotated[int, Field(ge=0)]
    digest: Digest
    persons: Annotated[int, Field(ge=0)]
    persons_digest: Digest
    grades: dict[str, Annotated[str, Field(pattern=r"^L\d$")]]


class CirculationSummary(BaseModel):
    rows: int
    digest: str
    persons: int
    persons_digest: str
    by_hospital: dict[str, int]
    sealed_columns: list[str]


# --- routes ---------------------------------------------------------------------------------

HOSPITALS = (Role.HOSPITAL,)
PUBLISHER = (Role.HEALTH_AUTHORITY,)

HOSPITAL_EXPORT = Route("POST", "/v1/hospital/export", Kind.ADMIN, ExportRequest, ExportResult,
                        tag="hospital")

EXPORT_BATCHES = batch_stream_routes("/v1/exports", Kind.EXPORT, HOSPITALS,
                                     tag="health authority")
COMPLETE_EXPORT = Route("POST", "/v1/exports/{stream}/complete", Kind.EXPORT, ExportComplete,
                        GovernedExport, roles=HOSPITALS, tag="health authority")
GOVERNANCE_SUMMARY = Route("GET", "/v1/governance/summary", Kind.ADMIN, None, GovernanceSummary,
                           tag="health authority")
CONSUMER_KEYS = batch_stream_routes("/v1/governance/consumer-keys", Kind.ADMIN,
                                    tag="health authority")
PUBLISH = Route("POST", "/v1/governance/publish", Kind.ADMIN, PublishRequest, Publication,
                tag="health authority")

CIRCULATION_VISITS = batch_stream_routes("/v1/circulation/visits", Kind.INGEST, PUBLISHER,
                                         tag="circulation")
CIRCULATION_PERSONS = batch_stream_routes("/v1/circulation/persons", Kind.INGEST, PUBLISHER,
                                          tag="circulation")
REGISTER = Route("POST", "/v1/circulation/register", Kind.INGEST, Registration,
                 CirculationSummary, roles=PUBLISHER, tag="circulation")
CIRCULATION_SUMMARY = Route("GET", "/v1/circulation/summary", Kind.ADMIN, None,
                            CirculationSummary, tag="circulation")
