"""The `cogov` command: federation runtime, governance, scenarios, benchmarks."""

import typer

from bench.cli import bench_app
from federated.cli import app as fl_app
from parties.admin.cli import register as register_admin
from parties.agreements.cli import register as register_agreements
from parties.claims.cli import claim_app
from parties.domains.cli import govern_commands as domain_govern_commands
from parties.domains.cli import register as register_domains
from parties.federation_cli import register as register_parties
from parties.ingest.cli import register as register_ingest
from parties.ledger.cli import register as register_ledger
from parties.secure_room.cli import catalogue_app, package_app
from parties.stats.cli import stats_app
from scenarios.claim_check.cli import data_app
from scenarios.claim_check.demo import demo

app = typer.Typer(
    help="cogov: privacy-preserving computation across organisations under joint governance.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
register_parties(app)
register_ledger(app)
register_admin(app)
register_agreements(app)
register_ingest(app, domain_govern_commands)
register_domains(app)
app.command("demo")(demo)
app.add_typer(bench_app, name="bench")
app.add_typer(data_app, name="data")
app.add_typer(fl_app, name="fl")
app.add_typer(claim_app, name="claim")
app.add_typer(package_app, name="package")
app.add_typer(catalogue_app, name="catalogue")
app.add_typer(stats_app, name="stats")


def main() -> None:
    app()
