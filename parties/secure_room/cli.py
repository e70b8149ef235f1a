"""`cogov package ...` and `cogov catalogue ...`: in-air development, on local files or across
the running nodes.

The developer (by default the regulator, the product owner) tests a package on the
synthetic sample library fetched from the operator, submits it to the operator's
secure room, and asks for production runs; the data owner (the health authority)
builds and publishes the development libraries, reviews and approves. `init` and
`verify` work on local files only; `test` and `submit` with `--library DIR`, and
`approve` with `--key`, do the same work here, offline, on local directories.
"""

import json
import shutil
from pathlib import Path
from typing import Annotated, Any, NoReturn

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
    package_hash,
    verify_approval,
    write_package_hash,
)
from mpc.claim.constants import CLAIM_SCENARIO
from parties.runtime.cli import (
    ExitCode,
    StateOption,
    TopologyOption,
    exit_on,
    fail,
    resolve_topology,
)
from parties.runtime.client import NodeClient
from parties.runtime.errors import NodeError
from parties.runtime.pki import federation_signing_keys
from parties.runtime.state import StateDir, default_state_dir
from parties.runtime.topology import Role, Topology
from parties.secure_room.api import (
    APPROVE,
    BUILD_LIBRARIES,
    CATALOGUE,
    LONG_CALL_S,
    MAX_LIBRARY_BYTES,
    MAX_LIBRARY_FILES,
    PRODUCT,
    REVIEWS,
    RUN_PACKAGE,
    SAMPLE_LIBRARY,
    SUBMIT_PACKAGE,
    LibraryBuild,
    LibraryInvalid,
    PackageUpload,
    RunRequest,
)
from parties.secure_room.query_tables import read_query_table, seal_query_table
from parties.secure_room.room import PackageRun, run_package
from parties.secure_room.sandbox import SandboxLimits
from parties.secure_room.wire import library_hash, package_to_wire, write_wire_files

console = Console()
package_app = typer.Typer(
    help="Algorithm packages: develop on the sample library, validate in the operator's secure "
    "room, approve as the data owner, run on the authorized library.",
    no_args_is_help=True,
)
catalogue_app = typer.Typer(help="The operator's product catalogue.", no_args_is_help=True)

PackageDir = Annotated[Path, typer.Argument(help="package directory (holds manifest.toml)")]
NodeOption = Annotated[str | None, typer.Option(
    "--node", help="Act as this node (default: the role's first node in the topology).")]
LibraryName = Annotated[str, typer.Option("--library-name", help="Dataset's library name.")]
Sha256Argument = Annotated[str, typer.Argument(help="package SHA-256 (from `package submit`)")]
CpuOption = Annotated[int, typer.Option(help="CPU-time limit, seconds")]
MemoryOption = Annotated[int, typer.Option(help="address-space limit, MiB")]
WallOption = Annotated[float, typer.Option(help="wall-clock limit, seconds")]
RowsOption = Annotated[int, typer.Option(help="output rows to show")]


def _acting(topology: Topology, node: str | None, role: Role) -> str:
    if node is not None:
        if not topology.has_node(node):
            fail("UnknownNode", f"{node!r} is not a node of topology {topology.name!r}",
                 ExitCode.BAD_INPUT)
        return node
    nodes = topology.nodes_with_role(role)
    if not nodes:
        fail("UnknownNode", f"the topology has no {role.value} node", ExitCode.BAD_INPUT)
    return nodes[0].name


def _one(topology: Topology, role: Role) -> str:
    return _acting(topology, None, role)


def _client(state: Path, topology: Topology, node: str) -> NodeClient:
    return NodeClient(StateDir(state), topology, node, timeout=LONG_CALL_S)


def _limits(cpu: int, memory_mib: int, wall: float) -> SandboxLimits:
    return SandboxLimits(cpu_seconds=cpu, memory_bytes=memory_mib * 1024**2, wall_seconds=wall)


def _exit_with(accepted: bool) -> NoReturn:
    raise typer.Exit(int(ExitCode.DONE if accepted else ExitCode.REFUSED))


# --- showing reports and outputs --------------------------------------------------------------


def _show(run: PackageRun, rows: int) -> None:
    report = run.report
    colour = "green" if report.accepted else "red"
    console.print(f"[bold]{report.package_name} {report.package_version}[/bold] "
                  f"sha256 {report.package_sha256} on the {report.library} library: "
                  f"[{colour}]{report.outcome}[/{colour}]")
    for finding in report.static_findings:
        console.print(f"  {finding.severity} {finding.code} {finding.file}:{finding.line or '-'}"
                      f" {finding.message}")
    if report.ran and report.wall_seconds is not None:
        memory = (report.peak_memory_bytes or 0) / 1024**2
        console.print(f"  exit {report.exit_code}, {report.wall_seconds:.2f} s wall, "
                      f"{report.cpu_seconds or 0:.2f} s CPU, peak {memory:.0f} MiB, "
                      f"isolation {report.isolation}")
    if report.policy_decision:
        console.print(f"  policy: {report.policy_decision}")
    if report.detail:  # sample and test libraries only: capped and scrubbed by the room
        console.print(report.detail, markup=False, highlight=False)
    if report.bits_per_claim is not None:
        console.print(f"  a verdict row carries at most {report.bits_per_claim:.1f} bits")
    if report.suppressed_groups:
        console.print(f"  suppressed {report.suppressed_groups} groups under k={report.k}")
    _show_rows(run.output, rows)


def _show_report(report: dict[str, Any]) -> None:
    _show(PackageRun.model_validate({"report": report}), rows=0)


def _show_rows(records: list[dict] | None, rows: int) -> None:
    if records and rows:
        table = Table(*records[0].keys())
        for record in records[:rows]:
            table.add_row(*(str(v) for v in record.values()))
        console.print(table)


# --- developer side ---------------------------------------------------------------------------


def fetch_sample(state: Path, topology: Topology, node: str, name: str) -> Path:
    """Download the sample library from the operator once per hash; return its directory."""
    operator = _one(topology, Role.OPERATOR)
    with _client(state, topology, node) as client:
        download = client.call(operator, SAMPLE_LIBRARY, params={"name": name})
    cache = StateDir(state).node(node).root / "libraries" / name
    target = cache / f"sample-{download.sha256[:16]}"
    if target.is_dir() and library_hash(target) == download.sha256:
        return target
    stage = cache / f".stage-{download.sha256[:16]}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    write_wire_files(download.files, stage, max_files=MAX_LIBRARY_FILES,
                     max_bytes=MAX_LIBRARY_BYTES)
    if library_hash(stage) != download.sha256:
        raise LibraryInvalid("the downloaded sample library does not have its announced hash")
    if target.exists():
        shutil.rmtree(target)
    stage.rename(target)
    return target


@package_app.command("init")
def init_command(
    directory: PackageDir,
    name: Annotated[str, typer.Option(help="package name (lowercase, - or _)")] = "my-package",
) -> None:
    """Scaffold a runnable package: manifest.toml and an entry-point module."""
    with exit_on(GovernanceError):
        init_package(directory, name)
    console.print(f"created {directory}/manifest.toml; edit it, then `package test`")


@package_app.command("test")
def test_command(
    directory: PackageDir,
    library: Annotated[Path | None, typer.Option(
        "--library", "-l", help="A local library directory instead of the operator's sample.")]
    = None,
    library_name: LibraryName = CLAIM_SCENARIO,
    node: NodeOption = None,
    rows: RowsOption = 10,
    skip_static_gate: Annotated[bool, typer.Option(
        help="run even when static checks find errors (findings are still shown)")] = False,
    cpu: CpuOption = 30,
    memory: MemoryOption = 2048,
    wall: WallOption = 60.0,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Run the package here, in the sandbox, on the sample library (fetched from the operator)."""
    with exit_on(GovernanceError, NodeError, ValueError):
        if library is None:
            _, topo = resolve_topology(state, topology)
            library = fetch_sample(state, topo, _acting(topo, node, Role.REGULATOR),
                                   library_name)
            console.print(f"sample library {library_name}: {library}")
        run = run_package(directory, library, limits=_limits(cpu, memory, wall),
                          static_checks=not skip_static_gate)
    _show(run, rows)
    _exit_with(run.report.accepted)


def _validate_here(directory: Path, library: Path, report_path: Path | None,
                   limits: SandboxLimits) -> NoReturn:
    """Record package.sha256, validate on a local library, write the validation report."""
    with exit_on(GovernanceError, NodeError):
        manifest = load_manifest(directory)
        digest = write_package_hash(directory)
        run = run_package(directory, library, limits=limits)
    target = report_path or Path(f"{manifest.name}-{manifest.version}.validation.json")
    tmp = target.with_suffix(".tmp")
    tmp.write_text(run.report.model_dump_json(indent=2), encoding="utf-8")
    tmp.replace(target)
    _show(run, rows=0)
    console.print(f"package.sha256 {digest}; report written to {target}")
    _exit_with(run.report.accepted)


@package_app.command("submit")
def submit_command(
    directory: PackageDir,
    library: Annotated[Path | None, typer.Option(
        "--library", "-l", help="Validate here on this local library directory instead of in "
        "the operator's secure room (records package.sha256).")] = None,
    library_name: LibraryName = CLAIM_SCENARIO,
    node: NodeOption = None,
    report_path: Annotated[Path | None, typer.Option(
        "--report", help="Also write the validation report here (JSON; with --library, by "
        "default NAME-VERSION.validation.json).")] = None,
    cpu: CpuOption = 30,
    memory: MemoryOption = 2048,
    wall: WallOption = 60.0,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Send the package to the operator's secure room; show its validation report."""
    if library is not None:
        _validate_here(directory, library, report_path, _limits(cpu, memory, wall))
    _, topo = resolve_topology(state, topology)
    me = _acting(topo, node, Role.REGULATOR)
    with exit_on(GovernanceError, NodeError, ValueError):
        load_manifest(directory)
        digest = package_hash(directory)
        upload = PackageUpload(files=package_to_wire(directory), library=library_name)
        with _client(state, topo, me) as client:
            sub = client.call(_one(topo, Role.OPERATOR), SUBMIT_PACKAGE, upload)
    if report_path is not None:
        report_path.write_text(json.dumps(sub.model_dump(mode="json"), indent=2),
                               encoding="utf-8")
    _show_report(sub.report)
    review = "sent to the data owner for review" if sub.forwarded_for_review else (
        "not sent for review")
    console.print(f"package sha256 {digest}; report sha256 {sub.report_sha256}; {review}")
    _exit_with(sub.accepted)


@package_app.command("run")
def run_command(
    sha256: Sha256Argument,
    query: Annotated[list[str] | None, typer.Option(
        "--query", "-q", help="TABLE=FILE: a query table (CSV or Parquet) the package reads, "
        "sealed to the data owner; repeatable.")] = None,
    contract: Annotated[str, typer.Option(
        "--contract", help="The package-run contract (in force, naming the package's "
        "output) the run is made under.")] = "",
    node: NodeOption = None,
    rows: RowsOption = 10,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Run an approved package on the authorized library (at the data owner); catalogue it."""
    _, topo = resolve_topology(state, topology)
    me = _acting(topo, node, Role.REGULATOR)
    owner = _one(topo, Role.HEALTH_AUTHORITY)
    if not contract:
        raise typer.BadParameter("a production run is made under a contract",
                                 param_hint="--contract")
    with exit_on(GovernanceError, NodeError, OSError, ValueError):
        owner_key = federation_signing_keys(StateDir(state), [owner])[owner]
        sealed = {}
        for item in query or []:
            name, _, file = item.partition("=")
            if not name or not file:
                raise typer.BadParameter(f"{item!r} is not TABLE=FILE", param_hint="--query")
            sealed[name] = seal_query_table(read_query_table(Path(file)), owner_key, sha256)
        request = RunRequest(contract_id=contract, query=sealed)
        with _client(state, topo, me) as client:
            entry = client.call(_one(topo, Role.OPERATOR), RUN_PACKAGE, request,
                                params={"sha256": sha256})
    _show_report(entry.report)
    if entry.output is None:
        console.print("[red]the production run was not accepted; nothing was catalogued[/red]")
        raise typer.Exit(int(ExitCode.REFUSED))
    console.print(f"catalogued as product {entry.product_id}: {entry.rows} rows, "
                  f"output sha256 {entry.output_sha256}")
    _show_rows(entry.output, rows)


# --- data owner side --------------------------------------------------------------------------


@package_app.command("libraries")
def libraries_command(
    library_name: LibraryName = CLAIM_SCENARIO,
    sample_rows: Annotated[int, typer.Option(help="synthetic rows in the sample library")] = 500,
    test_rows: Annotated[int, typer.Option(help="rows in the desensitized test library")] = 60,
    seed: Annotated[int, typer.Option(help="random seed of both libraries")] = 7,
    node: NodeOption = None,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """As the data owner: build sample + test libraries from the authorized data; publish them."""
    _, topo = resolve_topology(state, topology)
    me = _acting(topo, node, Role.HEALTH_AUTHORITY)
    with exit_on(GovernanceError, NodeError, ValueError), _client(state, topo, me) as client:
        build = LibraryBuild(name=library_name, sample_rows=sample_rows, test_rows=test_rows,
                             seed=seed)
        built = client.call(me, BUILD_LIBRARIES, build)
    for lib in built:
        tables = ", ".join(f"{n} {r}" for n, r in lib.tables.items())
        console.print(f"[bold]{lib.name} {lib.kind}[/bold] sha256 {lib.sha256} "
                      f"({tables}; {lib.build_seconds:.1f} s)")
        report = lib.report
        if report:
            fidelity = Table("column", "metric", "value", title="sample fidelity")
            for column, f in report["fidelity"].items():
                fidelity.add_row(column, f["metric"], f"{f['value']:.3f}")
            console.print(fidelity)
            console.print(
                f"privacy: {report['exact_matches']} exact copies, "
                f"{report['rows_below_threshold']} rows closer than the DCR threshold "
                f"{report['dcr_threshold']:.4f} (min DCR {report['dcr_min']:.4f}, real-to-real "
                f"p5 {report['real_dcr_p5']:.4f}); correlation gap mean "
                f"{report['correlation_mean_abs_diff']:.3f}")


@package_app.command("reviews")
def reviews_command(
    node: NodeOption = None,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """As the data owner: packages handed over for review, with their validation outcome."""
    _, topo = resolve_topology(state, topology)
    me = _acting(topo, node, Role.HEALTH_AUTHORITY)
    with exit_on(NodeError), _client(state, topo, me) as client:
        found = client.call(me, REVIEWS)
    if not found:
        console.print("no package was handed over for review")
    for r in found:
        report = r.report
        console.print(
            f"{r.package_sha256} {r.name} {r.version} from {r.submitter}: "
            f"{report['outcome']} on the test library ({report.get('wall_seconds') or 0:.2f} s),"
            f" {'approved' if r.approval else 'not approved'}")


def _approve_here(directory: Path, key: Path, owner: str, out: Path,
                  row_level_max_rows: int | None) -> None:
    """Sign an approval of the package directory's content hash with a local key file."""
    with exit_on(GovernanceError):
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise typer.BadParameter("not an Ed25519 private key", param_hint="--key")
        approval = approve_package(directory, private, owner,
                                   row_level_max_rows=row_level_max_rows)
    out.write_text(approval.model_dump_json(indent=2), encoding="utf-8")
    console.print(f"approved {approval.package_name} {approval.package_version} "
                  f"sha256 {approval.package_sha256} -> {out}")


@package_app.command("approve")
def approve_command(
    package: Annotated[str, typer.Argument(
        help="package SHA-256 (from `package submit`); with --key, a package directory")],
    key: Annotated[Path | None, typer.Option(
        help="Sign here with this owner's Ed25519 private key (PEM, PKCS#8) instead of at "
        "the owner's node.")] = None,
    owner: Annotated[str, typer.Option(help="owner's node name (with --key)")]
    = "health-authority",
    out: Annotated[Path, typer.Option(help="approval file to write (with --key)")]
    = Path("approval.json"),
    row_level_max_rows: Annotated[int | None, typer.Option(
        min=1, help="with --key: the most rows of row-level output a run may release "
        "(signed; without it, no row-level output)")] = None,
    node: NodeOption = None,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """As the data owner: sign an approval bound to this package hash (after its report)."""
    if key is not None:
        _approve_here(Path(package), key, owner, out, row_level_max_rows)
        return
    _, topo = resolve_topology(state, topology)
    me = _acting(topo, node, Role.HEALTH_AUTHORITY)
    with exit_on(NodeError, ValueError), _client(state, topo, me) as client:
        review = client.call(me, APPROVE, params={"sha256": package})
    _show_report(review.report)
    approval = review.approval
    console.print(f"approved {approval.package_name} {approval.package_version} sha256 "
                  f"{approval.package_sha256} as {approval.owner} "
                  f"at {approval.approved_at}")


@package_app.command("verify")
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


# --- catalogue --------------------------------------------------------------------------------


@catalogue_app.command("list")
def catalogue_list(
    node: NodeOption = None,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Data products published from production runs."""
    _, topo = resolve_topology(state, topology)
    me = _acting(topo, node, Role.REGULATOR)
    with exit_on(NodeError), _client(state, topo, me) as client:
        entries = client.call(_one(topo, Role.OPERATOR), CATALOGUE)
    if not entries:
        console.print("the catalogue is empty")
    for e in entries:
        console.print(f"{e.product_id} {e.name} {e.version} ({e.package_sha256[:16]})"
                      f" from {e.owner}: {e.rows} rows, published {e.published_at}")


@catalogue_app.command("show")
def catalogue_show(
    product_id: Annotated[str, typer.Argument(help="product id (from `catalogue list`)")],
    rows: Annotated[int, typer.Option(help="output rows to show")] = 20,
    out: Annotated[Path | None, typer.Option(help="Write the released output here (JSON).")]
    = None,
    node: NodeOption = None,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """One product: its report and its released output."""
    _, topo = resolve_topology(state, topology)
    me = _acting(topo, node, Role.REGULATOR)
    with exit_on(NodeError, ValueError), _client(state, topo, me) as client:
        entry = client.call(_one(topo, Role.OPERATOR), PRODUCT,
                            params={"product_id": product_id})
    _show_report(entry.report)
    console.print(f"product {entry.product_id}: {entry.name} {entry.version} on the "
                  f"{entry.library} library of {entry.owner}, {entry.rows} rows, output "
                  f"sha256 {entry.output_sha256}")
    if out is not None:
        out.write_text(json.dumps(entry.output, indent=2, ensure_ascii=False), "utf-8")
    _show_rows(entry.output, rows)
