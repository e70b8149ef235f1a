"""`cogov package ...` and `cogov catalogue ...`: in-air development across the running nodes.

The developer (by default the regulator, the product owner) tests a package on the
synthetic sample library fetched from the operator, submits it to the operator's
secure room, and asks for production runs; the data owner (the health authority)
builds and publishes the development libraries, reviews and approves. `init` and
`verify` work on local files only (`parties.secure_room.cli`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import pyarrow as pa
import typer
from rich.console import Console
from rich.table import Table

from governance.errors import GovernanceError
from governance.packages import load_manifest, package_hash
from parties.runtime.cli import StateOption, TopologyOption, exit_on, resolve_topology
from parties.runtime.client import NodeClient
from parties.runtime.errors import NodeError
from parties.runtime.pki import federation_signing_keys
from parties.runtime.state import StateDir, default_state_dir
from parties.runtime.topology import Role, Topology
from parties.secure_room import cli as local
from parties.secure_room.errors import LibraryInvalid
from parties.secure_room.room import PackageRun, run_package
from parties.services.package_approval import seal_query_table
from parties.services.secure_room import (
    LONG_CALL_S,
    LibraryDownload,
    library_hash,
    package_to_wire,
    write_wire_files,
)

console = Console()
package_app = typer.Typer(
    help="Algorithm packages: develop on the sample library, validate in the operator's secure "
    "room, approve as the data owner, run on the authorized library.",
    no_args_is_help=True,
)
catalogue_app = typer.Typer(help="The operator's product catalogue.", no_args_is_help=True)

package_app.command("init")(local.init_command)
package_app.command("verify")(local.verify_command)

NodeOption = Annotated[str | None, typer.Option(
    "--node", help="Act as this node (default: the role's first node in the topology).")]
LibraryName = Annotated[str, typer.Option("--library-name", help="Dataset's library name.")]
Sha256Argument = Annotated[str, typer.Argument(help="package SHA-256 (from `package submit`)")]


def _acting(topology: Topology, node: str | None, role: Role) -> str:
    if node is not None:
        if not topology.has_node(node):
            console.print(f"[red]{node!r} is not a node of topology {topology.name!r}[/red]")
            raise typer.Exit(2)
        return node
    nodes = topology.nodes_with_role(role)
    if not nodes:
        console.print(f"[red]the topology has no {role.value} node[/red]")
        raise typer.Exit(2)
    return nodes[0].name


def _one(topology: Topology, role: Role) -> str:
    return _acting(topology, None, role)


def _client(state: Path, topology: Topology, node: str) -> NodeClient:
    return NodeClient(StateDir(state), topology, node, timeout=LONG_CALL_S)


# --- developer side ---------------------------------------------------------------------------


def fetch_sample(state: Path, topology: Topology, node: str, name: str) -> Path:
    """Download the sample library from the operator once per hash; return its directory."""
    operator = _one(topology, Role.OPERATOR)
    with _client(state, topology, node) as client:
        download = LibraryDownload.model_validate(client.get(
            operator, f"/v1/secure-room/libraries/{name}/sample", kind="catalogue").json())
    cache = StateDir(state).node(node).root / "libraries" / name
    target = cache / f"sample-{download.sha256[:16]}"
    if target.is_dir() and library_hash(target) == download.sha256:
        return target
    stage = cache / f".stage-{download.sha256[:16]}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    write_wire_files(download.files, stage, max_files=16, max_bytes=256 * 1024**2)
    if library_hash(stage) != download.sha256:
        raise LibraryInvalid("the downloaded sample library does not have its announced hash")
    if target.exists():
        shutil.rmtree(target)
    stage.rename(target)
    return target


@package_app.command("test")
def test_command(
    directory: local.PackageDir,
    library: Annotated[Path | None, typer.Option(
        "--library", "-l", help="A local library directory instead of the operator's sample.")]
    = None,
    library_name: LibraryName = "claim_check",
    node: NodeOption = None,
    rows: Annotated[int, typer.Option(help="output rows to show")] = 10,
    skip_static_gate: Annotated[bool, typer.Option(
        help="run even when static checks find errors (findings are still shown)")] = False,
    cpu: local.CpuOption = 30,
    memory: local.MemoryOption = 2048,
    wall: local.WallOption = 60.0,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Run the package here, in the sandbox, on the sample library (fetched from the operator)."""
    with exit_on(GovernanceError, NodeError):
        if library is None:
            _, topo = resolve_topology(state, topology)
            library = fetch_sample(state, topo, _acting(topo, node, Role.REGULATOR),
                                   library_name)
            console.print(f"sample library {library_name}: {library}")
        run = run_package(directory, library, limits=local._limits(cpu, memory, wall),
                          static_checks=not skip_static_gate)
    local._show(run, rows)
    raise typer.Exit(code=0 if run.report.accepted else 1)


def _show_report(report: dict[str, Any]) -> None:
    local._show(PackageRun.model_validate({"report": report}), rows=0)


@package_app.command("submit")
def submit_command(
    directory: local.PackageDir,
    library_name: LibraryName = "claim_check",
    node: NodeOption = None,
    report_path: Annotated[Path | None, typer.Option(
        "--report", help="Also write the validation report here (JSON).")] = None,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Send the package to the operator's secure room; show its validation report."""
    _, topo = resolve_topology(state, topology)
    me = _acting(topo, node, Role.REGULATOR)
    with exit_on(GovernanceError, NodeError):
        load_manifest(directory)
        digest = package_hash(directory)
        body = {"files": [f.model_dump() for f in package_to_wire(directory)],
                "library": library_name}
        with _client(state, topo, me) as client:
            sub = client.post(_one(topo, Role.OPERATOR), "/v1/secure-room/packages",
                              kind="catalogue", json=body).json()
    if report_path is not None:
        report_path.write_text(json.dumps(sub, indent=2), encoding="utf-8")
    _show_report(sub["report"])
    review = "sent to the data owner for review" if sub["forwarded_for_review"] else (
        "not sent for review")
    console.print(f"package sha256 {digest}; report sha256 {sub['report_sha256']}; {review}")
    raise typer.Exit(code=0 if sub["accepted"] else 1)


def read_query_table(path: Path) -> pa.Table:
    """A query table from Parquet, or CSV typed by convention.

    CSV: `*_fen` columns are integers, `*_date` columns ISO dates, and
    `covered_categories` a `;`-separated list.
    """
    if path.suffix == ".parquet":
        return pa.Table.from_pandas(pd.read_parquet(path), preserve_index=False)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in frame.columns:
        if column.endswith("_fen"):
            frame[column] = frame[column].astype("int64")
        elif column.endswith("_date"):
            frame[column] = pd.to_datetime(frame[column]).dt.date
        elif column == "covered_categories":
            frame[column] = frame[column].map(lambda text: [c for c in text.split(";") if c])
    return pa.Table.from_pandas(frame, preserve_index=False)


@package_app.command("run")
def run_command(
    sha256: Sha256Argument,
    query: Annotated[list[str] | None, typer.Option(
        "--query", "-q", help="TABLE=FILE: a query table (CSV or Parquet) the package reads, "
        "sealed to the data owner; repeatable.")] = None,
    node: NodeOption = None,
    rows: Annotated[int, typer.Option(help="output rows to show")] = 10,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Run an approved package on the authorized library (at the data owner); catalogue it."""
    _, topo = resolve_topology(state, topology)
    me = _acting(topo, node, Role.REGULATOR)
    owner = _one(topo, Role.HEALTH_AUTHORITY)
    with exit_on(GovernanceError, NodeError, OSError, ValueError):
        owner_key = federation_signing_keys(StateDir(state), [owner])[owner]
        sealed = {}
        for item in query or []:
            name, _, file = item.partition("=")
            if not name or not file:
                raise typer.BadParameter(f"{item!r} is not TABLE=FILE", param_hint="--query")
            sealed[name] = seal_query_table(read_query_table(Path(file)), owner_key, sha256)
        with _client(state, topo, me) as client:
            entry = client.post(_one(topo, Role.OPERATOR), f"/v1/secure-room/packages/{sha256}/run",
                                kind="catalogue", json={"query": sealed}).json()
    _show_report(entry["report"])
    if entry["output"] is None:
        console.print("[red]the production run was not accepted; nothing was catalogued[/red]")
        raise typer.Exit(1)
    console.print(f"catalogued as product {entry['product_id']}: {entry['rows']} rows, "
                  f"{entry['suppressed_groups']} groups suppressed, output sha256 "
                  f"{entry['output_sha256']}")
    _show_rows(entry["output"], rows)


# --- data owner side --------------------------------------------------------------------------


@package_app.command("libraries")
def libraries_command(
    library_name: LibraryName = "claim_check",
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
    with exit_on(GovernanceError, NodeError), _client(state, topo, me) as client:
        built = client.post(me, "/v1/packages/libraries", kind="admin", json={
            "name": library_name, "sample_rows": sample_rows, "test_rows": test_rows,
            "seed": seed}).json()
    for lib in built:
        tables = ", ".join(f"{n} {r}" for n, r in lib["tables"].items())
        console.print(f"[bold]{lib['name']} {lib['kind']}[/bold] sha256 {lib['sha256']} "
                      f"({tables}; {lib['build_seconds']:.1f} s)")
        report = lib["report"]
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
        found = client.get(me, "/v1/packages/reviews", kind="admin").json()
    if not found:
        console.print("no package was handed over for review")
    for r in found:
        report = r["report"]
        console.print(
            f"{r['package_sha256']} {r['name']} {r['version']} from {r['submitter']}: "
            f"{report['outcome']} on the test library ({report.get('wall_seconds') or 0:.2f} s),"
            f" {'approved' if r['approval'] else 'not approved'}")


@package_app.command("approve")
def approve_command(
    sha256: Sha256Argument,
    node: NodeOption = None,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """As the data owner: sign an approval bound to this package hash (after its report)."""
    _, topo = resolve_topology(state, topology)
    me = _acting(topo, node, Role.HEALTH_AUTHORITY)
    with exit_on(NodeError), _client(state, topo, me) as client:
        review = client.post(me, f"/v1/packages/{sha256}/approve", kind="admin").json()
    _show_report(review["report"])
    approval = review["approval"]
    console.print(f"approved {approval['package_name']} {approval['package_version']} sha256 "
                  f"{approval['package_sha256']} as {approval['owner']} "
                  f"at {approval['approved_at']}")


# --- catalogue --------------------------------------------------------------------------------


def _show_rows(records: list[dict], rows: int) -> None:
    if records and rows:
        table = Table(*records[0].keys())
        for record in records[:rows]:
            table.add_row(*(str(v) for v in record.values()))
        console.print(table)


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
        entries = client.get(_one(topo, Role.OPERATOR), "/v1/catalogue",
                             kind="catalogue").json()
    if not entries:
        console.print("the catalogue is empty")
    for e in entries:
        console.print(f"{e['product_id']} {e['name']} {e['version']} ({e['package_sha256'][:16]})"
                      f" from {e['owner']}: {e['rows']} rows, {e['suppressed_groups']} groups "
                      f"suppressed, published {e['published_at']}")


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
    with exit_on(NodeError), _client(state, topo, me) as client:
        entry = client.get(_one(topo, Role.OPERATOR), f"/v1/catalogue/{product_id}",
                           kind="catalogue").json()
    _show_report(entry["report"])
    console.print(f"product {entry['product_id']}: {entry['name']} {entry['version']} on the "
                  f"{entry['library']} library of {entry['owner']}, {entry['rows']} rows, output "
                  f"sha256 {entry['output_sha256']}")
    if out is not None:
        out.write_text(json.dumps(entry["output"], indent=2, ensure_ascii=False), "utf-8")
    _show_rows(entry["output"], rows)
