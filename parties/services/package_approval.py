"""The data owner's side of in-air development: libraries, review, approval, production runs.

The health authority holds the authorized data (the governed visits in its store,
sealed at rest). From it, it builds per dataset
- the **sample** library: synthetic rows drawn from the data's marginals and pairwise
  correlations (`governance.synthetic.synthesize`), with its fidelity and privacy report;
- the **test** library: a small random sample masked by the grading rules;
and publishes both to the operator's development environment. The **authorized**
library is built per production run in a temporary directory and never leaves.

Every library replaces direct identifiers by pseudonyms under a fresh random key
(national id -> HMAC of the level-1 token p1, visit id -> HMAC of the visit ref), so the
three tiers cannot be linked to each other or to circulation tokens. Each library also
carries companion query tables (`claims`, `policies`) drawn from its own visits, so a
package such as the claim check runs end to end; in production those tables are the
requester's inputs, sent sealed to this node and tokenized here with k1.

The owner reviews the secure room's report, signs an approval bound to the package hash
with its node signing key (`package_approved` in the log), and runs only packages whose
content has the approved hash, in the sandbox, under the output policy; every run is
metered in the log (`package_run`), every refusal logged (`package_run_refused`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import nacl.exceptions
import nacl.public
import numpy as np
import pandas as pd
import pyarrow as pa
from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from governance.packages import (
    PackageApproval,
    PackageError,
    load_manifest,
    package_hash,
    verify_approval,
)
from mpc import xid
from parties.domains.keys import level1_key
from parties.ingest.authority import governed_visits
from parties.runtime.access import Caller, CallerPolicy
from parties.runtime.batches import ipc_to_table, table_to_ipc
from parties.runtime.context import NodeContext
from parties.runtime.errors import NodeError
from parties.runtime.sealing import (
    open_bytes,
    seal_bytes,
    sealing_private_key,
    sealing_public_key,
)
from parties.runtime.service import Service
from parties.runtime.topology import Role
from parties.services.ledger import record_event
from parties.services.secure_room import (
    MAX_PACKAGE_BYTES,
    MAX_PACKAGE_FILES,
    NAME_PATTERN,
    PACKAGE_RUN,
    PACKAGE_RUN_REFUSED,
    SHA256_PATTERN,
    LibraryUpload,
    ProductionRun,
    ProductionRunRequest,
    ReviewRequest,
    SecureRoomError,
    WireFile,
    _long_client,
    files_to_wire,
    library_hash,
    new_run_id,
    records_sha256,
    report_sha256,
    text_sha256,
    write_wire_files,
)

if TYPE_CHECKING:  # governance.synthetic pulls in scipy and scikit-learn: imported lazily
    from governance.synthetic import SynthesisSpec

K_ANONYMITY = 10
OWNER_TABLES = ("visits",)  # what the owner's authorized library holds; query tables may not
LIBRARY_VISIT_FIELDS = ("birth_date", "sex", "admission_date", "discharge_date",
                        "diagnosis_code", "total_fen", "covered_fen", "self_pay_fen")
FEN_FIELDS = ("total_fen", "covered_fen", "self_pay_fen")
COMPANION_CLAIMS = 40
COMPANION_KINDS = ("true", "inflated", "fabricated", "uncovered", "date_off_by_one")
INSURERS = ("insurer-a", "insurer-b")
UNCOVERED_CATEGORY = "Z99"
QUERY_SEAL_DOMAIN = b"cogov-package-query-v1\x00"
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


class ReviewError(SecureRoomError):
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


# --- the authorized data, pseudonymized per use ------------------------------------------------


def _pseudonym(key: bytes, value: bytes, length: int = 32) -> str:
    return hmac.new(key, value, hashlib.sha256).hexdigest()[:length]


def authorized_visits(ctx: NodeContext, key: bytes) -> pd.DataFrame:
    """The governed visits as a library table: identifiers replaced by pseudonyms under `key`.

    Name, phone, address and the national id are not even opened: the person is its
    level-1 token p1, pseudonymized again.
    """
    frame = governed_visits(ctx, LIBRARY_VISIT_FIELDS)
    out = pd.DataFrame({
        "visit_id": [f"{h}:{_pseudonym(key, bytes(r), 12)}"
                     for h, r in zip(frame["hospital_id"], frame["visit_ref"], strict=True)],
        "hospital_id": frame["hospital_id"].astype(str),
        "national_id": [_pseudonym(key, bytes(p)) for p in frame["p1"]],
    })
    for name in LIBRARY_VISIT_FIELDS:
        out[name] = frame[name].to_numpy()
    for name in FEN_FIELDS:
        out[name] = out[name].astype("int64")
    return out


def sample_spec() -> SynthesisSpec:
    """The standard visit spec; both identifier columns hold pseudonyms here."""
    from governance.synthetic import STANDARD_VISIT_SPEC

    return STANDARD_VISIT_SPEC.model_copy(
        update={"identifiers": {"visit_id": "visit_id", "national_id": "token"}})


def _mask_test_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The grading policy's masks; the person column already holds a pseudonym, not an id."""
    from governance.desensitize import VISIT_FIELD_TYPES, desensitize_frame

    types = {c: t for c, t in VISIT_FIELD_TYPES.items()
             if c in frame.columns and c != "national_id"}
    return desensitize_frame(frame, types)


def companion_queries(visits: pd.DataFrame, seed: int,
                      prefix: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Claims and policies drawn from a library's own visits, one of each planted kind."""
    rng = np.random.default_rng(seed)
    n = min(COMPANION_CLAIMS, len(visits))
    picked = visits.iloc[rng.choice(len(visits), size=n, replace=False)].reset_index(drop=True)
    claims, pairs = [], {}
    for i, row in picked.iterrows():
        kind = COMPANION_KINDS[int(i) % len(COMPANION_KINDS)]
        admitted = pd.Timestamp(row["admission_date"]).date()
        shift = {"fabricated": 7, "date_off_by_one": 1}.get(kind, 0)
        self_pay = int(row["self_pay_fen"])
        insurer = INSURERS[int(i) % len(INSURERS)]
        code = str(row["diagnosis_code"])
        claims.append({
            "claim_id": f"{prefix}{int(i):04d}", "insurer": insurer,
            "national_id": row["national_id"], "hospital_id": row["hospital_id"],
            "visit_date": admitted + dt.timedelta(days=shift),
            "claimed_fen": self_pay + 5000 if kind == "inflated" else max(self_pay, 1),
            "diagnosis_code": code,
        })
        covered, denied = pairs.setdefault((insurer, row["national_id"]), (set(), set()))
        (denied if kind == "uncovered" else covered).add(code.split(".")[0])
    policies = [{
        "policy_id": f"{prefix}P{j:04d}", "insurer": insurer, "national_id": person,
        "covered_categories": sorted(covered - denied) or [UNCOVERED_CATEGORY],
        "deductible_fen": 500 * (j % 2),
    } for j, ((insurer, person), (covered, denied)) in enumerate(pairs.items())]
    claims_frame = pd.DataFrame(claims)
    claims_frame["claimed_fen"] = claims_frame["claimed_fen"].astype("int64")
    policies_frame = pd.DataFrame(policies)
    policies_frame["deductible_fen"] = policies_frame["deductible_fen"].astype("int64")
    return claims_frame, policies_frame


# --- building and publishing the development libraries ------------------------------------------


class LibraryBuild(BaseModel):
    name: Annotated[str, Field(pattern=NAME_PATTERN)] = "claim_check"
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


def _privacy_fields(report: dict[str, Any]) -> dict[str, Any]:
    """The synthesis report's privacy verdict as log-safe integers (no floats in the log)."""
    if not report:
        return {}
    worst = max(report["fidelity"].values(), key=lambda f: f["value"])
    return {
        "exact_matches": int(report["exact_matches"]),
        "rows_below_threshold": int(report["rows_below_threshold"]),
        "dcr_min_micro": int(report["dcr_min"] * 1e6),
        "dcr_threshold_micro": int(report["dcr_threshold"] * 1e6),
        "worst_fidelity_micro": int(worst["value"] * 1e6),
    }


def build_libraries(ctx: NodeContext, build: LibraryBuild) -> list[PublishedLibrary]:
    """Build the sample and test libraries from the authorized data; publish them."""
    import time

    from governance.synthetic import sample_test_rows, synthesize, write_library

    authorized = authorized_visits(ctx, os.urandom(32))
    if len(authorized) < 20:
        raise LibrarySourceTooSmall(f"{len(authorized)} authorized rows; need at least 20")
    published = []
    with tempfile.TemporaryDirectory(prefix="cogov-libraries-") as work:
        for kind in ("sample", "test"):
            started = time.perf_counter()
            reports: dict[str, Any] = {}
            if kind == "sample":
                drawn = synthesize(authorized, build.sample_rows, build.seed, spec=sample_spec())
                visits = drawn.table
                reports["visits"] = drawn.report.model_dump(mode="json")
            else:
                visits = sample_test_rows(authorized, build.test_rows, build.seed,
                                          mask=_mask_test_rows)
            claims, policies = companion_queries(visits, build.seed, kind[0].upper())
            directory = Path(work) / kind
            write_library(directory, kind, {"visits": visits, "claims": claims,
                                            "policies": policies}, reports)
            published.append(_publish(ctx, build.name, kind, directory, reports,
                                      time.perf_counter() - started))
    return published


def _publish(ctx: NodeContext, name: str, kind: str, directory: Path,
             reports: dict[str, Any], seconds: float) -> PublishedLibrary:
    from governance.synthetic import read_library_info

    sha = library_hash(directory)
    tables = {n: t.rows for n, t in read_library_info(directory).tables.items()}
    files = files_to_wire(directory, sorted(p for p in directory.iterdir() if p.is_file()))
    upload = LibraryUpload(name=name, kind=kind, sha256=sha, files=files)
    operator = ctx.topology.nodes_with_role(Role.OPERATOR)[0].name
    with _long_client(ctx) as client:
        client.post(operator, "/v1/secure-room/libraries", kind="ingest",
                    json=upload.model_dump(mode="json"))
    report = reports.get("visits", {})
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute(
            "INSERT OR REPLACE INTO pa_libraries (name, kind, sha256, tables, report)"
            " VALUES (?, ?, ?, ?, ?)", (name, kind, sha, json.dumps(tables), json.dumps(report)))
    record_event(ctx, "data_registered", {
        "dataset": f"{name}.{kind}", "owner": ctx.name, "stage": "library", "library": kind,
        "library_sha256": sha, "rows": tables["visits"], "tables": sorted(tables),
        "table_rows": [tables[t] for t in sorted(tables)], "recipient": operator,
        "report_sha256": report_sha256(report),
        **_privacy_fields(report),
    })
    ctx.log.event("library_published", name=name, kind=kind, sha256=sha, seconds=seconds)
    return PublishedLibrary(name=name, kind=kind, sha256=sha, tables=tables, report=report,
                            build_seconds=round(seconds, 3))


# --- review and approval --------------------------------------------------------------------


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
    from governance.packages import approve_package

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
    record_event(ctx, "package_approved", {
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


# --- production runs ------------------------------------------------------------------------


def seal_query_table(table: pa.Table, owner_signing_public: bytes, package_sha256: str) -> str:
    """A query table sealed to the data owner, bound to one package (base64 for JSON)."""
    framed = QUERY_SEAL_DOMAIN + package_sha256.encode("ascii") + table_to_ipc(table)
    return base64.b64encode(seal_bytes(sealing_public_key(owner_signing_public), framed)).decode(
        "ascii")


def _open_query_table(ctx: NodeContext, name: str, sealed_b64: str, package_sha256: str,
                      ) -> pd.DataFrame:
    try:
        framed = open_bytes(sealing_private_key(ctx.signing_key),
                            base64.b64decode(sealed_b64, validate=True))
    except (nacl.exceptions.CryptoError, ValueError) as exc:
        raise QueryTablesInvalid(f"query table {name!r} is not sealed to {ctx.name}") from exc
    prefix = QUERY_SEAL_DOMAIN + package_sha256.encode("ascii")
    if not framed.startswith(prefix):
        raise QueryTablesInvalid(f"query table {name!r} was sealed for another package")
    try:
        return ipc_to_table(framed[len(prefix):]).to_pandas()
    except NodeError as exc:
        raise QueryTablesInvalid(f"query table {name!r}: {exc}") from exc


def _authorized_library(ctx: NodeContext, directory: Path, query: dict[str, pd.DataFrame],
                        key: bytes) -> int:
    """Write this run's authorized library; the query tables' persons as the same pseudonyms."""
    from governance.synthetic import write_library

    tables = {"visits": authorized_visits(ctx, key)}
    k1 = level1_key(ctx)
    for name, frame in query.items():
        if "national_id" in frame.columns:
            ids = frame["national_id"].astype(str).tolist()
            frame = frame.assign(national_id=[_pseudonym(key, p) for p in xid.tokenize(k1, ids)])
        tables[name] = frame
    write_library(directory, "authorized", tables)
    return len(tables["visits"])


def run_approved(ctx: NodeContext, request: ProductionRunRequest) -> ProductionRun:
    """Run a package on the authorized library if, and only if, its hash is approved."""
    from parties.secure_room import SandboxLimits, run_package

    run_id = new_run_id()
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
            query = {n: _open_query_table(ctx, n, s, sha) for n, s in request.query.items()}
        except (PackageError, QueryTablesInvalid) as exc:
            record_event(ctx, PACKAGE_RUN_REFUSED, {
                "run_id": run_id, "package": manifest.name, "version": manifest.version,
                "package_sha256": sha, "requester": request.requester,
                "error": type(exc).__name__, "library": "authorized",
            })
            ctx.log.event("package_run_refused", package=sha, error=type(exc).__name__)
            raise
        library = Path(work) / "authorized"
        rows_in = _authorized_library(ctx, library, query, os.urandom(32))
        run = run_package(package_dir, library, limits=SandboxLimits(**PRODUCTION_LIMITS),
                          row_level_allowed=False, k=K_ANONYMITY,
                          approval=approval_for(ctx, manifest.name, manifest.version),
                          owner_public_key=owner_key)
    report = run.report
    output_sha = records_sha256(run.output)
    rows_out = len(run.output or [])
    wall_ms = int((report.wall_seconds or 0) * 1000)
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute(
            "INSERT INTO pa_runs (run_id, sha256, requester, outcome, accepted, rows_in,"
            " rows_out, suppressed_groups, wall_ms, output_sha256) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (run_id, sha, request.requester, report.outcome, int(report.accepted), rows_in,
             rows_out, report.suppressed_groups or 0, wall_ms, output_sha))
    # The meter: a QueryMeter-shaped payload, so a contract can bill package runs.
    record_event(ctx, PACKAGE_RUN, {
        "run_id": run_id, "package": manifest.name, "version": manifest.version,
        "package_sha256": sha, "party": request.requester, "library": "authorized",
        "outcome": report.outcome, "accepted": report.accepted,
        "records_touched": rows_in, "rows_returned": rows_out,
        "suppressed_groups": report.suppressed_groups or 0,
        "compute_ms": int((report.cpu_seconds or 0) * 1000), "wall_ms": wall_ms,
        "peak_memory_kib": (report.peak_memory_bytes or 0) // 1024,
        "output_sha256": output_sha,
    })
    ctx.log.event("package_run", package=sha, outcome=report.outcome, wall_ms=wall_ms)
    return ProductionRun(run_id=run_id, owner=ctx.name, package_sha256=sha,
                         report=report.model_dump(mode="json"), output=run.output,
                         output_sha256=output_sha)


# --- routes ---------------------------------------------------------------------------------

Sha256 = Annotated[str, PathParam(pattern=SHA256_PATTERN)]


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter(prefix="/v1/packages", tags=["package approval"])
    admin = CallerPolicy("admin")
    operator = CallerPolicy("package", (Role.OPERATOR,))

    @router.post("/libraries", response_model=list[PublishedLibrary])
    def post_libraries(build: LibraryBuild,
                       caller: Caller = Depends(admin)) -> list[PublishedLibrary]:
        """Build the sample and test libraries from the authorized data; publish them."""
        return build_libraries(ctx, build)

    @router.post("/reviews", response_model=Review)
    def post_review(request: ReviewRequest, caller: Caller = Depends(operator)) -> Review:
        """The secure room hands over a validated package and its report."""
        return receive_review(ctx, request)

    @router.get("/reviews", response_model=list[Review])
    def get_reviews(caller: Caller = Depends(admin)) -> list[Review]:
        """Packages waiting for (or given) the owner's approval, with their reports."""
        return reviews(ctx)

    @router.post("/{sha256}/approve", response_model=Review)
    def post_approve(sha256: Sha256, caller: Caller = Depends(admin)) -> Review:
        """Sign an approval bound to this package hash (the report must be an accepted one)."""
        return approve(ctx, sha256)

    @router.post("/run", response_model=ProductionRun)
    def post_run(request: ProductionRunRequest,
                 caller: Caller = Depends(operator)) -> ProductionRun:
        """Run an approved package on the authorized library, in the sandbox, here."""
        return run_approved(ctx, request)

    return [router]


PACKAGE_APPROVAL_SERVICE = Service(
    name="package-approval",
    roles=(Role.HEALTH_AUTHORITY,),
    routers=_routes,
    components=((COMPONENT, MIGRATIONS),),
)
