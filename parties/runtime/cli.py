"""What every `cogov` command shares: the state and topology options, and one way to exit on an
expected error."""

from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from parties.runtime.client import NodeClient
from parties.runtime.errors import NodeUnavailable
from parties.runtime.state import StateDir
from parties.runtime.topology import Role, Topology, TopologyError, load_topology

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


class ExitCode(IntEnum):
    """What every `cogov` command exits with (the table in the README)."""

    DONE = 0
    REFUSED = 1  # a node or a policy refused: contract, consent, quota, flow, state
    BAD_INPUT = 2  # the input is malformed: a file, an option, a field
    UNAVAILABLE = 3  # a node could not be reached or failed


# HTTP statuses of typed refusals that mean "your input is malformed".
_BAD_INPUT_STATUSES = frozenset({400, 411, 413, 415, 422})


def exit_code_of(exc: BaseException) -> ExitCode:
    """The exit code for an expected error: by its kind, never by the command that met it."""
    if isinstance(exc, NodeUnavailable):
        return ExitCode.UNAVAILABLE
    status = getattr(exc, "http_status", None)
    if status is not None:
        if status in _BAD_INPUT_STATUSES:
            return ExitCode.BAD_INPUT
        return ExitCode.UNAVAILABLE if status >= 500 else ExitCode.REFUSED
    if isinstance(exc, ValueError | OSError):
        return ExitCode.BAD_INPUT
    return ExitCode.REFUSED


@contextmanager
def exit_on(*errors: type[Exception]) -> Iterator[None]:
    """Print an expected error as one line (its typed name and detail) and exit with the code
    of its kind (`exit_code_of`).

    The name is a remote node's typed error (`exc.error`) if there is one, else the class
    name; the detail is `exc.detail` if set, else the message.
    """
    try:
        yield
    except errors as exc:
        fail(getattr(exc, "error", None) or type(exc).__name__,
             getattr(exc, "detail", None) or str(exc), exit_code_of(exc), exc)


def fail(name: str, detail: str, code: ExitCode, cause: BaseException | None = None) -> NoReturn:
    """Print one error line and exit with `code`."""
    # Error text is data, not markup: unescaped, "[type=missing ...]" in a message vanishes.
    console.print(f"[bold red]{escape(name)}[/]: {escape(detail)}")
    raise typer.Exit(int(code)) from cause


def resolve_topology(state: Path, topology: Path | None) -> tuple[Path, Topology]:
    """The topology file to use, and its validated contents; exits with the field on error."""
    recorded = StateDir(state).root / "topology.toml"
    path = topology or (recorded if recorded.exists() else DEFAULT_TOPOLOGY)
    try:
        return path, load_topology(path)
    except TopologyError as exc:
        console.print(f"[red]invalid topology:[/red] {exc}")
        raise typer.Exit(2) from exc


# Commands that drive a whole federation step (ingest, a key rotation) wait this long.
LONG_CALL_S = 1800.0


def long_client(state: Path, topology: Topology, node: str) -> NodeClient:
    """A client acting as `node` for a command that may run for many minutes."""
    return NodeClient(StateDir(state), topology, node, timeout=LONG_CALL_S)


def role_node(topology: Topology, role: Role) -> str:
    """The topology's node of `role`; exits with a bad-input error when it has none."""
    nodes = topology.nodes_with_role(role)
    if not nodes:
        fail("TopologyError", f"the topology has no {role.value} node", ExitCode.BAD_INPUT)
    return nodes[0].name


def node_names(nodes: str | None, topology: Topology) -> list[str] | None:
    if nodes is None:
        return None
    names = [n.strip() for n in nodes.split(",") if n.strip()]
    unknown = [n for n in names if not topology.has_node(n)]
    if unknown:
        console.print(f"[red]unknown node(s):[/red] {', '.join(unknown)}")
        raise typer.Exit(2)
    return names
