"""`cogov data generate`: the claim scenario's hospital data, policies, keys and claims."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from scenarios.claim_check.generator import GenerationError, generate

console = Console()
data_app = typer.Typer(help="The claim scenario's synthetic source data.", no_args_is_help=True)


@data_app.command("generate")
def generate_data(
    out: Annotated[Path, typer.Option(help="Output directory (git-ignored).")] = Path("data"),
    hospitals: Annotated[int, typer.Option(min=1, help="Number of hospitals.")] = 3,
    patients: Annotated[int, typer.Option(min=1, help="Number of patients.")] = 20_000,
    claims: Annotated[int, typer.Option(min=0, help="Number of claims to plant.")] = 600,
    seed: Annotated[int, typer.Option(help="Seed; the output is deterministic for it.")] = 7,
) -> None:
    """Write raw hospital exports (CSV, Parquet, JSON lines, each in its own schema),
    policies, consumer key pairs, claims.csv and the ground truth (see docs/raw-formats.md)."""
    try:
        summary = generate(out, hospitals=hospitals, patients=patients, claims=claims,
                           seed=seed, progress=True)
    except GenerationError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    table = Table(title=f"generated into {summary.out_dir}")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("patients", f"{summary.patients:,}")
    for hospital, visits in summary.visits_by_hospital.items():
        table.add_row(f"visits at {hospital}", f"{visits:,}")
    table.add_row("policies", f"{summary.policies:,}")
    for kind, count in summary.claims_by_kind.items():
        table.add_row(f"claims: {kind}", f"{count:,}")
    console.print(table)
    console.print(f"{summary.patients_per_second:,.0f} patients/s")
