"""The operator's development environment: libraries, the secure room, the product catalogue.

- The health authority publishes each dataset's **sample** (synthetic) and **test**
  (small, desensitized) libraries here (`api.PUBLISH_LIBRARY`, kind `ingest`).
  The authorized library never comes here: it stays with the data owner.
- The developer (the regulator, product owner) downloads the sample library to work
  on, and submits an algorithm package (`api.SUBMIT_PACKAGE`, kind `catalogue`).
  The secure room runs the static checks, then the package in the OS sandbox against
  the test library (no network, read-only inputs, CPU/memory/wall limits), stores the
  validation report and logs `package_submitted` with the package and report hashes.
  An accepted package goes to the data owner for review.
- An approved package runs at the data owner on the authorized library, on the
  developer's request relayed by the operator; the released output lands in the
  product catalogue (`api.CATALOGUE`) and is logged as `product_published`.
"""

import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam

from governance.packages import load_manifest, package_hash
from parties.ledger.client import append_entry
from parties.runtime.access import Caller
from parties.runtime.context import NodeContext
from parties.runtime.errors import NodeError
from parties.runtime.mount import mount
from parties.runtime.service import Service
from parties.runtime.topology import Role
from parties.secure_room.api import (
    CATALOGUE,
    LIBRARIES,
    LONG_CALL_S,
    MAX_LIBRARY_BYTES,
    MAX_LIBRARY_FILES,
    MAX_PACKAGE_BYTES,
    MAX_PACKAGE_FILES,
    NAME_PATTERN,
    PRODUCT,
    PRODUCT_ID_PATTERN,
    PRODUCTION_RUN,
    PUBLISH_LIBRARY,
    RECEIVE_REVIEW,
    RUN_PACKAGE,
    SAMPLE_LIBRARY,
    SHA256_PATTERN,
    SUBMISSION,
    SUBMIT_PACKAGE,
    CatalogueEntry,
    LibraryDownload,
    LibraryInvalid,
    LibrarySummary,
    LibraryUnavailable,
    LibraryUpload,
    PackageNotValidated,
    PackageUnknown,
    PackageUpload,
    ProductionRunInvalid,
    ProductionRunRequest,
    ProductUnknown,
    ReviewRequest,
    RunRequest,
    SecureRoomError,
    Submission,
    WireFile,
)
from parties.secure_room.events import PRODUCT_PUBLISHED
from parties.secure_room.wire import (
    library_hash,
    library_to_wire,
    records_sha256,
    report_sha256,
    write_wire_files,
)

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
    # How many groups the policy suppressed is the package's to choose: a channel (rev19).
    "ALTER TABLE sr_catalogue DROP COLUMN suppressed_groups",
)


# --- libraries -------------------------------------------------------------------------------


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
    # governance.synthetic loads scipy and scikit-learn: only when a library arrives.
    from governance.synthetic import LibraryError, read_library_info

    names = [f.path for f in upload.files]
    if "library.json" not in names or any("/" in n for n in names):
        raise LibraryInvalid("a library is library.json and flat <table>.parquet files")
    target = library_dir(ctx, upload.name, upload.kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{upload.kind}.", dir=target.parent))
    try:
        write_wire_files(upload.files, stage, max_files=MAX_LIBRARY_FILES,
                         max_bytes=MAX_LIBRARY_BYTES)
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
    found = libraries(ctx, name, kind)
    directory = library_dir(ctx, name, kind)
    if not found or not directory.is_dir():
        raise LibraryUnavailable(f"no {kind} library {name!r} was published here")
    if library_hash(directory) != found[0].sha256:
        raise LibraryInvalid(f"the installed {kind} library {name!r} no longer has its hash")
    return directory


# --- submissions -----------------------------------------------------------------------------


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


def _forward_for_review(ctx: NodeContext, sub: Submission, files: list[WireFile]) -> bool:
    """Hand an accepted package and its report to the data owner; False if unreachable."""
    review = ReviewRequest(files=files, report=sub.report, report_sha256=sub.report_sha256,
                           library=sub.library, submitter=sub.submitter)
    try:
        with ctx.client(LONG_CALL_S) as client:
            client.call(owner_node(ctx), RECEIVE_REVIEW, review)
    except NodeError as exc:  # the owner being down must not lose the submission
        ctx.log.event("review_forward_failed", package=sub.package_sha256, error=str(exc))
        return False
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute("UPDATE sr_packages SET forwarded = 1 WHERE sha256 = ?",
                     (sub.package_sha256,))
    return True


def submit_package(ctx: NodeContext, upload: PackageUpload, submitter: str) -> Submission:
    """Validate a package on the test library in the sandbox; log it; send it for review."""
    # The room loads governance.synthetic (scipy, scikit-learn): only when a package runs.
    from parties.secure_room.room import run_package

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
    append_entry(ctx, "package_submitted", {
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


# --- production runs and the catalogue -------------------------------------------------------


def run_in_production(ctx: NodeContext, sha256: str, request: RunRequest,
                      requester: str) -> CatalogueEntry:
    """Have the data owner run a validated package on its authorized library; catalogue it.

    The owner's refusals (not approved, hash mismatch, bad query tables) reach the
    developer unchanged.
    """
    sub = submission(ctx, sha256)
    if not sub.accepted:
        raise PackageNotValidated(
            f"package {sha256} was not accepted on the test library ({sub.outcome})")
    body = ProductionRunRequest(files=_stored_files(ctx, sha256), query=request.query,
                                requester=requester, contract_id=request.contract_id)
    owner = owner_node(ctx)
    with ctx.client(LONG_CALL_S) as client:
        answer = client.call(owner, PRODUCTION_RUN, body)
    if records_sha256(answer.output) != answer.output_sha256:
        raise ProductionRunInvalid("the released output does not match its hash")
    report = answer.report
    if not report.get("accepted") or answer.output is None:
        # A run that failed in production is reported, not catalogued.
        return CatalogueEntry(
            product_id=answer.run_id, package_sha256=answer.package_sha256, name=sub.name,
            version=sub.version, library="authorized", requester=requester, owner=owner,
            rows=0, output_sha256=answer.output_sha256,
            published_at="", report=report, output=None)
    rows = len(answer.output)
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute(
            "INSERT OR REPLACE INTO sr_catalogue (product_id, package_sha256, name, version,"
            " library, requester, owner, rows, output, output_sha256, report)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (answer.run_id, answer.package_sha256, sub.name, sub.version, "authorized",
             requester, owner, rows, json.dumps(answer.output),
             answer.output_sha256, json.dumps(report)))
    append_entry(ctx, PRODUCT_PUBLISHED, {
        "product_id": answer.run_id, "package": sub.name, "version": sub.version,
        "package_sha256": answer.package_sha256, "output_sha256": answer.output_sha256,
        "rows": rows, "owner": owner, "requester": requester,
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
            " output_sha256, published_at, report, output FROM sr_catalogue"
            " WHERE product_id = ?", (product_id,)).fetchone()
    if row is None:
        raise ProductUnknown(f"no product {product_id!r} in the catalogue")
    entry = CatalogueEntry(
        product_id=row[0], package_sha256=row[1], name=row[2], version=row[3], library=row[4],
        requester=row[5], owner=row[6], rows=row[7], output_sha256=row[8],
        published_at=row[9])
    if full:
        entry.report, entry.output = json.loads(row[10]), json.loads(row[11])
    return entry


# --- routes ----------------------------------------------------------------------------------

Sha256 = Annotated[str, PathParam(pattern=SHA256_PATTERN)]
LibraryName = Annotated[str, PathParam(pattern=NAME_PATTERN)]
ProductId = Annotated[str, PathParam(pattern=PRODUCT_ID_PATTERN)]


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, PUBLISH_LIBRARY)
    def post_library(body: LibraryUpload, caller: Caller) -> LibrarySummary:
        """The data owner publishes a sample or test library (replaces the previous one)."""
        return publish_library(ctx, body, caller.name)

    @mount(router, LIBRARIES)
    def get_libraries(caller: Caller) -> list[LibrarySummary]:
        """Published libraries with their row counts and synthesis reports."""
        return libraries(ctx)

    @mount(router, SAMPLE_LIBRARY)
    def get_sample(name: LibraryName, caller: Caller) -> LibraryDownload:
        """Download the synthetic sample library to develop on (the test library stays here)."""
        directory = _installed_library(ctx, name, "sample")
        summary = libraries(ctx, name, "sample")[0]
        return LibraryDownload(name=name, kind="sample", sha256=summary.sha256,
                               files=library_to_wire(directory))

    @mount(router, SUBMIT_PACKAGE)
    def post_package(body: PackageUpload, caller: Caller) -> Submission:
        """Submit a package: static checks and a sandboxed run on the test library."""
        return submit_package(ctx, body, caller.name)

    @mount(router, SUBMISSION)
    def get_package(sha256: Sha256, caller: Caller) -> Submission:
        """A submission's validation report."""
        return submission(ctx, sha256)

    @mount(router, RUN_PACKAGE)
    def post_run(sha256: Sha256, body: RunRequest, caller: Caller) -> CatalogueEntry:
        """Run an approved package on the authorized library at the owner; catalogue it."""
        return run_in_production(ctx, sha256, body, caller.name)

    @mount(router, CATALOGUE)
    def get_catalogue(caller: Caller) -> list[CatalogueEntry]:
        """The data products published from production runs."""
        return catalogue(ctx)

    @mount(router, PRODUCT)
    def get_product(product_id: ProductId, caller: Caller) -> CatalogueEntry:
        """One product with its report and released output."""
        return catalogue_entry(ctx, product_id)

    return [router]


OPERATOR_SECURE_ROOM_SERVICE = Service(
    name="secure-room",
    roles=(Role.OPERATOR,),
    routers=_routes,
    components=((COMPONENT, MIGRATIONS),),
)
