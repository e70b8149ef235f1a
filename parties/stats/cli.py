"""`cogov stats ...`: the regulator's noised statistics over checked claimants.

    cogov stats claimant-self-pay --insurer insurer-a --contract claim-check-insurer-a-2026 \\
        --hospital hospital-2 --month 2026-03 --epsilon 1
    cogov stats claimant-self-pay ... --through 2026-05 --max-value 2000000
    cogov stats answers                      # the regulator's book of released answers

`claimant-self-pay` sends one request signed with the insurer's node key and no ids: the
statistic runs over the claimants the insurer submitted to consented claim checks; the
operator draws the noise and refuses groups under the minimum; the regulator spends the
ε from the insurer's budget, meters and records the answer, which it also returns here.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from parties.runtime.cli import (
    StateOption,
    TopologyOption,
    exit_on,
    resolve_topology,
)
from parties.runtime.client import NodeClient
from parties.runtime.errors import NodeError
from parties.runtime.state import StateDir, default_state_dir
from parties.runtime.topology import Role
from parties.stats.api import (
    ANSWERS,
    DEFAULT_MAX_VALUE,
    SelfPayQuery,
    StatsAnswer,
    regulator_node,
)
from parties.stats.client import claimant_self_pay

console = Console()
stats_app = typer.Typer(help="Regulator statistics on private intersection-sum.",
                        no_args_is_help=True)


def _answer_table(answers: list[StatsAnswer]) -> Table:
    table = Table(title="checked claimants' self-pay (noised by the operator)")
    for column in ("request", "insurer", "hospital", "months", "claimants~", "sum~ (fen)",
                   "sum~ (yuan)", "epsilon"):
        table.add_column(column, no_wrap=column in ("request", "months"))
    for a in answers:
        months = a.query.month if a.query.through in (None, a.query.month) else \
            f"{a.query.month}..{a.query.through}"
        table.add_row(a.request_id[:15], a.insurer, a.query.hospital, months,
                      f"{a.claimants:,}", f"{a.self_pay_fen:,}",
                      f"{a.self_pay_fen / 100:,.2f}", f"{a.epsilon:g}")
    return table


@stats_app.command("claimant-self-pay")
def claimant_self_pay_cmd(
    insurer: Annotated[str, typer.Option(help="The insurer node (its certificate is used).")],
    contract: Annotated[str, typer.Option(
        help="The contract allowing the statistic, e.g. claim-check-insurer-a-2026.")],
    hospital: Annotated[str, typer.Option(help="The hospital, e.g. hospital-2.")],
    month: Annotated[str, typer.Option(help="Admission month, YYYY-MM.")],
    epsilon: Annotated[float, typer.Option(
        help="The ε this query spends of the insurer's budget (required; noise on count "
             "and sum is drawn by the operator).")],
    through: Annotated[str | None, typer.Option(
        help="Last month of a window (YYYY-MM, default: --month).")] = None,
    max_value: Annotated[int, typer.Option(
        help="Each claimant's self-pay is clipped here (fen); it scales the noise.")
    ] = DEFAULT_MAX_VALUE,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Noised count and self-pay total of the insurer's checked, consented claimants at a
    hospital in a window; the insurer names nobody."""
    _, topo = resolve_topology(state, topology)
    if not topo.has_node(insurer) or topo.node(insurer).role != Role.INSURER:
        raise typer.BadParameter(f"{insurer!r} is not an insurer of the topology")
    try:
        query = SelfPayQuery(hospital=hospital, month=month, through=through)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    started = time.perf_counter()
    with exit_on(NodeError, ValueError), \
            NodeClient(StateDir(state), topo, insurer, timeout=300) as client:
        answer = claimant_self_pay(client, contract, query, epsilon=epsilon,
                                   max_value=max_value)
    seconds = time.perf_counter() - started
    if as_json:
        print(answer.model_dump_json())
        return
    console.print(_answer_table([answer]))
    console.print(f"answered in {seconds:.2f} s; ε spent {answer.epsilon_spent:g} of "
                  f"{answer.epsilon_budget:g}; recorded by the regulator "
                  f"(answer sha256 {answer.digest()[:16]}...)")


@stats_app.command("answers")
def answers_cmd(
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """The regulator's released (and refused) statistics, read with the regulator's key."""
    _, topo = resolve_topology(state, topology)
    regulator = regulator_node(topo)
    with exit_on(NodeError), NodeClient(StateDir(state), topo, regulator) as client:
        answers = client.call(regulator, ANSWERS, query={"limit": limit})
    if as_json:
        for a in answers:
            print(a.model_dump_json())
        return
    console.print(_answer_table(answers))
