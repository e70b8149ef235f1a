"""`cogov domain ...`, `cogov govern trace-leak`, `cogov govern rotate-k1` and `cogov govern
oprf-budgets` / `reset-oprf-budget`: the shared domains, the keys behind them and the
authority's OPRF budgets, as the operator's or the authority's local operator
(its own certificate, admin routes)."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from governance.errors import GovernanceError
from governance.leak_tracing import read_leaked_tokens
from parties.domains.api import (
    CREATE_DOMAIN,
    DEFAULT_SCENARIO,
    DELETE_DOMAIN,
    LIST_DOMAINS,
    OPRF_BUDGETS,
    RESET_OPRF_BUDGET,
    ROTATE_DOMAIN_KEY,
    ROTATE_LEVEL1,
    TRACE_LEAK,
    LeakedTokens,
    OprfBudget,
    SharedDomain,
    SharedDomainRequest,
)
from parties.runtime.cli import (
    StateOption,
    TopologyOption,
    exit_on,
    long_client,
    resolve_topology,
    role_node,
)
from parties.runtime.errors import NodeError
from parties.runtime.state import default_state_dir
from parties.runtime.topology import Role

console = Console()
domain_app = typer.Typer(
    help="The operator's shared domains (one per scenario and data user).",
    no_args_is_help=True,
)
#: the commands this capability adds to `cogov govern`
govern_commands = typer.Typer()




@govern_commands.command("trace-leak")
def trace_leak(
    file: Annotated[Path, typer.Argument(help="Leaked tokens or rows (CSV or Parquet).")],
    column: Annotated[str | None, typer.Option(help="Token column (guessed if not given).")]
    = None,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Name the shared domain, and so the data user, that leaked tokens came from."""
    _, topo = resolve_topology(state, topology)
    operator = role_node(topo, Role.OPERATOR)
    with exit_on(NodeError, GovernanceError):
        raw = read_leaked_tokens(file, column)
        tokens = [v.hex() if isinstance(v, bytes) else v for v in raw]
        with long_client(state, topo, operator) as client:
            trace = client.call(operator, TRACE_LEAK, LeakedTokens(tokens=tokens))
    report = trace.report
    table = Table(title=f"leak trace: {report.leaked} tokens, {report.unmatched} unmatched, "
                        f"{report.unparseable} unparseable")
    table.add_column("shared domain", no_wrap=True, min_width=20)
    for head in ("scenario", "data user", "matched", "share", "chance <="):
        table.add_column(head)
    for a in trace.attributed:
        table.add_row(a.domain_id, a.scenario, a.data_user, str(a.matched),
                      f"{a.share:.0%}", f"1e{a.chance_log10:.0f}")
    console.print(table)
    console.print(trace.summary)


@govern_commands.command("rotate-k1")
def rotate_k1(
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Rotate the level-1 key k1 at the health authority; the operator re-derives every token."""
    _, topo = resolve_topology(state, topology)
    authority = role_node(topo, Role.HEALTH_AUTHORITY)
    with exit_on(NodeError), long_client(state, topo, authority) as client, \
            console.status("re-keying p1 and tokens"):
        done = client.call(authority, ROTATE_LEVEL1)
    op = done.operator
    console.print(
        f"k1 rotated: version {done.old_version} -> {done.new_version}, "
        f"{done.persons:,} persons ({done.visits:,} visits) re-keyed at the authority; "
        f"the operator moved {op.persons:,} persons and re-derived the tokens of "
        f"{op.domains} shared domains; key_rotated and tokens_rederived are logged")


def _budget_table(rows: list[OprfBudget]) -> Table:
    table = Table(title="OPRF id budgets at the health authority")
    for head in ("data user", "day", "used", "cap", "state", "incidents"):
        table.add_column(head)
    for b in rows:
        table.add_row(b.data_user, b.day, f"{b.used:,}", f"{b.cap:,}",
                      "spent" if b.spent else "open", str(b.incidents))
    return table


@govern_commands.command("oprf-budgets")
def oprf_budgets(
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Today's OPRF id budget of every data user, as the health authority keeps it."""
    _, topo = resolve_topology(state, topology)
    authority = role_node(topo, Role.HEALTH_AUTHORITY)
    with exit_on(NodeError), long_client(state, topo, authority) as client:
        rows = client.call(authority, OPRF_BUDGETS)
    console.print(_budget_table(rows))


@govern_commands.command("reset-oprf-budget")
def reset_oprf_budget(
    data_user: Annotated[str, typer.Argument(help="The insurer node whose budget tripped.")],
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Lift a data user's tripped OPRF budget and zero its count of today (logged)."""
    _, topo = resolve_topology(state, topology)
    authority = role_node(topo, Role.HEALTH_AUTHORITY)
    with exit_on(NodeError), long_client(state, topo, authority) as client:
        done = client.call(authority, RESET_OPRF_BUDGET, params={"data_user": data_user})
    console.print(_budget_table([done]))
    console.print(f"OPRF budget of {data_user} reset; oprf_budget_reset is logged")


def _domain_table(rows: list[SharedDomain]) -> Table:
    table = Table(title="shared domains")
    table.add_column("shared domain", no_wrap=True, min_width=20)
    for head in ("scenario", "data user", "tokens", "persons", "created", "deleted"):
        table.add_column(head)
    for d in rows:
        table.add_row(d.domain_id, d.scenario, d.data_user, f"{d.tokens:,}",
                      f"{d.persons:,}", d.created_at, d.deleted_at or "")
    return table


@domain_app.command("create")
def domain_create(
    data_user: Annotated[str, typer.Option("--data-user", help="The insurer node.")],
    scenario: Annotated[str, typer.Option(help="The scenario.")] = DEFAULT_SCENARIO,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Create the shared domain of (scenario, data user) with a fresh key k2[d], filled with
    tokens."""
    _, topo = resolve_topology(state, topology)
    operator = role_node(topo, Role.OPERATOR)
    with exit_on(NodeError, ValueError), long_client(state, topo, operator) as client, \
            console.status("re-keying tokens"):
        info = client.call(operator, CREATE_DOMAIN,
                           SharedDomainRequest(scenario=scenario, data_user=data_user))
    console.print(_domain_table([info]))


@domain_app.command("list")
def domain_list(
    all_: Annotated[bool, typer.Option("--all", help="Include deleted shared domains.")] = False,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """List the operator's shared domains."""
    _, topo = resolve_topology(state, topology)
    operator = role_node(topo, Role.OPERATOR)
    with exit_on(NodeError), long_client(state, topo, operator) as client:
        rows = client.call(operator, LIST_DOMAINS,
                           query={"include_deleted": str(all_).lower()})
    console.print(_domain_table(rows))


@domain_app.command("delete")
def domain_delete(
    domain_id: Annotated[str, typer.Argument(help="The shared domain's id (dom-...).")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Delete a shared domain: destroy its key (crypto-shredding) and its tokens. Irreversible."""
    _, topo = resolve_topology(state, topology)
    operator = role_node(topo, Role.OPERATOR)
    if not yes:
        typer.confirm(f"destroy the key and tokens of {domain_id} for good?", abort=True)
    with exit_on(NodeError, ValueError), long_client(state, topo, operator) as client:
        info = client.call(operator, DELETE_DOMAIN, params={"domain_id": domain_id})
    console.print(_domain_table([info]))
    console.print(f"key of {domain_id} destroyed; key_destroyed and domain_deleted are logged")


@domain_app.command("rotate")
def domain_rotate(
    domain_id: Annotated[str, typer.Argument(help="The shared domain's id (dom-...).")],
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Rotate a shared domain's key k2[d]: its tokens move to the new version, old tokens stop
    matching."""
    _, topo = resolve_topology(state, topology)
    operator = role_node(topo, Role.OPERATOR)
    with exit_on(NodeError, ValueError), long_client(state, topo, operator) as client, \
            console.status("re-keying tokens"):
        done = client.call(operator, ROTATE_DOMAIN_KEY, params={"domain_id": domain_id})
    console.print(
        f"key of {done.domain_id} rotated: version {done.old_version} -> "
        f"{done.new_version}, {done.tokens:,} tokens ({done.persons:,} persons) re-keyed;"
        " tokens obtained before no longer match; key_rotated is logged")


def register(app: typer.Typer) -> None:
    """Mount `cogov domain` (the `govern` commands are `govern_commands`, mounted by ingest)."""
    app.add_typer(domain_app, name="domain")
