"""`package init|test|submit|approve|verify`: algorithm packages against local directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from rich.console import Console
from rich.table import Table

from governance.errors import GovernanceError
from governance.packages import (
    PackageApproval,
    approve_package,
    init_package,
    load_manifest,
    verify_approval,
    write_package_hash,
)
from parties.runtime.cli import exit_on
from parties.secure_room.errors import SecureRoomError
from parties.secure_room.room import PackageRun, run_package
from parties.secure_room.sandbox import SandboxLimits

app = typer.Typer(help="Algorithm packages: scaffold, test in the secure room, submit, approve.",
                  no_args_is_help=True)
console = Console()

PackageDir = Annotated[Path, typer.Argument(help="package directory (holds manifest.toml)")]
LibraryDir = Annotated[Path, typer.Option("--library", "-l",
                                          help="library directory (library.json + *.parquet)")]
CpuOption = Annotated[int, typer.Option(help="CPU-time limit, seconds")]
MemoryOption = Annotated[int, typer.Option(help="address-space limit, MiB")]
WallOption = Annotated[float, typer.Option(help="wall-clock limit, seconds")]


def _limits(cpu: int, memory_mib: int, wall: float) -> SandboxLimits:
    return SandboxLimits(cpu_seconds=cpu, memory_bytes=memory_mib * 1024**2, wall_seconds=wall)


def _show(run: PackageRun, rows: int) -> None:
    report = run.report
    colour = "green" if report.accepted else "red"
    console.print(f"[bold]{report.package_name} {report.package_version}[/bold] "
                  f"sha256 {report.package_sha256} on the {report.library} library: "
                  f"[{colour}]{report.outcome}[/{colour}]")
    for finding in report.static_findings:
        console.print(f"  {finding.severity} {finding.code} {finding.file}:{finding.line or '-'}"
                      f" {finding.message}")
    if report.ran:
        memory = (report.peak_memory_bytes or 0) / 1024**2
        console.print(f"  exit {report.exit_code}, {report.wall_seconds:.2f} s wall, "
                      f"{report.cpu_seconds or 0:.2f} s CPU, peak {memory:.0f} MiB")
    if report.error_type:
        console.print(f"  {report.error_type}: {report.error}")
    if report.policy_error:
        console.print(f"  policy: {report.policy_error}")
    if report.suppressed_groups:
        console.print(f"  suppressed {report.suppressed_groups} groups under k={report.k}")
    if run.output and rows:
        table = Table(*run.output[0].keys())
        for record in run.output[:rows]:
            table.add_row(*(str(v) for v in record.values()))
        console.print(table)


@app.command("init")
def init_command(
    directory: PackageDir,
    name: Annotated[str, typer.Option(help="package name (lowercase, - or _)")] = "my-package",
) -> None:
    """Scaffold a runnable package: manifest.toml and an entry-point module."""
    with exit_on(GovernanceError):
        init_package(directory, name)
    console.print(f"created {directory}/manifest.toml; edit it, then `package test`")


@app.command("test")
def test_command(
    directory: PackageDir,
    library: LibraryDir,
    rows: Annotated[int, typer.Option(help="output rows to show")] = 10,
    skip_static_gate: Annotated[bool, typer.Option(
        help="run even when static checks find errors (findings are still shown)")] = False,
    cpu: CpuOption = 30,
    memory: MemoryOption = 2048,
    wall: WallOption = 60.0,
) -> None:
    """Static checks, then a sandboxed run on a sample or test library; show the output."""
    with exit_on(GovernanceError, SecureRoomError):
        run = run_package(directory, library, limits=_limits(cpu, memory, wall),
                          static_checks=not skip_static_gate)
    _show(run, rows)
    raise typer.Exit(code=0 if run.report.accepted else 1)


@app.command("submit")
def submit_command(
    directory: PackageDir,
    library: LibraryDir,
    report_path: Annotated[Path | None, typer.Option(
        "--report", help="where to write the validation report (JSON)")] = None,
    cpu: CpuOption = 30,
    memory: MemoryOption = 2048,
    wall: WallOption = 60.0,
) -> None:
    """Record package.sha256, validate in the secure room, write the validation report."""
    with exit_on(GovernanceError, SecureRoomError):
        manifest = load_manifest(directory)
        digest = write_package_hash(directory)
        run = run_package(directory, library, limits=_limits(cpu, memory, wall))
    target = report_path or Path(f"{manifest.name}-{manifest.version}.validation.json")
    tmp = target.with_suffix(".tmp")
    tmp.write_text(run.report.model_dump_json(indent=2), encoding="utf-8")
    tmp.replace(target)
    _show(run, rows=0)
    console.print(f"package.sha256 {digest}; report written to {target}")
    raise typer.Exit(code=0 if run.report.accepted else 1)


@app.command("approve")
def approve_command(
    directory: PackageDir,
    key: Annotated[Path, typer.Option(help="owner's Ed25519 private key (PEM, PKCS#8)")],
    owner: Annotated[str, typer.Option(help="owner's node name")] = "health-authority",
    out: Annotated[Path, typer.Option(help="approval file to write")] = Path("approval.json"),
) -> None:
    """As the data owner, sign an approval bound to the package's content hash."""
    with exit_on(GovernanceError):
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise typer.BadParameter("not an Ed25519 private key", param_hint="--key")
        approval = approve_package(directory, private, owner)
    out.write_text(approval.model_dump_json(indent=2), encoding="utf-8")
    console.print(f"approved {approval.package_name} {approval.package_version} "
                  f"sha256 {approval.package_sha256} -> {out}")


@app.command("verify")
def verify_command(
    directory: PackageDir,
    approval_file: Annotated[Path, typer.Option("--approval", help="approval JSON")],
    public_key: Annotated[Path, typer.Option(help="owner's Ed25519 public key (PEM)")],
) -> None:
    """Check that the owner's approval covers this exact package content."""
    with exit_on(GovernanceError, ValueError):
        public = serialization.load_pem_public_key(public_key.read_bytes())
        if not isinstance(public, Ed25519PublicKey):
            raise typer.BadParameter("not an Ed25519 public key", param_hint="--public-key")
        approval = PackageApproval.model_validate(json.loads(approval_file.read_text("utf-8")))
        digest = verify_approval(directory, approval, public)
    console.print(f"approved: sha256 {digest}")
