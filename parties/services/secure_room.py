"""The operator's development environment: libraries, the secure room, the product catalogue.

- The health authority publishes each dataset's **sample** (synthetic) and **test**
  (small, desensitized) libraries here (`/v1/secure-room/libraries`, kind `ingest`).
  The authorized library never comes here: it stays with the data owner.
- The developer (the regulator, product owner) downloads the sample library to work
  on, and submits an algorithm package (`/v1/secure-room/packages`, kind `catalogue`).
  The secure room runs the static checks, then the package in the OS sandbox against
  the test library (no network, read-only inputs, CPU/memory/wall limits), stores the
  validation report and logs `package_submitted` with the package and report hashes.
  An accepted package goes to the data owner for review.
- An approved package runs at the data owner on the authorized library, on the
  developer's request relayed by the operator; the released output lands in the
  product catalogue (`/v1/catalogue`) and is logged as `product_published`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from governance.ledger.events import register_event_kind
from governance.packages import (
    PackageHashMismatch,
    PackageInvalid,
    PackageNotApproved,
    load_manifest,
    package_files,
    package_hash,
)
from parties.runtime.access import Caller, CallerPolicy
from parties.runtime.client import NodeClient
from parties.runtime.context import NodeContext
from parties.runtime.errors import NodeError, RemoteError
from parties.runtime.service import Service
from parties.runtime.topology import Role
from parties.services.ledger import record_event


class SecureRoomError(NodeError):
    """Base of the secure-room service's errors.

    (`parties.secure_room` has its own base; importing it pulls in scipy and scikit-learn,
    which every node would then load at start: its errors are imported where raised.)
    """

    http_status = 400


# Events of this part of the lifecycle that the log did not know yet.
PACKAGE_RUN = register_event_kind("package_run")
PACKAGE_RUN_REFUSED = register_event_kind("package_run_refused")
PRODUCT_PUBLISHED = register_event_kind("product_published")

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
FILE_PATH_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}){0,7}$"
MAX_PACKAGE_FILES = 64
MAX_PACKAGE_BYTES = 2 * 1024**2
MAX_LIBRARY_FILES = 16
LIBRARY_HASH_DOMAIN = b"cogov-library-v1\x00"
DEVELOPMENT_KINDS = ("sample", "test")
LONG_CALL_S = 900.0

COMPONENT = "secure_room"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sr_libraries (
        name TEXT NOT NULL, kind TEXT NOT NULL, sha256 TEXT NOT NULL, tables TEXT NOT NULL,
        reports TEXT NOT NULL, owner TEXT NOT NULL,
        published_at TEXT NOT NULL DEFAULT (datetime('now')), PRIMARY KEY (name, kind)
    );
    CREATE TABLE sr_packages (
        sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL,
        library TEXT NOT NULL, submitter TEXT NOT NULL, files TEXT NOT NULL,
        report TEXT NOT NULL, report_sha256 TEXT NOT NULL, outcome TEXT NOT NULL,
        accepted INTEGER NOT NULL, forwarded INTEGER NOT NULL DEFAULT 0,
        submitted_at TEXT NOT NULL DEFAULT (datetime('now'))
    );
    CREATE TABLE sr_catalogue (
        product_id TEXT PRIMARY KEY, package_sha256 TEXT NOT NULL, name TEXT NOT NULL,
        version TEXT NOT NULL, library TEXT NOT NULL, requester TEXT NOT NULL,
        owner TEXT NOT NULL, rows INTEGER NOT NULL, suppressed_groups INTEGER NOT NULL,
        output TEXT NOT NULL, output_sha256 TEXT NOT NULL, report TEXT NOT NULL,
        published_at TEXT NOT NULL DEFAULT (datetime('now'))
    )
    """,
)


class PackageUnknown(SecureRoomError):
    """No package with this hash was submitted to the secure room."""

    http_status = 404


class PackageNotValidated(SecureRoomError):
    """The package failed validation on the test library; it never goes to production."""

    http_status = 409


class LibraryUnavailable(SecureRoomError):
    """The library was not published here (or is not one a developer may download)."""

    http_status = 404


class ProductUnknown(SecureRoomError):
    http_status = 404


class ProductionRunInvalid(SecureRoomError):
    """The data owner's answer does not match its own output hash."""

    http_status = 502


# --- files on the wire ---------------------------------------------------------------------


class WireFile(BaseModel):
    path: Annotated[str, Field(pattern=FILE_PATH_PATTERN)]
    content_b64: str


def files_to_wire(root: Path, files: list[Path]) -> list[WireFile]:
    return [WireFile(path=p.relative_to(root).as_posix(),
                     content_b64=base64.b64encode(p.read_bytes()).decode("ascii"))
            for p in files]


def package_to_wire(package_dir: Path | str) -> list[WireFile]:
    """Exactly the files the package hash covers (no __pycache__, no package.sha256)."""
    root = Path(package_dir)
    return files_to_wire(root, package_files(root))


def write_wire_files(files: list[WireFile], target: Path, *, max_files: int,
                     max_bytes: int) -> None:
    """Decode files into the empty directory `target`; malformed input raises PackageInvalid."""
    if not files or len(files) > max_files:
        raise PackageInvalid(f"expected 1 to {max_files} files, got {len(files)}")
    seen: set[str] = set()
    total = 0
    decoded: list[tuple[str, bytes]] = []
    for item in files:
        parts = item.path.split("/")
        if item.path in seen or any(p in ("..", ".", "__pycache__") for p in parts):
            raise PackageInvalid(f"file path {item.path!r} is duplicated or not allowed")
        seen.add(item.path)
        try:
            data = base64.b64decode(item.content_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PackageInvalid(f"{item.path}: content is not base64") from exc
        total += len(data)
        if total > max_bytes:
            raise PackageInvalid(f"files exceed {max_bytes} bytes")
        decoded.append((item.path, data))
    for rel, data in decoded:
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def library_hash(directory: Path | str) -> str:
    """SHA-256 over a library directory's files (length-prefixed names and bytes)."""
    root = Path(directory)
    digest = hashlib.sha256(LIBRARY_HASH_DOMAIN)
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        name, data = path.name.encode(), path.read_bytes()
        digest.update(len(name).to_bytes(8, "big") + name)
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def records_sha256(records: list[dict] | dict | None) -> str:
    """The hash both sides compute over a released output (canonical JSON)."""
    body = json.dumps(records, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def report_sha256(report: dict[str, Any]) -> str:
    """The hash of a report both sides recompute (canonical JSON of its fields)."""
    return records_sha256(report)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- messages ------------------------------------------------------------------------------


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
    library: Annotated[str, Field(pattern=NAME_PATTERN)] = "claim_check"


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


class RunRequest(BaseModel):
    """Query tables (the requester's inputs, e.g. claims) sealed to the data owner."""

    query: Annotated[dict[Annotated[str, Field(pattern=NAME_PATTERN)], str],
                     Field(max_length=8)] = Field(default_factory=dict)


class ProductionRunRequest(BaseModel):
    files: Annotated[list[WireFile], Field(min_length=1, max_length=MAX_PACKAGE_FILES)]
    query: dict[str, str] = Field(default_factory=dict)
    requester: str


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
    suppressed_groups: int
    output_sha256: str
    published_at: str
    report: dict[str, Any] | None = None
    output: list[dict] | None = None


# --- the operator's side -------------------------------------------------------------------


def _root(ctx: NodeContext) -> Path:
    return ctx.paths.root / "secure_room"


def library_dir(ctx: NodeContext, name: str, kind: str) -> Path:
    return _root(ctx) / "libraries" / name / kind


def owner_node(ctx: NodeContext) -> str:
    nodes = ctx.topology.nodes_with_role(Role.HEALTH_AUTHORITY)
    if not nodes:
        raise SecureRoomError("the topology has no health authority to own the data")
    return nodes[0].name


def publish_library(ctx: NodeContext, upload: LibraryUpload, owner: str) -> LibrarySummary:
    """Install a published library atomically after checking its hash and its tier."""
    from governance.synthetic import LibraryError, read_library_info
    from parties.secure_room.errors import LibraryInvalid

    names = [f.path for f in upload.files]
    if "library.json" not in names or any("/" in n for n in names):
        raise LibraryInvalid("a library is library.json and flat <table>.parquet files")
    target = library_dir(ctx, upload.name, upload.kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{upload.kind}.", dir=target.parent))
    try:
        write_wire_files(upload.files, stage, max_files=MAX_LIBRARY_FILES,
                         max_bytes=256 * 1024**2)
        actual = library_hash(stage)
        if actual != upload.sha256:
            raise LibraryInvalid(f"library hash {actual} differs from the announced "
                                 f"{upload.sha256}")
        try:
            info = read_library_info(stage)
        except LibraryError as exc:
            raise LibraryInvalid(str(exc)) from exc
        if info.kind != upload.kind:
            raise LibraryInvalid(f"library.json says {info.kind!r}, published as {upload.kind!r}")
        old = None
        if target.exists():
            old = target.with_name(f".old-{uuid.uuid4().hex}")
            target.rename(old)
        stage.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    tables = {n: t.rows for n, t in info.tables.items()}
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute(
            "INSERT OR REPLACE INTO sr_libraries (name, kind, sha256, tables, reports, owner)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (upload.name, upload.kind, upload.sha256, json.dumps(tables),
             json.dumps(info.reports), owner))
    ctx.log.event("library_installed", name=upload.name, kind=upload.kind, sha256=upload.sha256)
    return libraries(ctx, upload.name, upload.kind)[0]


def libraries(ctx: NodeContext, name: str | None = None,
              kind: str | None = None) -> list[LibrarySummary]:
    with ctx.store.lock:
        rows = ctx.store.conn.execute(
            "SELECT name, kind, sha256, owner, tables, reports, published_at FROM sr_libraries"
            " WHERE (? IS NULL OR name = ?) AND (? IS NULL OR kind = ?) ORDER BY name, kind",
            (name, name, kind, kind)).fetchall()
    return [LibrarySummary(name=r[0], kind=r[1], sha256=r[2], owner=r[3],
                           tables=json.loads(r[4]), reports=json.loads(r[5]), published_at=r[6])
            for r in rows]


def _installed_library(ctx: NodeContext, name: str, kind: str) -> Path:
    from parties.secure_room.errors import LibraryInvalid

    found = libraries(ctx, name, kind)
    directory = library_dir(ctx, name, kind)
    if not found or not directory.is_dir():
        raise LibraryUnavailable(f"no {kind} library {name!r} was published here")
    if library_hash(directory) != found[0].sha256:
        raise LibraryInvalid(f"the installed {kind} library {name!r} no longer has its hash")
    return directory


def _submission(row: tuple) -> Submission:
    (sha, name, version, library, submitter, report, report_sha, outcome, accepted, forwarded,
     at) = row
    return Submission(package_sha256=sha, name=name, version=version, library=library,
                      submitter=submitter, report=json.loads(report), report_sha256=report_sha,
                      outcome=outcome, accepted=bool(accepted),
                      forwarded_for_review=bool(forwarded), submitted_at=at)


_SUBMISSION_COLUMNS = ("sha256, name, version, library, submitter, report, report_sha256,"
                       " outcome, accepted, forwarded, submitted_at")


def submission(ctx: NodeContext, sha256: str) -> Submission:
    with ctx.store.lock:
        row = ctx.store.conn.execute(
            f"SELECT {_SUBMISSION_COLUMNS} FROM sr_packages WHERE sha256 = ?",
            (sha256,)).fetchone()
    if row is None:
        raise PackageUnknown(f"no package {sha256} was submitted")
    return _submission(row)


def _stored_files(ctx: NodeContext, sha256: str) -> list[WireFile]:
    with ctx.store.lock:
        row = ctx.store.conn.execute(
            "SELECT files FROM sr_packages WHERE sha256 = ?", (sha256,)).fetchone()
    if row is None:
        raise PackageUnknown(f"no package {sha256} was submitted")
    return [WireFile.model_validate(f) for f in json.loads(row[0])]


def _long_client(ctx: NodeContext) -> NodeClient:
    return NodeClient(ctx.state, ctx.topology, ctx.name, log=ctx.log, timeout=LONG_CALL_S)


def _forward_for_review(ctx: NodeContext, sub: Submission, files: list[WireFile]) -> bool:
    """Hand an accepted package and its report to the data owner; False if unreachable."""
    review = ReviewRequest(files=files, report=sub.report, report_sha256=sub.report_sha256,
                           library=sub.library, submitter=sub.submitter)
    try:
        with _long_client(ctx) as client:
            client.post(owner_node(ctx), "/v1/packages/reviews", kind="package",
                        json=review.model_dump(mode="json"))
    except NodeError as exc:  # the owner being down must not lose the submission
        ctx.log.event("review_forward_failed", package=sub.package_sha256, error=str(exc))
        return False
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute("UPDATE sr_packages SET forwarded = 1 WHERE sha256 = ?",
                     (sub.package_sha256,))
    return True


def submit_package(ctx: NodeContext, upload: PackageUpload, submitter: str) -> Submission:
    """Validate a package on the test library in the sandbox; log it; send it for review."""
    from parties.secure_room import run_package

    with tempfile.TemporaryDirectory(prefix="cogov-submission-") as work:
        package_dir = Path(work) / "pkg"
        package_dir.mkdir()
        write_wire_files(upload.files, package_dir, max_files=MAX_PACKAGE_FILES,
                         max_bytes=MAX_PACKAGE_BYTES)
        manifest = load_manifest(package_dir)
        sha = package_hash(package_dir)
        try:
            known = submission(ctx, sha)
        except PackageUnknown:
            known = None
        if known is not None:  # the same bytes were validated before: same report
            if known.accepted and not known.forwarded_for_review:
                known.forwarded_for_review = _forward_for_review(ctx, known, upload.files)
            return known
        test_library = _installed_library(ctx, upload.library, "test")
        run = run_package(package_dir, test_library)
    report_json = run.report.model_dump_json()
    report_sha = report_sha256(json.loads(report_json))
    files_json = json.dumps([f.model_dump() for f in upload.files])
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute(
            "INSERT OR IGNORE INTO sr_packages (sha256, name, version, library, submitter,"
            " files, report, report_sha256, outcome, accepted) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (sha, manifest.name, manifest.version, upload.library, submitter, files_json,
             report_json, report_sha, run.report.outcome, int(run.report.accepted)))
    record_event(ctx, "package_submitted", {
        "package": manifest.name, "version": manifest.version, "package_sha256": sha,
        "report_sha256": report_sha, "library": upload.library, "submitter": submitter,
        "outcome": run.report.outcome, "accepted": run.report.accepted,
        "static_errors": sum(f.severity == "error" for f in run.report.static_findings),
        "wall_ms": int((run.report.wall_seconds or 0) * 1000),
    })
    ctx.log.event("package_validated", package=sha, outcome=run.report.outcome,
                  wall_seconds=run.report.wall_seconds)
    sub = submission(ctx, sha)
    if sub.accepted:
        sub.forwarded_for_review = _forward_for_review(ctx, sub, upload.files)
    return sub


# The data owner's refusals the operator passes on under their own names.
_OWNER_REFUSALS: dict[str, type[Exception]] = {
    "PackageNotApproved": PackageNotApproved,
    "PackageHashMismatch": PackageHashMismatch,
}


def run_in_production(ctx: NodeContext, sha256: str, request: RunRequest,
                      requester: str) -> CatalogueEntry:
    """Have the data owner run a validated package on its authorized library; catalogue it."""
    sub = submission(ctx, sha256)
    if not sub.accepted:
        raise PackageNotValidated(
            f"package {sha256} was not accepted on the test library ({sub.outcome})")
    body = ProductionRunRequest(files=_stored_files(ctx, sha256), query=request.query,
                                requester=requester)
    owner = owner_node(ctx)
    try:
        with _long_client(ctx) as client:
            answer = ProductionRun.model_validate(client.post(
                owner, "/v1/packages/run", kind="package",
                json=body.model_dump(mode="json")).json())
    except RemoteError as exc:
        known = _OWNER_REFUSALS.get(exc.error)
        if known is not None:
            raise known(f"{owner} refused: {exc.detail}") from exc
        raise
    if records_sha256(answer.output) != answer.output_sha256:
        raise ProductionRunInvalid("the released output does not match its hash")
    report = answer.report
    if not report.get("accepted") or answer.output is None:
        # A run that failed in production is reported, not catalogued.
        return CatalogueEntry(
            product_id=answer.run_id, package_sha256=answer.package_sha256, name=sub.name,
            version=sub.version, library="authorized", requester=requester, owner=owner,
            rows=0, suppressed_groups=0, output_sha256=answer.output_sha256,
            published_at="", report=report, output=None)
    rows = len(answer.output)
    suppressed = int(report.get("suppressed_groups") or 0)
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute(
            "INSERT OR REPLACE INTO sr_catalogue (product_id, package_sha256, name, version,"
            " library, requester, owner, rows, suppressed_groups, output, output_sha256, report)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (answer.run_id, answer.package_sha256, sub.name, sub.version, "authorized",
             requester, owner, rows, suppressed, json.dumps(answer.output),
             answer.output_sha256, json.dumps(report)))
    record_event(ctx, PRODUCT_PUBLISHED, {
        "product_id": answer.run_id, "package": sub.name, "version": sub.version,
        "package_sha256": answer.package_sha256, "output_sha256": answer.output_sha256,
        "rows": rows, "suppressed_groups": suppressed, "owner": owner, "requester": requester,
    })
    return catalogue_entry(ctx, answer.run_id)


def catalogue(ctx: NodeContext) -> list[CatalogueEntry]:
    with ctx.store.lock:
        ids = [r[0] for r in ctx.store.conn.execute(
            "SELECT product_id FROM sr_catalogue ORDER BY published_at, product_id").fetchall()]
    return [catalogue_entry(ctx, i, full=False) for i in ids]


def catalogue_entry(ctx: NodeContext, product_id: str, *, full: bool = True) -> CatalogueEntry:
    with ctx.store.lock:
        row = ctx.store.conn.execute(
            "SELECT product_id, package_sha256, name, version, library, requester, owner, rows,"
            " suppressed_groups, output_sha256, published_at, report, output FROM sr_catalogue"
            " WHERE product_id = ?", (product_id,)).fetchone()
    if row is None:
        raise ProductUnknown(f"no product {product_id!r} in the catalogue")
    entry = CatalogueEntry(
        product_id=row[0], package_sha256=row[1], name=row[2], version=row[3], library=row[4],
        requester=row[5], owner=row[6], rows=row[7], suppressed_groups=row[8],
        output_sha256=row[9], published_at=row[10])
    if full:
        entry.report, entry.output = json.loads(row[11]), json.loads(row[12])
    return entry


# --- routes --------------------------------------------------------------------------------

Sha256 = Annotated[str, PathParam(pattern=SHA256_PATTERN)]
LibraryName = Annotated[str, PathParam(pattern=NAME_PATTERN)]


def _routes(ctx: NodeContext) -> list[APIRouter]:
    room = APIRouter(prefix="/v1/secure-room", tags=["secure room"])
    developers = CallerPolicy("catalogue", (Role.REGULATOR,))
    owners = CallerPolicy("ingest", (Role.HEALTH_AUTHORITY,))

    @room.post("/libraries", response_model=LibrarySummary)
    def post_library(upload: LibraryUpload, caller: Caller = Depends(owners)) -> LibrarySummary:
        """The data owner publishes a sample or test library (replaces the previous one)."""
        return publish_library(ctx, upload, caller.name)

    @room.get("/libraries", response_model=list[LibrarySummary])
    def get_libraries(caller: Caller = Depends(developers)) -> list[LibrarySummary]:
        """Published libraries with their row counts and synthesis reports."""
        return libraries(ctx)

    @room.get("/libraries/{name}/sample", response_model=LibraryDownload)
    def get_sample(name: LibraryName, caller: Caller = Depends(developers)) -> LibraryDownload:
        """Download the synthetic sample library to develop on (the test library stays here)."""
        directory = _installed_library(ctx, name, "sample")
        summary = libraries(ctx, name, "sample")[0]
        files = files_to_wire(directory, sorted(p for p in directory.iterdir() if p.is_file()))
        return LibraryDownload(name=name, kind="sample", sha256=summary.sha256, files=files)

    @room.post("/packages", response_model=Submission)
    def post_package(upload: PackageUpload, caller: Caller = Depends(developers)) -> Submission:
        """Submit a package: static checks and a sandboxed run on the test library."""
        return submit_package(ctx, upload, caller.name)

    @room.get("/packages/{sha256}", response_model=Submission)
    def get_package(sha256: Sha256, caller: Caller = Depends(developers)) -> Submission:
        """A submission's validation report."""
        return submission(ctx, sha256)

    @room.post("/packages/{sha256}/run", response_model=CatalogueEntry)
    def post_run(sha256: Sha256, request: RunRequest,
                 caller: Caller = Depends(developers)) -> CatalogueEntry:
        """Run an approved package on the authorized library at the owner; catalogue it."""
        return run_in_production(ctx, sha256, request, caller.name)

    shop = APIRouter(prefix="/v1/catalogue", tags=["secure room"])

    @shop.get("", response_model=list[CatalogueEntry])
    def get_catalogue(caller: Caller = Depends(developers)) -> list[CatalogueEntry]:
        """The data products published from production runs."""
        return catalogue(ctx)

    @shop.get("/{product_id}", response_model=CatalogueEntry)
    def get_product(product_id: Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$")],
                    caller: Caller = Depends(developers)) -> CatalogueEntry:
        """One product with its report and released output."""
        return catalogue_entry(ctx, product_id)

    return [room, shop]


def new_run_id() -> str:
    return os.urandom(16).hex()


OPERATOR_SECURE_ROOM_SERVICE = Service(
    name="secure-room",
    roles=(Role.OPERATOR,),
    routers=_routes,
    components=((COMPONENT, MIGRATIONS),),
)
