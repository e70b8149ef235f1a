"""The data owner's side of in-air development: review, approval, production runs.

The owner reviews the secure room's report, signs an approval bound to the package hash
with its node signing key (`package_approved` in the log), and runs only packages whose
content has the approved hash, in the sandbox, under the output policy; every run is
metered in the log (`package_run`), every refusal logged (`package_run_refused`).

A run is also a use of the data under contract, like a claim check: the requester names a
package-run contract (scenario `package_run`, registered at the serving node) that is in
force, names the package's output (`package.<name>`) and allows the owner-table columns the
package reads. The owner fetches it from the serving node, verifies every party's signature
itself, looks in the log for its termination, and reserves the run against the contract's
daily quota before a single authorized row is opened. The `package_run` meter, with the
CPU and wall time this node measured, is logged before the output is released; the bill
counts it (`governance.meters`).

A production run reads the **authorized** library, built for that run in a temporary
directory from the governed visits (pseudonymized under a fresh key, as the development
libraries are) and the requester's query tables, sealed to this node and tokenized here
with k1. It never leaves the node; only the output the policy releases does.
"""

import base64
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import pandas as pd
from fastapi import APIRouter
from fastapi import Path as PathParam

from governance.contracts import (
    ContractError,
    ContractNotSigned,
    ContractTerminated,
    ContractUnknown,
    OutputNotAllowed,
)
from governance.ledger import EventKind, decode_leaf
from governance.packages import (
    PackageApproval,
    PackageError,
    PackageManifest,
    approve_package,
    load_manifest,
    package_hash,
    verify_approval,
)
from mpc import xid
from parties.agreements.api import (
    CONTRACT,
    PACKAGE_RUN_SCENARIO,
    package_output,
    required_signatories,
    serving_node,
)
from parties.agreements.books import contract_book
from parties.domains.keys import level1_key
from parties.ingest.governed import VISITS_TABLE
from parties.ledger.api import ENTRIES, MAX_ENTRIES_PER_READ, log_node
from parties.ledger.client import append_entry
from parties.runtime.access import Caller
from parties.runtime.context import NodeContext
from parties.runtime.errors import RemoteError
from parties.runtime.mount import mount
from parties.runtime.service import Service
from parties.runtime.topology import Role
from parties.secure_room.api import (
    APPROVE,
    BUILD_LIBRARIES,
    LONG_CALL_S,
    MAX_PACKAGE_BYTES,
    MAX_PACKAGE_FILES,
    PRODUCTION_RUN,
    RECEIVE_REVIEW,
    REVIEWS,
    SHA256_PATTERN,
    LibraryBuild,
    ProductionRun,
    ProductionRunRequest,
    PublishedLibrary,
    QueryTablesInvalid,
    Review,
    ReviewInvalid,
    ReviewRequest,
    ReviewUnknown,
    ValidationNotPassed,
    WireFile,
)
from parties.secure_room.events import PACKAGE_RUN, PACKAGE_RUN_REFUSED
from parties.secure_room.libraries import authorized_visits, build_libraries, pseudonym
from parties.secure_room.query_tables import open_query_table
from parties.secure_room.sandbox import SandboxLimits
from parties.secure_room.wire import (
    records_sha256,
    report_sha256,
    text_sha256,
    write_wire_files,
)

K_ANONYMITY = 10
OWNER_TABLES = ("visits",)  # what the owner's authorized library holds; query tables may not
PRODUCTION_LIMITS = {"cpu_seconds": 60, "memory_bytes": 2 * 1024**3, "wall_seconds": 120.0}

COMPONENT = "package_approval"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE pa_reviews (
        sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL,
        library TEXT NOT NULL, submitter TEXT NOT NULL, files TEXT NOT NULL,
        report TEXT NOT NULL, report_sha256 TEXT NOT NULL,
        received_at TEXT NOT NULL DEFAULT (datetime('now'))
    );
    CREATE TABLE pa_approvals (
        sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL,
        approval TEXT NOT NULL, approved_at TEXT NOT NULL DEFAULT (datetime('now'))
    );
    CREATE TABLE pa_libraries (
        name TEXT NOT NULL, kind TEXT NOT NULL, sha256 TEXT NOT NULL, tables TEXT NOT NULL,
        report TEXT NOT NULL, published_at TEXT NOT NULL DEFAULT (datetime('now')),
        PRIMARY KEY (name, kind)
    );
    CREATE TABLE pa_runs (
        run_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL, requester TEXT NOT NULL,
        outcome TEXT NOT NULL, accepted INTEGER NOT NULL, rows_in INTEGER NOT NULL,
        rows_out INTEGER NOT NULL, suppressed_groups INTEGER NOT NULL, wall_ms INTEGER NOT NULL,
        output_sha256 TEXT NOT NULL, at TEXT NOT NULL DEFAULT (datetime('now'))
    )
    """,
)


# --- review and approval ---------------------------------------------------------------------


def receive_review(ctx: NodeContext, request: ReviewRequest) -> Review:
    """Keep a validated package and its report until the owner decides."""
    with tempfile.TemporaryDirectory(prefix="cogov-review-") as work:
        root = Path(work)
        write_wire_files(request.files, root, max_files=MAX_PACKAGE_FILES,
                         max_bytes=MAX_PACKAGE_BYTES)
        manifest = load_manifest(root)
        sha = package_hash(root)
    if report_sha256(request.report) != request.report_sha256:
        raise ReviewInvalid("the report does not have the announced hash")
    if request.report.get("package_sha256") != sha:
        raise ReviewInvalid(f"the report covers {request.report.get('package_sha256')}, "
                            f"the files hash to {sha}")
    files = json.dumps([f.model_dump() for f in request.files])
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute(
            "INSERT OR IGNORE INTO pa_reviews (sha256, name, version, library, submitter, files,"
            " report, report_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (sha, manifest.name, manifest.version, request.library, request.submitter, files,
             json.dumps(request.report), request.report_sha256))
    ctx.log.event("package_received_for_review", package=sha, name=manifest.name)
    return review(ctx, sha)


def reviews(ctx: NodeContext) -> list[Review]:
    with ctx.store.lock:
        shas = [r[0] for r in ctx.store.conn.execute(
            "SELECT sha256 FROM pa_reviews ORDER BY received_at, sha256").fetchall()]
    return [review(ctx, s) for s in shas]


def review(ctx: NodeContext, sha256: str) -> Review:
    with ctx.store.lock:
        row = ctx.store.conn.execute(
            "SELECT sha256, name, version, library, submitter, report, report_sha256,"
            " received_at FROM pa_reviews WHERE sha256 = ?", (sha256,)).fetchone()
        approval = ctx.store.conn.execute(
            "SELECT approval FROM pa_approvals WHERE sha256 = ?", (sha256,)).fetchone()
    if row is None:
        raise ReviewUnknown(f"no package {sha256} was handed over for review")
    return Review(package_sha256=row[0], name=row[1], version=row[2], library=row[3],
                  submitter=row[4], report=json.loads(row[5]), report_sha256=row[6],
                  received_at=row[7],
                  approval=PackageApproval.model_validate_json(approval[0]) if approval else None)


def _review_files(ctx: NodeContext, sha256: str) -> list[WireFile]:
    with ctx.store.lock:
        row = ctx.store.conn.execute(
            "SELECT files FROM pa_reviews WHERE sha256 = ?", (sha256,)).fetchone()
    if row is None:
        raise ReviewUnknown(f"no package {sha256} was handed over for review")
    return [WireFile.model_validate(f) for f in json.loads(row[0])]


def approve(ctx: NodeContext, sha256: str) -> Review:
    """Sign an approval of exactly this package hash with the node's signing key."""
    found = review(ctx, sha256)
    if found.approval is not None:
        return found
    report = found.report
    if not (report.get("accepted") and report.get("library") == "test"):
        raise ValidationNotPassed(
            f"the secure room's report on the test library says {report.get('outcome')!r}")
    with tempfile.TemporaryDirectory(prefix="cogov-approve-") as work:
        root = Path(work)
        write_wire_files(_review_files(ctx, sha256), root, max_files=MAX_PACKAGE_FILES,
                         max_bytes=MAX_PACKAGE_BYTES)
        if package_hash(root) != sha256:
            raise ReviewInvalid("the stored package no longer has the reviewed hash")
        approval = approve_package(root, ctx.signing_key, ctx.name)
    body = approval.model_dump_json()
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute("INSERT INTO pa_approvals (sha256, name, version, approval) "
                     "VALUES (?, ?, ?, ?)", (sha256, found.name, found.version, body))
    append_entry(ctx, "package_approved", {
        "package": found.name, "version": found.version, "package_sha256": sha256,
        "report_sha256": found.report_sha256, "approval_sha256": text_sha256(body),
        "submitter": found.submitter,
    })
    return review(ctx, sha256)


def approval_for(ctx: NodeContext, name: str, version: str) -> PackageApproval | None:
    """The latest approval of package `name` `version`, whatever hash it was bound to."""
    with ctx.store.lock:
        row = ctx.store.conn.execute(
            "SELECT approval FROM pa_approvals WHERE name = ? AND version = ?"
            " ORDER BY approved_at DESC, rowid DESC LIMIT 1", (name, version)).fetchone()
    return PackageApproval.model_validate_json(row[0]) if row else None


# --- production runs -------------------------------------------------------------------------


def _authorized_library(ctx: NodeContext, directory: Path, query: dict[str, pd.DataFrame],
                        key: bytes) -> int:
    """Write this run's authorized library; the query tables' persons as the same pseudonyms."""
    from governance.synthetic import write_library

    tables = {"visits": authorized_visits(ctx, key)}
    k1 = level1_key(ctx)
    for name, frame in query.items():
        if "national_id" in frame.columns:
            ids = frame["national_id"].astype(str).tolist()
            frame = frame.assign(national_id=[pseudonym(key, p) for p in xid.tokenize(k1, ids)])
        tables[name] = frame
    write_library(directory, "authorized", tables)
    return len(tables["visits"])


def authorize_run(ctx: NodeContext, request: ProductionRunRequest, manifest: PackageManifest,
                  run_id: str) -> None:
    """Reserve this run against its package-run contract, or raise a `ContractError`.

    The contract comes from the serving node, which shows it only to its parties; this
    node registers it in its own book, so every signature is verified here, and a serving
    node that later shows other terms under the same id is refused (`ContractConflict`).
    """
    serving = serving_node(ctx.topology)
    try:
        with ctx.client(LONG_CALL_S) as client:
            contract = client.call(serving, CONTRACT, params={"contract_id": request.contract_id})
    except RemoteError as exc:
        if exc.error == "ContractUnknown":
            raise ContractUnknown(f"no contract {request.contract_id}") from None
        raise
    terms = contract.terms
    if terms.scenario != PACKAGE_RUN_SCENARIO:
        raise OutputNotAllowed(f"{terms.contract_id} is not a {PACKAGE_RUN_SCENARIO} contract")
    missing = sorted(required_signatories(ctx.topology, terms.scenario) - set(terms.parties))
    if missing:
        raise ContractNotSigned(f"{terms.contract_id} lacks the parties {missing}")
    if _terminated_in_log(ctx, terms.contract_id, serving):
        raise ContractTerminated(f"{terms.contract_id} was terminated at the serving node")
    now = datetime.now(UTC)
    book = contract_book(ctx)
    book.register(contract, now)
    columns = sorted({c for i in manifest.inputs if i.dataset in OWNER_TABLES for c in i.columns})
    with ctx.store.lock:
        rows = ctx.store.conn.execute(f"SELECT COUNT(*) FROM {VISITS_TABLE}").fetchone()[0]
    book.authorize(terms.contract_id, request.requester, columns,
                   [package_output(manifest.name)], now, rows, request_id=run_id)


def _terminated_in_log(ctx: NodeContext, contract_id: str, serving: str) -> bool:
    """Whether the log holds the serving node's `contract_terminated` entry for the contract.

    Terminations are filed at the serving node, which logs them; the owner reads the whole
    log through the transparency API (package runs are rare, the log is read in pages).
    """
    operator = log_node(ctx.topology)
    start = 0
    with ctx.client(LONG_CALL_S) as client:
        while True:
            page = client.call(operator, ENTRIES, query={
                "start": start, "end": start + MAX_ENTRIES_PER_READ})
            for leaf in page.leaves:
                event = decode_leaf(base64.b64decode(leaf)).entry.event
                if (event.kind == EventKind.CONTRACT_TERMINATED and event.actor == serving
                        and event.payload.get("contract_id") == contract_id):
                    return True
            if len(page.leaves) < MAX_ENTRIES_PER_READ:
                return False
            start += len(page.leaves)


def power_of_two_class(value: int) -> int:
    """The smallest power of two at least `value` (0 stays 0): log2 of the range in bits."""
    return 0 if value <= 0 else 1 << (value - 1).bit_length()


def run_approved(ctx: NodeContext, request: ProductionRunRequest) -> ProductionRun:
    """Run a package on the authorized library if, and only if, its hash is approved."""
    # The room loads governance.synthetic (scipy, scikit-learn): only when a package runs.
    from parties.secure_room.room import run_package

    run_id = os.urandom(16).hex()
    owner_key = ctx.signing_key.public_key()
    with tempfile.TemporaryDirectory(prefix="cogov-production-") as work:
        package_dir = Path(work) / "pkg"
        package_dir.mkdir()
        write_wire_files(request.files, package_dir, max_files=MAX_PACKAGE_FILES,
                         max_bytes=MAX_PACKAGE_BYTES)
        manifest = load_manifest(package_dir)
        sha = package_hash(package_dir)
        try:
            # Before a single authorized row is opened.
            verify_approval(package_dir, approval_for(ctx, manifest.name, manifest.version),
                            owner_key)
            bad = sorted(set(request.query) & set(OWNER_TABLES))
            if bad:
                raise QueryTablesInvalid(f"query tables may not replace owner tables {bad}")
            missing = sorted({i.dataset for i in manifest.inputs} - set(OWNER_TABLES)
                             - set(request.query))
            if missing:
                raise QueryTablesInvalid(f"the package reads {missing}, which the owner does "
                                         "not hold: send them as query tables")
            query = {n: open_query_table(ctx.signing_key, ctx.name, n, s, sha)
                     for n, s in request.query.items()}
            authorize_run(ctx, request, manifest, run_id)  # last: a refused run spends no quota
        except (PackageError, QueryTablesInvalid, ContractError) as exc:
            append_entry(ctx, PACKAGE_RUN_REFUSED, {
                "run_id": run_id, "package": manifest.name, "version": manifest.version,
                "package_sha256": sha, "requester": request.requester,
                "contract_id": request.contract_id,
                "error": type(exc).__name__, "library": "authorized",
            })
            ctx.log.event("package_run_refused", package=sha, error=type(exc).__name__)
            raise
        library = Path(work) / "authorized"
        rows_in = _authorized_library(ctx, library, query, os.urandom(32))
        run = run_package(package_dir, library, limits=SandboxLimits(**PRODUCTION_LIMITS),
                          k=K_ANONYMITY,
                          approval=approval_for(ctx, manifest.name, manifest.version),
                          owner_public_key=owner_key)
    report, measured = run.report, run.diagnostics
    output_sha = records_sha256(run.output)
    rows_out = len(run.output or [])
    wall_ms = int(measured.wall_seconds * 1000) if measured else 0
    compute_ms = int(measured.cpu_seconds * 1000) if measured else 0
    peak_kib = (measured.peak_memory_bytes or 0) // 1024 if measured else 0
    suppressed = (measured.suppressed_groups or 0) if measured else 0
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute(
            "INSERT INTO pa_runs (run_id, sha256, requester, outcome, accepted, rows_in,"
            " rows_out, suppressed_groups, wall_ms, output_sha256) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (run_id, sha, request.requester, report.outcome, int(report.accepted), rows_in,
             rows_out, suppressed, wall_ms, output_sha))
    # The meter: a QueryMeter-shaped payload, so a contract can bill package runs. The log
    # is public and the package sets its own CPU time, wall time and peak memory: they
    # go there as power-of-two classes only (rev19), the precise figures to this node's log.
    append_entry(ctx, PACKAGE_RUN, {
        "run_id": run_id, "package": manifest.name, "version": manifest.version,
        "package_sha256": sha, "party": request.requester, "library": "authorized",
        "contract_id": request.contract_id,
        "outcome": report.outcome, "accepted": report.accepted,
        "records_touched": rows_in, "rows_returned": rows_out,
        "compute_ms": power_of_two_class(compute_ms),
        "wall_ms": power_of_two_class(wall_ms),
        "peak_memory_kib": power_of_two_class(peak_kib),
        "output_sha256": output_sha,
    })
    # The run's stderr and the policy's message name columns and may carry data: they
    # stay in this node's log; the requester gets the outcome and the policy's decision.
    ctx.log.event("package_run", package=sha, outcome=report.outcome, wall_ms=wall_ms,
                  compute_ms=compute_ms, peak_memory_kib=peak_kib,
                  suppressed_groups=suppressed, decision=report.policy_decision,
                  exit_code=measured.exit_code if measured else None,
                  policy_message=measured.policy_message if measured else None,
                  stderr_tail=measured.stderr_tail if measured else None)
    return ProductionRun(run_id=run_id, owner=ctx.name, package_sha256=sha,
                         report=report.model_dump(mode="json"), output=run.output,
                         output_sha256=output_sha)


# --- routes ----------------------------------------------------------------------------------

Sha256 = Annotated[str, PathParam(pattern=SHA256_PATTERN)]


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, BUILD_LIBRARIES)
    def post_libraries(body: LibraryBuild, caller: Caller) -> list[PublishedLibrary]:
        """Build the sample and test libraries from the authorized data; publish them."""
        return build_libraries(ctx, body)

    @mount(router, RECEIVE_REVIEW)
    def post_review(body: ReviewRequest, caller: Caller) -> Review:
        """The secure room hands over a validated package and its report."""
        return receive_review(ctx, body)

    @mount(router, REVIEWS)
    def get_reviews(caller: Caller) -> list[Review]:
        """Packages waiting for (or given) the owner's approval, with their reports."""
        return reviews(ctx)

    @mount(router, APPROVE)
    def post_approve(sha256: Sha256, caller: Caller) -> Review:
        """Sign an approval bound to this package hash (the report must be an accepted one)."""
        return approve(ctx, sha256)

    @mount(router, PRODUCTION_RUN)
    def post_run(body: ProductionRunRequest, caller: Caller) -> ProductionRun:
        """Run an approved package on the authorized library, in the sandbox, here."""
        return run_approved(ctx, body)

    return [router]


PACKAGE_APPROVAL_SERVICE = Service(
    name="package-approval",
    roles=(Role.HEALTH_AUTHORITY,),
    routers=_routes,
    components=((COMPONENT, MIGRATIONS),),
)
