"""The secure room: validate an algorithm package against a library, in the sandbox.

One call does the whole submission: static checks, a staged copy of exactly the hashed
package files, the inputs projected to the declared columns, a sandboxed run, and the
output checked against the declared schema and the disclosure policy. A run against
the authorized library needs the data owner's approval of this exact package hash.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, Field

from governance.output_policy import OutputRefused, apply_output_policy
from governance.packages import (
    Finding,
    PackageApproval,
    PackageHashMismatch,
    PackageManifest,
    PackageNotApproved,
    check_package,
    has_errors,
    load_manifest,
    package_files,
    package_hash,
    verify_approval,
)
from governance.synthetic import KNOWN_IDENTIFIERS, LibraryError, read_library_info
from parties.secure_room.api import LibraryInvalid, LibraryNotDeclared
from parties.secure_room.sandbox import SandboxLimits, SandboxRun, run_sandboxed

Outcome = Literal[
    "ok", "static_checks_failed", "error", "memory_limit", "cpu_time_limit", "wall_time_limit",
    "killed", "sandbox_failed", "output_refused",
]
_SIGXCPU, _SIGKILL = 24, 9


class ValidationReport(BaseModel):
    """What the secure room found: static findings, the run, the output's conformance."""

    package_name: str
    package_version: str
    package_sha256: str
    library: str
    static_findings: list[Finding]
    ran: bool
    outcome: Outcome
    accepted: bool
    exit_code: int | None = None
    signal: int | None = None
    wall_seconds: float | None = None
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    error_type: str | None = None
    error: str | None = None
    stderr_tail: str = ""
    schema_ok: bool | None = None
    disclosure_ok: bool | None = None
    policy_error: str | None = None
    output_rows: int | None = None
    suppressed_groups: int | None = None
    k: int | None = None
    limits: dict[str, float] = Field(default_factory=dict)
    sandbox_command: list[str] = Field(default_factory=list)


class PackageRun(BaseModel):
    """A report plus, when accepted, the released output (JSON-ready records)."""

    report: ValidationReport
    output: list[dict] | None = None


def _stage_package(package_dir: Path, target: Path) -> str:
    for path in package_files(package_dir):
        rel = path.relative_to(package_dir)
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / rel)
    return package_hash(target)


def _stage_inputs(manifest: PackageManifest, library_dir: Path, target: Path) -> dict[str, str]:
    """Write each input, projected to its declared columns, as /data/<input>.parquet."""
    paths = {}
    for item in manifest.inputs:
        source = library_dir / f"{item.dataset}.parquet"
        if not source.is_file():
            raise LibraryInvalid(f"library has no table '{item.dataset}'")
        available = set(pq.read_schema(source).names)
        missing = [c for c in item.columns if c not in available]
        if missing:
            raise LibraryInvalid(f"table '{item.dataset}' lacks declared columns {missing}")
        pq.write_table(pq.read_table(source, columns=item.columns), target / f"{item.name}.parquet")
        paths[item.name] = f"/data/{item.name}.parquet"
    return paths


def _identifier_values(manifest: PackageManifest, data_dir: Path) -> set[str]:
    values: set[str] = set()
    for item in manifest.inputs:
        columns = [c for c in item.columns if c in KNOWN_IDENTIFIERS or "token" in c.lower()]
        if columns:
            table = pq.read_table(data_dir / f"{item.name}.parquet", columns=columns)
            for column in table.columns:
                values.update(v for v in column.to_pylist() if isinstance(v, str))
    return values


def _outcome(run: SandboxRun, limits: SandboxLimits) -> Outcome:
    status = run.status or {}
    if run.timed_out:
        return "wall_time_limit"
    if run.exit_code == 0 and status.get("ok") is True:
        return "ok"
    if run.signal == _SIGXCPU or (run.signal == _SIGKILL
                                  and (status.get("cpu_seconds") or 0) >= limits.cpu_seconds):
        return "cpu_time_limit"
    if status.get("memory_error"):
        return "memory_limit"
    if status.get("stage") == "setup" or (run.status is None and run.signal is None):
        return "sandbox_failed"
    if run.signal is not None:
        return "killed"
    return "error"


def _records(table: pd.DataFrame) -> list[dict]:
    return json.loads(table.to_json(orient="records", date_format="iso", default_handler=str))


def run_package(
    package_dir: Path | str,
    library_dir: Path | str,
    *,
    limits: SandboxLimits | None = None,
    static_checks: bool = True,
    row_level_allowed: bool = False,
    k: int = 10,
    approval: PackageApproval | None = None,
    owner_public_key: Ed25519PublicKey | None = None,
) -> PackageRun:
    """Validate and run a package on a library in the sandbox; never raises on package faults.

    Raises typed errors only for bad requests: a malformed package or library, a library
    tier the package does not declare, or an unapproved package on the authorized library.
    `static_checks=False` skips the gate (the findings are still reported): tests use it to
    prove the sandbox holds on its own.
    """
    package_dir, library_dir = Path(package_dir), Path(library_dir)
    limits = limits or SandboxLimits()
    manifest = load_manifest(package_dir)
    try:
        info = read_library_info(library_dir)
    except LibraryError as exc:
        raise LibraryInvalid(str(exc)) from exc
    for item in manifest.inputs:
        if info.kind not in item.libraries:
            raise LibraryNotDeclared(
                f"input '{item.name}' does not declare the '{info.kind}' library")
    approved_hash = None
    if info.kind == "authorized":
        if owner_public_key is None:
            raise PackageNotApproved("the authorized library needs the owner's approval and key")
        approved_hash = verify_approval(package_dir, approval, owner_public_key)
    findings = check_package(package_dir, manifest)
    with tempfile.TemporaryDirectory(prefix="cogov-secure-room-") as work:
        root = Path(work)
        for name in ("pkg", "data", "job", "out"):
            (root / name).mkdir()
        staged_hash = _stage_package(package_dir, root / "pkg")
        if approved_hash is not None and staged_hash != approved_hash:
            raise PackageHashMismatch("the package changed while it was being staged")
        base = {"package_name": manifest.name, "package_version": manifest.version,
                "package_sha256": staged_hash, "library": info.kind,
                "static_findings": findings, "limits": limits.as_dict()}
        if static_checks and has_errors(findings):
            report = ValidationReport(**base, ran=False, outcome="static_checks_failed",
                                      accepted=False)
            return PackageRun(report=report)
        inputs = _stage_inputs(manifest, library_dir, root / "data")
        (root / "job" / "spec.json").write_text(
            json.dumps({"entry_point": manifest.entry_point, "inputs": inputs}), encoding="utf-8")
        (root / "out").chmod(0o777)
        run = run_sandboxed(package_dir=root / "pkg", data_dir=root / "data",
                            job_dir=root / "job", out_dir=root / "out", limits=limits)
        status = run.status or {}
        outcome = _outcome(run, limits)
        fields = dict(
            base, ran=True, exit_code=run.exit_code, signal=run.signal,
            wall_seconds=run.wall_seconds, cpu_seconds=status.get("cpu_seconds"),
            peak_memory_bytes=run.peak_memory_bytes, error_type=status.get("error_type"),
            error=status.get("error"), stderr_tail=run.stderr_tail,
            sandbox_command=run.command)
        output_file = root / "out" / "output.parquet"
        if outcome != "ok" or not output_file.is_file():
            outcome = "error" if outcome == "ok" else outcome
            return PackageRun(report=ValidationReport(**fields, outcome=outcome, accepted=False))
        try:
            table = pq.read_table(output_file).to_pandas()
            result = apply_output_policy(
                table, manifest.output, row_level_allowed=row_level_allowed, k=k,
                identifier_values=_identifier_values(manifest, root / "data"))
        except OutputRefused as exc:
            schema_error = getattr(exc, "http_status", 0) == 422
            report = ValidationReport(
                **fields, outcome="output_refused", accepted=False,
                schema_ok=not schema_error, disclosure_ok=False if not schema_error else None,
                policy_error=f"{type(exc).__name__}: {exc}")
            return PackageRun(report=report)
        except Exception as exc:  # an unreadable output file is the package's fault
            report = ValidationReport(**fields, outcome="output_refused", accepted=False,
                                      schema_ok=False, policy_error=f"{type(exc).__name__}: {exc}")
            return PackageRun(report=report)
        report = ValidationReport(
            **fields, outcome="ok", accepted=not has_errors(findings), schema_ok=True,
            disclosure_ok=True, output_rows=len(result.table),
            suppressed_groups=result.suppressed_groups, k=result.k)
        return PackageRun(report=report, output=_records(result.table))
