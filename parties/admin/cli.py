"""`cogov admin enroll|login`: the operator administrator's second factor."""

import time
from typing import Annotated

import typer
from rich.console import Console

from governance.second_factor import totp_code
from parties.admin.api import ENROLL, OPEN_SESSION, SessionRequest
from parties.runtime.cli import StateOption, TopologyOption, exit_on, resolve_topology
from parties.runtime.client import NodeClient
from parties.runtime.errors import NodeError
from parties.runtime.session_file import save_session
from parties.runtime.state import StateDir, default_state_dir, write_private

console = Console()
admin_app = typer.Typer(help="Second factor (TOTP) for operator admin commands.",
                        no_args_is_help=True)

NodeOption = Annotated[str, typer.Option("--node", help="The node to administer.")]


def secret_file(state: StateDir, node: str):
    return state.node(node).root / "totp.secret"


@admin_app.command("enroll")
def enroll(
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    node: NodeOption = "operator",
    save_secret: Annotated[
        bool,
        typer.Option(help="Keep the secret in the node's state dir (simulations only: it "
                     "puts both factors on one disk)."),
    ] = False,
) -> None:
    """Enroll a TOTP secret; add the printed URI to an authenticator app."""
    _, topo = resolve_topology(state, topology)
    st = StateDir(state)
    with exit_on(NodeError), NodeClient(st, topo, node) as client:
        enrollment = client.call(node, ENROLL)
    console.print(f"provisioning URI: {enrollment.provisioning_uri}")
    if save_secret:
        write_private(secret_file(st, node), enrollment.secret.encode())
        console.print(f"secret saved to {secret_file(st, node)}")


def login_with_code(st: StateDir, topo, node: str, code: str) -> None:
    with NodeClient(st, topo, node) as client:
        session = client.call(node, OPEN_SESSION, SessionRequest(code=code))
    save_session(st.node(node), session.token)


def login_with_saved_secret(st: StateDir, topo, node: str) -> None:
    """Simulation helper: derive the current code from the saved secret."""
    secret = secret_file(st, node).read_text().strip()
    login_with_code(st, topo, node, totp_code(secret, time.time()))


@admin_app.command("login")
def login(
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    node: NodeOption = "operator",
    code: Annotated[
        str | None, typer.Option(envvar="COGOV_TOTP", help="Current TOTP code.")
    ] = None,
) -> None:
    """Open an admin session (15 minutes) with a TOTP code."""
    _, topo = resolve_topology(state, topology)
    st = StateDir(state)
    with exit_on(NodeError):
        if code is None and secret_file(st, node).exists():
            login_with_saved_secret(st, topo, node)
        else:
            login_with_code(st, topo, node, code or typer.prompt("TOTP code"))
    console.print(f"admin session open on {node}")


def register(app: typer.Typer) -> None:
    app.add_typer(admin_app, name="admin")
