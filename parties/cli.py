"""`cogov pki|node|up|status|down`: run a federation of nodes."""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from parties import pki, supervisor
from parties.server import serve_node
from parties.state import StateDir, default_state_dir
from parties.topology import Topology, TopologyError, load_topology

console = Console()

StateOption = Annotated[
    Path,
    typer.Option(
        "--state", envvar="COGOV_STATE", help="State directory (one subdirectory per node)."
    ),
]
TopologyOption = Annotated[
    Path | None,
    typer.Option(
        "--topology", envvar="COGOV_TOPOLOGY",
        help="Topology TOML. Default: the one `cogov up` recorded in the state dir, "
        "else topologies/suzhou.toml.",
    ),
]
NodesOption = Annotated[
    str | None,
    typer.Option("--nodes", help="Comma-separated node names (default: every node)."),
]

DEFAULT_TOPOLOGY = Path("topologies/suzhou.toml")


@contextmanager
def exit_on(*errors: type[Exception], code: int = 1) -> Iterator[None]:
    """Print an expected error as one line (its typed name and detail) and exit with `code`.

    The name is a remote node's typed error (`exc.error`) if there is one, else the class
    name; the detail is `exc.detail` if set, else the message.
    """
    try:
        yield
    except errors as exc:
        name = getattr(exc, "error", None) or type(exc).__name__
        detail = getattr(exc, "detail", None) or str(exc)
        # Error text is data, not markup: unescaped, "[type=missing ...]" in a message vanishes.
        console.print(f"[bold red]{escape(name)}[/]: {escape(detail)}")
        raise typer.Exit(code) from exc


def resolve_topology(state: Path, topology: Path | None) -> tuple[Path, Topology]:
    """The topology file to use, and its validated contents; exits with the field on error."""
    recorded = StateDir(state).root / "topology.toml"
    path = topology or (recorded if recorded.exists() else DEFAULT_TOPOLOGY)
    try:
        return path, load_topology(path)
    except TopologyError as exc:
        console.print(f"[red]invalid topology:[/red] {exc}")
        raise typer.Exit(2) from exc


def _names(nodes: str | None, topology: Topology) -> list[str] | None:
    if nodes is None:
        return None
    names = [n.strip() for n in nodes.split(",") if n.strip()]
    unknown = [n for n in names if not topology.has_node(n)]
    if unknown:
        console.print(f"[red]unknown node(s):[/red] {', '.join(unknown)}")
        raise typer.Exit(2)
    return names


pki_app = typer.Typer(help="The federation CA and node certificates.", no_args_is_help=True)
node_app = typer.Typer(help="Run a single node in the foreground.", no_args_is_help=True)


@pki_app.command("init")
def pki_init(
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    force: Annotated[bool, typer.Option(help="Replace an existing CA.")] = False,
) -> None:
    """Create the federation CA and a key + certificate for every node of the topology."""
    _, topo = resolve_topology(state, topology)
    try:
        pki.init_federation(StateDir(state), topo, force=force)
    except pki.PkiError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"CA and {len(topo.nodes)} node certificates written to {state}/")


@pki_app.command("issue")
def pki_issue(
    name: str,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Issue a new key and certificate for node NAME (e.g. after a revocation)."""
    _, topo = resolve_topology(state, topology)
    if not topo.has_node(name):
        console.print(f"[red]{name!r} is not a node of topology {topo.name!r}[/red]")
        raise typer.Exit(2)
    try:
        cert = pki.issue_node_certificate(StateDir(state), name, topo.node(name).host)
    except pki.PkiError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"issued certificate {cert.serial_number:x} to {name}")


@pki_app.command("revoke")
def pki_revoke(name: str, state: StateOption = default_state_dir()) -> None:
    """Revoke every certificate issued to node NAME; nodes refuse it from the next connection."""
    try:
        serials = pki.revoke_node(StateDir(state), name)
    except pki.PkiError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"revoked {len(serials)} certificate(s) of {name}")


@node_app.command("run")
def node_run(
    name: Annotated[str, typer.Option("--name", help="The node to run, as named in the topology.")],
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Serve one node in the foreground (one node per machine: see README)."""
    _, topo = resolve_topology(state, topology)
    if not topo.has_node(name):
        console.print(f"[red]{name!r} is not a node of topology {topo.name!r}[/red]")
        raise typer.Exit(2)
    serve_node(StateDir(state), topo, name)


def _status_table(rows: list[supervisor.NodeStatus]) -> Table:
    table = Table(title="cogov nodes")
    for col in ("node", "role", "domain", "address", "pid", "status"):
        table.add_column(col)
    for r in rows:
        colour = "green" if r.status == "ok" else "red"
        table.add_row(r.name, r.role, r.domain, r.url, str(r.pid or "-"),
                      f"[{colour}]{r.status}[/{colour}]")
    return table


def up(
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    nodes: NodesOption = None,
) -> None:
    """Start every node (or --nodes) as its own process and wait until each answers over mTLS."""
    path, topo = resolve_topology(state, topology)
    st = StateDir(state)
    if not st.ca.cert.exists():
        pki.init_federation(st, topo)
        console.print(f"created the federation CA and node certificates in {state}/")
    recorded = st.root / "topology.toml"
    if path.resolve() != recorded.resolve():
        shutil.copyfile(path, recorded)
    rows = supervisor.up(st, topo, recorded, _names(nodes, topo))
    console.print(_status_table(rows))
    if any(r.status != "ok" for r in rows):
        raise typer.Exit(1)


def status(
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    nodes: NodesOption = None,
) -> None:
    """Show each node's process and mTLS health."""
    _, topo = resolve_topology(state, topology)
    console.print(_status_table(supervisor.status(StateDir(state), topo, _names(nodes, topo))))


def down(
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    nodes: NodesOption = None,
    grace: Annotated[float, typer.Option(help="Seconds before SIGKILL.")] = 10.0,
) -> None:
    """Stop the nodes: SIGTERM, then SIGKILL after --grace seconds; no process is left behind."""
    _, topo = resolve_topology(state, topology)
    for name, outcome in supervisor.down(StateDir(state), topo, _names(nodes, topo), grace).items():
        console.print(f"{name}: {outcome}")


docs_app = typer.Typer(help="Documents generated from the code.", no_args_is_help=True)


@docs_app.command("routes")
def docs_routes(
    out: Annotated[Path, typer.Option(help="Where to write the table.")] = Path("docs/routes.md"),
) -> None:
    """Write the route x role table (who may call what) generated from the code."""
    from parties.route_table import default_table

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(default_table())
    console.print(f"route table written to {out}")


@docs_app.command("topology")
def docs_topology(
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    out: Annotated[Path, typer.Option(help="Where to write the SVG.")] = Path(
        "docs/topology.svg"
    ),
) -> None:
    """Draw the topology (domains, nodes, allowed flows) as SVG."""
    from parties.topology_diagram import render_svg

    _, topo = resolve_topology(state, topology)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_svg(topo))
    console.print(f"topology diagram written to {out}")


def register(app: typer.Typer) -> None:
    """Add the federation commands to the `cogov` app."""
    app.add_typer(docs_app, name="docs")
    app.add_typer(pki_app, name="pki")
    app.add_typer(node_app, name="node")
    app.command("up")(up)
    app.command("status")(status)
    app.command("down")(down)
