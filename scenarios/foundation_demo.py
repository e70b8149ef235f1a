"""`cogov demo`: start the reference federation, show nodes talking, stop them."""

from typing import Annotated

import typer
from rich.console import Console

from parties import supervisor
from parties.cli import StateOption, TopologyOption, down, resolve_topology, up
from parties.client import NodeClient
from parties.errors import RemoteError
from parties.node_log import read_log
from parties.state import StateDir, default_state_dir

console = Console()


def demo(
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    keep_running: Annotated[bool, typer.Option(help="Leave the nodes up afterwards.")] = False,
) -> None:
    """Run the Suzhou scenario end to end on real node processes over mutual TLS."""
    path, topo = resolve_topology(state, topology)
    st = StateDir(state)
    console.rule("[bold]1. start the federation")
    try:
        up(state=state, topology=path, nodes=None)
        console.rule("[bold]2. an allowed cross-domain call: health-net -> gov-net")
        with NodeClient(st, topo, "health-authority") as client:
            pong = client.get("operator", "/v1/ping", kind="ping").json()
        console.print(
            f"health-authority ({pong['caller_domain']}) -> operator ({pong['domain']}): "
            f"[green]answered[/green], the operator saw caller {pong['caller']!r}"
        )
        console.rule("[bold]3. a forbidden cross-domain call: health-net -> insurance-net")
        with NodeClient(st, topo, "hospital-1") as client:
            try:
                # Skip the client's own topology check to show the receiving node refusing.
                client.get("insurer-a", "/v1/ping", kind="ping", check_flow=False)
                console.print("[red]unexpectedly allowed[/red]")
                raise typer.Exit(1)
            except RemoteError as exc:
                console.print(f"hospital-1 -> insurer-a: [red]{exc.error}[/red] "
                              f"(HTTP {exc.http_status}): {exc.detail}")
        refusals = [e for e in read_log(st.node("insurer-a").log) if e["event"] == "refused"]
        console.print(f"insurer-a logged the refusal: {refusals[-1]}")
    finally:
        if not keep_running:
            console.rule("[bold]4. stop the federation")
            down(state=state, topology=path, nodes=None, grace=10.0)
            left = [n.name for n in topo.nodes if supervisor.running_pid(st, n.name)]
            console.print("no node process left" if not left else f"[red]still running: {left}")
