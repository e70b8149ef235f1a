"""The secure room: validate an algorithm package against a library, in the sandbox.

One call does the whole submission: static checks, a staged copy of exactly the hashed
package files, the inputs projected to the declared columns, a sandboxed run, the
output parsed in a second sandbox, and the result checked against the declared schema
and the disclosure policy. A run against the authorized library needs the data owner's
approval of this exact package hash.

Nothing the package wrote is trusted: the node opens only `output.parquet`, without
following links, as a regular file under the size cap, and hands its bytes to the
parser sandbox; the outcome comes from the exit code and from what the node measured.
The report carries outcome codes and the policy's decision. On the sample and test
libraries it also carries a capped, scrubbed excerpt of stderr and of the policy's
message; on the authorized library none of that, and no timings: those stay in
`PackageRun.diagnostics` for the node's log and meter.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
from decimal import Decimal
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from governance.output_policy import (
    GROUP_SIZE,
    MODEL_MAX_ROWS,
    OutputRefused,
    OutputSchemaMismatch,
    OutputUnreadable,
    apply_output_policy,
)
from governance.packages import (
    VERDICT_KEY,
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
from parties.secure_room._harness import (
    EXIT_MEMORY,
    EXIT_OK,
    EXIT_OUTPUT_REFUSED,
    EXIT_SETUP,
)
from parties.secure_room.api import LibraryInvalid, LibraryNotDeclared
from parties.secure_room.cgroup import Isolation
from parties.secure_room.sandbox import (
    RunArea,
    SandboxLimits,
    SandboxRun,
    run_area,
    run_sandboxed,
)

Outcome = Literal[
    "ok", "static_checks_failed", "error", "memory_limit", "cpu_time_limit", "wall_time_limit",
    "killed", "sandbox_failed", "output_refused",
]
_SIGXCPU, _SIGKILL = 24, 9
_DETAIL_CHARS = 2000
_PARSER_MEMORY_BYTES = 1024**3


class ValidationReport(BaseModel):
    """What the secure room found: static findings, outcome codes, the policy's decision.

    `exit_code` to `peak_memory_bytes`, `detail` and `suppressed_groups` are None on the
    authorized library: the package sets them at will, so each would be a channel.
    """

    package_name: str
    package_version: str
    package_sha256: str
    library: str
    static_findings: list[Finding]
    ran: bool
    outcome: Outcome
    accepted: bool
    policy_decision: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    wall_seconds: float | None = None
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    detail: str | None = None
    schema_ok: bool | None = None
    disclosure_ok: bool | None = None
    output_rows: int | None = None
    suppressed_groups: int | None = None
    k: int | None = None
    bits_per_claim: float | None = None  # a verdict's capacity a claim (PackageOutput)
    limits: dict[str, float] = Field(default_factory=dict)
    isolation: Isolation | None = None  # "rlimits_only": no cgroup, see SECURITY.md
    sandbox_command: list[str] = Field(default_factory=list)


class RunDiagnostics(BaseModel):
    """What the node measured and read, for its own log and meter only."""

    exit_code: int
    signal: int | None
    wall_seconds: float
    cpu_seconds: float
    peak_memory_bytes: int | None
    stderr_tail: str
    oom_kills: int
    tasks_refused: int
    policy_message: str | None = None
    suppressed_groups: int | None = None  # how many: a channel the package controls


class PackageRun(BaseModel):
    """A report plus, when accepted, the released output (JSON-ready records)."""

    report: ValidationReport
    output: list[dict] | None = None
    diagnostics: RunDiagnostics | None = Field(default=None, exclude=True)


class _ParsedColumn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    kind: Literal["bool", "int64", "float64", "string", "decimal", "date", "timestamp"]
    values: list[StrictBool | StrictInt | StrictFloat | StrictStr | None]


class _ParsedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: StrictInt
    columns: list[_ParsedColumn]


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


def _input_group_sizes(manifest: PackageManifest, data_dir: Path) -> pd.DataFrame | None:
    """For an aggregate, the room's own group sizes: persons (or rows) per key in the inputs.

    The keys are the output's string and date columns; the first input that has them all
    is counted, by distinct `national_id` when it declares one, else by rows. When no
    input has the keys, every group measures 0 and is suppressed: a package cannot
    vouch for the size of a group the room cannot see.
    """
    output = manifest.output
    if output.disclosure != "aggregate":
        return None
    keys = [c.name for c in output.columns
            if c.type in ("string", "date") and c.name != output.count_column]
    for item in manifest.inputs:
        if set(keys) <= set(item.columns):
            person = ["national_id"] if "national_id" in item.columns else []
            frame = pq.read_table(data_dir / f"{item.name}.parquet",
                                  columns=keys + person).to_pandas()
            if not keys:
                size = frame["national_id"].nunique() if person else len(frame)
                return pd.DataFrame({GROUP_SIZE: [size]})
            grouped = frame.groupby(keys, dropna=False)
            sizes = grouped["national_id"].nunique() if person else grouped.size()
            return sizes.rename(GROUP_SIZE).reset_index()
    return pd.DataFrame({**{k: pd.Series(dtype=object) for k in keys},
                         GROUP_SIZE: pd.Series(dtype="int64")})


def _input_claim_ids(manifest: PackageManifest, data_dir: Path) -> set[str] | None:
    """For a verdict, the claim ids of the claims input exactly as the package received them."""
    if manifest.claims_input is None:
        return None
    table = pq.read_table(data_dir / f"{manifest.claims_input}.parquet", columns=[VERDICT_KEY])
    return {str(v) for v in table.column(0).to_pylist()}


def _outcome(run: SandboxRun, limits: SandboxLimits) -> Outcome:
    """The outcome from what the node saw: the wall clock, the signal, the CPU it measured.

    The exit code is the harness's word; a package can forge it, but only to pick a
    failure: "ok" still needs an output that passes the parser and the policy.
    """
    if run.timed_out:
        return "wall_time_limit"
    if run.oom_kills:
        return "memory_limit"
    if run.signal == _SIGXCPU or (run.signal == _SIGKILL
                                  and run.cpu_seconds >= limits.cpu_seconds - 0.5):
        return "cpu_time_limit"
    if run.signal is not None:
        return "killed"
    return {EXIT_OK: "ok", EXIT_MEMORY: "memory_limit", EXIT_SETUP: "sandbox_failed"}.get(
        run.exit_code, "error")


def read_untrusted(directory: Path, name: str, max_bytes: int) -> bytes:
    """Read `directory/name` written by the sandbox: no links, a regular file, capped.

    Every failure is one `OutputUnreadable`, whether the file is missing, a link, a
    fifo or too large, so the refusal says nothing about what a link pointed at.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        dir_fd = os.open(directory, flags | os.O_DIRECTORY)
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        raise OutputUnreadable("the output is missing or unreadable") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            raise OutputUnreadable("the output is missing or unreadable")
        chunks, size = [], 0
        while size <= max_bytes and (chunk := os.read(fd, 1024 * 1024)):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise OutputUnreadable("the output is missing or unreadable")
    return data


def _column_series(column: _ParsedColumn) -> pd.Series:
    if any(v is None for v in column.values):
        raise OutputSchemaMismatch(f"column '{column.name}': missing values are not allowed")
    convert = {
        "bool": lambda vs: pd.Series(vs, dtype=bool),
        "int64": lambda vs: pd.Series(vs, dtype="int64"),
        "float64": lambda vs: pd.Series(vs, dtype="float64"),
        "string": lambda vs: pd.Series(vs, dtype=object),
        "decimal": lambda vs: pd.Series([Decimal(v) for v in vs], dtype=object),
        "date": lambda vs: pd.Series([dt.date.fromisoformat(v) for v in vs], dtype=object),
        "timestamp": lambda vs: pd.Series(pd.to_datetime(vs)),
    }[column.kind]
    try:
        return convert(column.values)
    except (TypeError, ValueError, ArithmeticError, OverflowError) as exc:
        raise OutputUnreadable("the output is missing or unreadable") from exc


def _parse_output(area: RunArea, limits: SandboxLimits) -> pd.DataFrame:
    """Parse the package's output in a second sandbox; rebuild it here from plain JSON."""
    data = read_untrusted(area.out, "output.parquet", limits.output_bytes)
    (area.parse_in / "output.parquet").write_bytes(data)
    parser_limits = SandboxLimits(
        cpu_seconds=min(limits.cpu_seconds, 20),
        memory_bytes=min(limits.memory_bytes, _PARSER_MEMORY_BYTES),
        wall_seconds=min(limits.wall_seconds, 30.0), output_bytes=limits.output_bytes,
        tmp_bytes=1024**2, tasks=limits.tasks, open_files=limits.open_files,
        output_rows=limits.output_rows)
    parse_logs = area.logs / "parse"
    parse_logs.mkdir()
    parsed = run_sandboxed(read_only={**area.python, "/harness": area.harness,
                                      "/in": area.parse_in},
                           out_dir=area.parsed, logs=parse_logs, limits=parser_limits,
                           harness_args=["parse", str(limits.output_rows)])
    if parsed.timed_out or parsed.signal is not None or parsed.exit_code != EXIT_OK:
        reason = ("rows or types" if parsed.exit_code == EXIT_OUTPUT_REFUSED
                  else f"parser exit {parsed.exit_code}, signal {parsed.signal}")
        raise OutputUnreadable(f"the output could not be parsed ({reason})")
    try:
        document = _ParsedOutput.model_validate_json(
            read_untrusted(area.parsed, "output.json", limits.output_bytes))
    except ValueError as exc:
        raise OutputUnreadable("the parsed output is malformed") from exc
    if document.rows > limits.output_rows or any(
            len(c.values) != document.rows for c in document.columns):
        raise OutputUnreadable("the parsed output is malformed")
    names = [c.name for c in document.columns]
    if len(set(names)) != len(names):
        raise OutputSchemaMismatch("the output has duplicate column names")
    return pd.DataFrame({c.name: _column_series(c) for c in document.columns}, columns=names)


def scrub(text: str, identifiers: set[str]) -> str:
    """Cap `text`, drop control characters, and blank every input identifier value in it."""
    text = text[-_DETAIL_CHARS:]
    for value in identifiers:
        if len(value) >= 4 and value in text:
            text = text.replace(value, "[identifier]")
    return "".join(ch for ch in text if ch in "\n\t" or ch.isprintable())


def _records(table: pd.DataFrame) -> list[dict]:
    return json.loads(table.to_json(orient="records", date_format="iso", default_handler=str))


def run_package(
    package_dir: Path | str,
    library_dir: Path | str,
    *,
    limits: SandboxLimits | None = None,
    static_checks: bool = True,
    row_level_max_rows: int | None = None,
    k: int = 10,
    approval: PackageApproval | None = None,
    owner_public_key: Ed25519PublicKey | None = None,
) -> PackageRun:
    """Validate and run a package on a library in the sandbox; never raises on package faults.

    Raises typed errors only for bad requests: a malformed package or library, a library
    tier the package does not declare, or an unapproved package on the authorized library.
    `static_checks=False` skips the gate (the findings are still reported): tests use it to
    prove the sandbox holds on its own. `row_level_max_rows` is the contract's cap on
    row-level output (None: not allowed); on the authorized library the cap the owner
    signed in the approval replaces it.
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
    approved_hash, model_max_rows = None, None
    if info.kind == "authorized":
        if owner_public_key is None:
            raise PackageNotApproved("the authorized library needs the owner's approval and key")
        approved_hash = verify_approval(package_dir, approval, owner_public_key)
        row_level_max_rows = approval.row_level_max_rows
        model_max_rows = row_level_max_rows or MODEL_MAX_ROWS
    findings = check_package(package_dir, manifest)
    with run_area(limits) as area:
        staged_hash = _stage_package(package_dir, area.pkg)
        if approved_hash is not None and staged_hash != approved_hash:
            raise PackageHashMismatch("the package changed while it was being staged")
        base = {"package_name": manifest.name, "package_version": manifest.version,
                "package_sha256": staged_hash, "library": info.kind,
                "static_findings": findings, "limits": limits.as_dict()}
        if static_checks and has_errors(findings):
            report = ValidationReport(**base, ran=False, outcome="static_checks_failed",
                                      accepted=False)
            return PackageRun(report=report)
        inputs = _stage_inputs(manifest, library_dir, area.data)
        (area.job / "spec.json").write_text(
            json.dumps({"entry_point": manifest.entry_point, "inputs": inputs}), encoding="utf-8")
        run = run_sandboxed(
            read_only={**area.python, "/harness": area.harness, "/pkg": area.pkg,
                       "/data": area.data, "/job": area.job},
            out_dir=area.out, logs=area.logs, limits=limits, harness_args=[])
        identifiers = _identifier_values(manifest, area.data)
        group_sizes = _input_group_sizes(manifest, area.data)
        claim_ids = _input_claim_ids(manifest, area.data)
        outcome = _outcome(run, limits)
        table, decision = None, None
        if outcome == "ok":
            try:
                table = _parse_output(area, limits)
            except OutputRefused as exc:
                decision = exc
    diagnostics = RunDiagnostics(
        exit_code=run.exit_code, signal=run.signal, wall_seconds=run.wall_seconds,
        cpu_seconds=run.cpu_seconds, peak_memory_bytes=run.peak_memory_bytes,
        stderr_tail=run.stderr_tail, oom_kills=run.oom_kills, tasks_refused=run.tasks_refused)
    production = info.kind == "authorized"
    measured = {} if production else {
        "exit_code": run.exit_code, "signal": run.signal, "wall_seconds": run.wall_seconds,
        "cpu_seconds": run.cpu_seconds, "peak_memory_bytes": run.peak_memory_bytes}
    fields = dict(base, ran=True, sandbox_command=run.command, isolation=run.isolation,
                  **measured)
    result = None
    if table is not None:
        try:
            result = apply_output_policy(
                table, manifest.output, row_level_max_rows=row_level_max_rows,
                model_max_rows=model_max_rows, k=k,
                identifier_values=identifiers, group_sizes=group_sizes, claim_ids=claim_ids)
        except OutputRefused as exc:
            decision = exc
    if decision is not None:
        diagnostics.policy_message = f"{type(decision).__name__}: {decision}"
    detail = None
    if not production:
        detail = scrub("\n".join(filter(None, [run.stderr_tail, diagnostics.policy_message])),
                       identifiers) or None
    fields["detail"] = detail
    if result is None:
        if decision is not None:
            schema_error = isinstance(decision, OutputSchemaMismatch)
            report = ValidationReport(
                **fields, outcome="output_refused", accepted=False,
                policy_decision=type(decision).__name__, schema_ok=not schema_error,
                disclosure_ok=None if schema_error else False)
        else:
            report = ValidationReport(**fields, outcome=outcome, accepted=False)
        return PackageRun(report=report, diagnostics=diagnostics)
    report = ValidationReport(
        **fields, outcome="ok", accepted=not has_errors(findings), schema_ok=True,
        disclosure_ok=True, output_rows=len(result.table),
        bits_per_claim=manifest.output.bits_per_claim,
        suppressed_groups=None if production else result.suppressed_groups, k=result.k)
    diagnostics.suppressed_groups = result.suppressed_groups
    return PackageRun(report=report, output=_records(result.table), diagnostics=diagnostics)
