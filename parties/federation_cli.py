"""`cogov pki|node|up|status|down|docs`: run a federation of nodes."""

import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from parties.ledger.api import LogAlreadyStarted, log_node
from parties.ledger.first_checkpoint import pin_first_checkpoint
from parties.ledger.pin import LogPin
from parties.node import open_node, serve_node
from parties.runtime import pki, supervisor
from parties.runtime.cli import (
    NodesOption,
    StateOption,
    TopologyOption,
    console,
    node_names,
    resolve_topology,
)
from parties.runtime.state import StateDir, default_state_dir
from parties.runtime.topology import Topology

pki_app = typer.Typer(help="The federation CA and node certificates.", no_args_is_help=True)
node_app = typer.Typer(help="Run a single node in the foreground.", no_args_is_help=True)


def init_federation(state: StateDir, topology: Topology, *, force: bool = False) -> LogPin:
    """The CA, every node's key and certificate, and the log's first checkpoint pinned;
    refused, before anything is written, where the operator already keeps a log."""
    operator = log_node(topology)
    if state.node(operator).db.exists():
        raise LogAlreadyStarted(f"{state.node(operator).db} exists: the log's first "
                                "checkpoint is pinned once, on a new federation")
    pki.init_federation(state, topology, force=force)
    return pin_first_checkpoint(open_node(state, topology, operator))


@pki_app.command("init")
def pki_init(
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    force: Annotated[bool, typer.Option(help="Replace an existing CA.")] = False,
) -> None:
    """Create the federation CA and a key + certificate for every node of the topology, and
    pin the log's first checkpoint in every node's directory."""
    _, topo = resolve_topology(state, topology)
    try:
        pin = init_federation(StateDir(state), topo, force=force)
    except (pki.PkiError, LogAlreadyStarted) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"CA and {len(topo.nodes)} node certificates written to {state}/; the "
                  f"log's first checkpoint (root {pin.tree_head.root_hash[:16]}...) pinned "
                  "in every node's directory")


@pki_app.command("issue")
def pki_issue(
    name: str,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Issue a new key and certificate for node NAME (e.g. after a revocation)."""
    _issue(name, state, topology, renew=False)


@pki_app.command("renew")
def pki_renew(
    name: str,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Renew node NAME's TLS key and certificate, keeping its log signing key."""
    _issue(name, state, topology, renew=True)


def _issue(name: str, state: Path, topology: Path | None, *, renew: bool) -> None:
    _, topo = resolve_topology(state, topology)
    if not topo.has_node(name):
        console.print(f"[red]{name!r} is not a node of topology {topo.name!r}[/red]")
        raise typer.Exit(2)
    try:
        st = StateDir(state)
        cert = pki.issue_node_certificate(
            st, name, topo.node(name).host,
            signing_key=pki.load_signing_key(st, name) if renew else None)
    except (pki.PkiError, OSError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    kept = " (same signing key)" if renew else ""
    console.print(f"issued certificate {cert.serial_number:x} to {name}{kept}")


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
    for col in ("node", "role", "trust domain", "address", "pid", "status"):
        table.add_column(col)
    for r in rows:
        colour = "green" if r.status == "ok" else "red"
        table.add_row(r.name, r.role, r.trust_domain, r.url, str(r.pid or "-"),
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
        init_federation(st, topo)
        console.print(f"created the federation CA and node certificates in {state}/")
    recorded = st.root / "topology.toml"
    if path.resolve() != recorded.resolve():
        shutil.copyfile(path, recorded)
    rows = supervisor.up(st, topo, recorded, node_names(nodes, topo))
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
    console.print(_status_table(supervisor.status(StateDir(state), topo, node_names(nodes, topo))))


def down(
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    nodes: NodesOption = None,
    grace: Annotated[float, typer.Option(help="Seconds before SIGKILL.")] = 10.0,
) -> None:
    """Stop the nodes: SIGTERM, then SIGKILL after --grace seconds; no process is left behind."""
    _, topo = resolve_topology(state, topology)
    outcomes = supervisor.down(StateDir(state), topo, node_names(nodes, topo), grace)
    for name, outcome in outcomes.items():
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
    from parties.runtime.topology_diagram import render_svg

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
