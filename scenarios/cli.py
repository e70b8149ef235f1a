"""The `cogov` command: federation runtime, governance, scenarios, benchmarks."""

import typer

from parties.cli import register as register_parties
from scenarios.foundation_demo import demo

app = typer.Typer(
    help="cogov: privacy-preserving computation across organisations under joint governance.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
register_parties(app)
app.command("demo")(demo)


def main() -> None:
    app()
