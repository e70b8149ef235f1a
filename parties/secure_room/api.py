"""The secure room's contract: in-air development's routes, messages and typed errors.

Two nodes serve it. The operator hosts the development environment: the sample and
test libraries the data owner publishes, the secure room that validates submitted
packages, and the product catalogue. The data owner (the health authority) builds the
libraries, reviews and approves packages, and runs approved ones on its authorized
library, on the operator's request.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from governance.packages import PackageApproval
from mpc.claim.constants import CLAIM_SCENARIO
from parties.runtime.errors import NodeError
from parties.runtime.routes import Kind, Route
from parties.runtime.topology import Role

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
PRODUCT_ID_PATTERN = r"^[0-9a-f]{32}$"
FILE_PATH_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}){0,7}$"
MAX_PACKAGE_FILES = 64
MAX_PACKAGE_BYTES = 2 * 1024**2
MAX_LIBRARY_FILES = 16
MAX_LIBRARY_BYTES = 256 * 1024**2
# Validation and production runs take minutes: the client timeout of every call here.
LONG_CALL_S = 900.0


# --- errors ----------------------------------------------------------------------------------


class SecureRoomError(NodeError):
    """Base of every secure-room error."""

    http_status = 400


class SandboxUnavailable(SecureRoomError):
    """This machine cannot build the OS sandbox (bubblewrap missing or namespaces refused)."""

    http_status = 503


class LibraryInvalid(SecureRoomError):
    """The library directory is missing, malformed, or lacks a declared table or column."""

    http_status = 422


class LibraryNotDeclared(SecureRoomError):
    """The package does not declare this library tier for one of its inputs."""

    http_status = 403


class LibraryUnavailable(SecureRoomError):
    """The library was not published here (or is not one a developer may download)."""

    http_status = 404


class PackageUnknown(SecureRoomError):
    """No package with this hash was submitted to the secure room."""

    http_status = 404


class PackageNotValidated(SecureRoomError):
    """The package failed validation on the test library; it never goes to production."""

    http_status = 409


class ProductUnknown(SecureRoomError):
    http_status = 404


class ProductionRunInvalid(SecureRoomError):
    """The data owner's answer does not match its own output hash."""

    http_status = 502


class ReviewError(SecureRoomError):
    """Base of the data owner's refusals in review, approval and production."""

    http_status = 400


class ReviewUnknown(ReviewError):
    """No package with this hash was handed over for review."""

    http_status = 404


class ReviewInvalid(ReviewError):
    """The handed-over package does not match its report (hash, tier or outcome)."""

    http_status = 422


class ValidationNotPassed(ReviewError):
    """The secure room did not accept the package on the test library: no approval."""

    http_status = 409


class QueryTablesInvalid(ReviewError):
    """A query table is not sealed to this node for this package, or names an owner table."""

    http_status = 422


class LibrarySourceTooSmall(ReviewError):
    """Too few authorized rows to build development libraries from."""

    http_status = 409


# --- messages --------------------------------------------------------------------------------


class WireFile(BaseModel):
    """One file of a package or library, by its path relative to the directory's root."""

    path: Annotated[str, Field(pattern=FILE_PATH_PATTERN)]
    content_b64: str


class LibraryUpload(BaseModel):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    kind: Literal["sample", "test"]
    sha256: Annotated[str, Field(pattern=SHA256_PATTERN)]
    files: Annotated[list[WireFile], Field(min_length=2, max_length=MAX_LIBRARY_FILES)]


class LibrarySummary(BaseModel):
    name: str
    kind: str
    sha256: str
    owner: str
    tables: dict[str, int]
    reports: dict[str, dict]
    published_at: str


class LibraryDownload(BaseModel):
    name: str
    kind: str
    sha256: str
    files: list[WireFile]


class PackageUpload(BaseModel):
    files: Annotated[list[WireFile], Field(min_length=1, max_length=MAX_PACKAGE_FILES)]
    library: Annotated[str, Field(pattern=NAME_PATTERN)] = CLAIM_SCENARIO


class Submission(BaseModel):
    package_sha256: str
    name: str
    version: str
    library: str
    submitter: str
    report: dict[str, Any]
    report_sha256: str
    outcome: str
    accepted: bool
    forwarded_for_review: bool
    submitted_at: str


class ReviewRequest(BaseModel):
    """What the operator hands the data owner: the package and its validation report."""

    files: Annotated[list[WireFile], Field(min_length=1, max_length=MAX_PACKAGE_FILES)]
    report: dict[str, Any]
    report_sha256: Annotated[str, Field(pattern=SHA256_PATTERN)]
    library: Annotated[str, Field(pattern=NAME_PATTERN)]
    submitter: str


class Review(BaseModel):
    package_sha256: str
    name: str
    version: str
    library: str
    submitter: str
    report: dict[str, Any]
    report_sha256: str
    received_at: str
    approval: PackageApproval | None = None


ContractId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{3,128}$")]


class RunRequest(BaseModel):
    """The package-run contract the run is made under (in force, naming the package's
    output), and query tables (the requester's inputs, e.g. claims) sealed to the owner."""

    contract_id: ContractId
    query: Annotated[dict[Annotated[str, Field(pattern=NAME_PATTERN)], str],
                     Field(max_length=8)] = Field(default_factory=dict)


class ProductionRunRequest(BaseModel):
    files: Annotated[list[WireFile], Field(min_length=1, max_length=MAX_PACKAGE_FILES)]
    query: dict[str, str] = Field(default_factory=dict)
    requester: str
    contract_id: ContractId


class ProductionRun(BaseModel):
    """The data owner's answer: its run id, the report, the released output and its hash."""

    run_id: str
    owner: str
    package_sha256: str
    report: dict[str, Any]
    output: list[dict] | None
    output_sha256: str


class CatalogueEntry(BaseModel):
    product_id: str
    package_sha256: str
    name: str
    version: str
    library: str
    requester: str
    owner: str
    rows: int
    output_sha256: str
    published_at: str
    report: dict[str, Any] | None = None
    output: list[dict] | None = None


class LibraryBuild(BaseModel):
    name: Annotated[str, Field(pattern=NAME_PATTERN)] = CLAIM_SCENARIO
    sample_rows: Annotated[int, Field(ge=20, le=200_000)] = 500
    test_rows: Annotated[int, Field(ge=10, le=10_000)] = 60
    seed: Annotated[int, Field(ge=0, le=2**31)] = 7


class PublishedLibrary(BaseModel):
    name: str
    kind: str
    sha256: str
    tables: dict[str, int]
    report: dict[str, Any] = Field(default_factory=dict)
    build_seconds: float


# --- routes: the operator's development environment ------------------------------------------

_DEVELOPERS = (Role.REGULATOR,)
_OWNERS = (Role.HEALTH_AUTHORITY,)
_ROOM = "secure room"

PUBLISH_LIBRARY = Route("POST", "/v1/secure-room/libraries", Kind.INGEST, LibraryUpload,
                        LibrarySummary, roles=_OWNERS, tag=_ROOM)
LIBRARIES = Route("GET", "/v1/secure-room/libraries", Kind.CATALOGUE, None,
                  list[LibrarySummary], roles=_DEVELOPERS, tag=_ROOM)
SAMPLE_LIBRARY = Route("GET", "/v1/secure-room/libraries/{name}/sample", Kind.CATALOGUE, None,
                       LibraryDownload, roles=_DEVELOPERS, tag=_ROOM)
SUBMIT_PACKAGE = Route("POST", "/v1/secure-room/packages", Kind.CATALOGUE, PackageUpload,
                       Submission, roles=_DEVELOPERS, tag=_ROOM)
SUBMISSION = Route("GET", "/v1/secure-room/packages/{sha256}", Kind.CATALOGUE, None,
                   Submission, roles=_DEVELOPERS, tag=_ROOM)
RUN_PACKAGE = Route("POST", "/v1/secure-room/packages/{sha256}/run", Kind.CATALOGUE,
                    RunRequest, CatalogueEntry, roles=_DEVELOPERS, tag=_ROOM)
CATALOGUE = Route("GET", "/v1/catalogue", Kind.CATALOGUE, None, list[CatalogueEntry],
                  roles=_DEVELOPERS, tag=_ROOM)
PRODUCT = Route("GET", "/v1/catalogue/{product_id}", Kind.CATALOGUE, None, CatalogueEntry,
                roles=_DEVELOPERS, tag=_ROOM)

# --- routes: the data owner's review, approval and production runs ---------------------------

_OPERATOR = (Role.OPERATOR,)
_APPROVAL = "package approval"

BUILD_LIBRARIES = Route("POST", "/v1/packages/libraries", Kind.ADMIN, LibraryBuild,
                        list[PublishedLibrary], tag=_APPROVAL)
RECEIVE_REVIEW = Route("POST", "/v1/packages/reviews", Kind.PACKAGE, ReviewRequest, Review,
                       roles=_OPERATOR, tag=_APPROVAL)
REVIEWS = Route("GET", "/v1/packages/reviews", Kind.ADMIN, None, list[Review], tag=_APPROVAL)
APPROVE = Route("POST", "/v1/packages/{sha256}/approve", Kind.ADMIN, None, Review,
                tag=_APPROVAL)
PRODUCTION_RUN = Route("POST", "/v1/packages/run", Kind.PACKAGE, ProductionRunRequest,
                       ProductionRun, roles=_OPERATOR, tag=_APPROVAL)
