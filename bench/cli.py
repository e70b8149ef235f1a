"""`cogov bench all|list`."""

from typing import Annotated

import typer
from rich.console import Console

from bench.report import available_suites, run_all

console = Console()
bench_app = typer.Typer(help="Benchmarks against peers, measured side by side.",
                        no_args_is_help=True)


@bench_app.command("all")
def bench_all(
    quick: Annotated[bool, typer.Option(help="Smaller sizes (minutes, not an hour).")] = False,
    suite: Annotated[
        list[str] | None, typer.Option(help="Run only these suites (repeatable).")
    ] = None,
) -> None:
    """Run every suite and write bench/results/<date>/report.md with JSON and PNG plots."""
    unknown = sorted(set(suite or []) - set(available_suites()))
    if unknown:
        console.print(f"[red]unknown suite(s): {', '.join(unknown)}[/red]")
        raise typer.Exit(2)
    with console.status("running benchmarks (each suite in its own process)..."):
        report = run_all(quick=quick, suites=suite)
    console.print(f"report written to {report}")


@bench_app.command("list")
def bench_list() -> None:
    """The available suites."""
    for name in available_suites():
        console.print(name)
