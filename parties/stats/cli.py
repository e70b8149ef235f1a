"""`cogov stats ...`: the regulator's statistics on private intersection-sum.

    cogov stats claimant-self-pay --insurer insurer-a --hospital hospital-2 --month 2026-03
    cogov stats claimant-self-pay ... --through 2026-05 --epsilon 1 --max-value 2000000
    cogov stats answers                      # the regulator's book of released answers

`claimant-self-pay` runs the insurer's side with the insurer's certificate (its claimants'
national ids never leave it; they become shared-domain tokens through the blinded OPRF
chain); the regulator relays, checks and records the answer, which it also returns here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from mpc.errors import MpcError
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
from parties.runtime.state import StateDir, default_state_dir
from parties.runtime.topology import Role
from parties.stats.api import (
    ANSWERS,
    DEFAULT_MAX_VALUE,
    MIN_INTERSECTION_FLOOR,
    SelfPayQuery,
    StatsAnswer,
    regulator_node,
)
from parties.stats.client import claimant_self_pay

console = Console()
stats_app = typer.Typer(help="Regulator statistics on private intersection-sum.",
                        no_args_is_help=True)


def claimant_ids(claims: Path, insurer: str) -> list[str]:
    """The distinct national ids of `insurer`'s claimants in a claims CSV."""
    frame = pd.read_csv(claims, dtype={"national_id": str, "insurer": str})
    if "national_id" not in frame:
        raise typer.BadParameter(f"{claims} has no national_id column")
    if "insurer" in frame:
        frame = frame[frame["insurer"] == insurer]
    return list(dict.fromkeys(frame["national_id"].dropna()))


def _answer_table(answers: list[StatsAnswer]) -> Table:
    table = Table(title="claimants' self-pay (private intersection-sum)")
    for column in ("session", "insurer", "hospital", "months", "status", "claimants",
                   "size", "sum (fen)", "sum (yuan)", "noise"):
        table.add_column(column, no_wrap=column in ("session", "months"))
    for a in answers:
        result = a.result
        months = a.query.month if a.query.through in (None, a.query.month) else \
            f"{a.query.month}..{a.query.through}"
        noise = f"epsilon {a.policy.epsilon:g}" if a.policy.epsilon is not None else "none"
        table.add_row(
            a.session[:12], a.insurer, a.query.hospital, months,
            a.status if a.reason is None else f"{a.status} ({a.reason})", f"{a.claimants:,}",
            "" if result is None else f"{result.size:,}",
            "" if result is None or result.sum is None else f"{result.sum:,}",
            "" if result is None or result.sum is None else f"{result.sum / 100:,.2f}",
            noise,
        )
    return table


@stats_app.command("claimant-self-pay")
def claimant_self_pay_cmd(
    insurer: Annotated[str, typer.Option(help="The insurer node (its certificate is used).")],
    hospital: Annotated[str, typer.Option(help="The hospital, e.g. hospital-2.")],
    month: Annotated[str, typer.Option(help="Admission month, YYYY-MM.")],
    through: Annotated[str | None, typer.Option(
        help="Last month of a window (YYYY-MM, default: --month).")] = None,
    epsilon: Annotated[float | None, typer.Option(
        help="Differential-privacy budget; noise on size and sum (default: exact).")] = None,
    max_value: Annotated[int, typer.Option(
        help="Each claimant's self-pay is clipped here (fen); it scales the noise.")
    ] = DEFAULT_MAX_VALUE,
    min_intersection: Annotated[int, typer.Option(
        help="Refuse below this many claimants (the regulator's floor applies).")
    ] = MIN_INTERSECTION_FLOOR,
    claims: Annotated[Path, typer.Option(help="The insurer's claims CSV.")] = Path(
        "data/claims.csv"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Total self-pay of the insurer's claimants at a hospital in a month; nobody learns who."""
    _, topo = resolve_topology(state, topology)
    if not topo.has_node(insurer) or topo.node(insurer).role != Role.INSURER:
        raise typer.BadParameter(f"{insurer!r} is not an insurer of the topology")
    try:
        query = SelfPayQuery(hospital=hospital, month=month, through=through)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    ids = claimant_ids(claims, insurer)
    if not ids:
        fail("no claimants", f"{insurer} has none in {claims}", ExitCode.REFUSED)
    started = time.perf_counter()
    with exit_on(NodeError, MpcError, ValueError), \
            NodeClient(StateDir(state), topo, insurer, timeout=300) as client, \
            console.status(f"private intersection-sum over {len(ids):,} claimants"):
        answer = claimant_self_pay(client, ids, query, epsilon=epsilon, max_value=max_value,
                                   min_intersection=min_intersection)
    seconds = time.perf_counter() - started
    if as_json:
        print(answer.model_dump_json())
        return
    console.print(_answer_table([answer]))
    console.print(f"answered in {seconds:.2f} s; recorded by the regulator "
                  f"(session {answer.session}, answer sha256 {answer.digest()[:16]}...)")


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
