"""`cogov fl ...`: run federated training on the simulation or the deployment engine."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from federated.errors import FederatedError
from federated.settings import SIMULATION_LOCAL_EPOCHS

app = typer.Typer(help="Federated training of the claim-risk model (Flower).",
                  no_args_is_help=True)
console = Console()

STRATEGY_HELP = "fedavg or fedprox"
MODEL_HELP = "logreg or mlp"


@app.command()
def simulate(
    clients: int = typer.Option(100, help="Number of simulated hospitals."),
    rounds: int = typer.Option(10, help="Federated rounds."),
    task: str = typer.Option("breast-cancer-iid",
                             help="breast-cancer-iid, breast-cancer-dirichlet, or a directory "
                                  "of client-*.parquet files plus holdout.parquet."),
    strategy: str = typer.Option("fedavg", help=STRATEGY_HELP),
    model: str = typer.Option("logreg", help=MODEL_HELP),
    secagg: bool = typer.Option(False, help="Aggregate with Flower's SecAgg+ protocol."),
    dp: bool = typer.Option(False, help="Client-side clipping with central Gaussian noise."),
    noise_multiplier: float = typer.Option(1.0, help="DP noise multiplier."),
    clipping_norm: float = typer.Option(1.0, help="DP clipping norm of a client update."),
    local_epochs: int = typer.Option(
        SIMULATION_LOCAL_EPOCHS,
        help="Local epochs per round (simulated hospitals hold few rows each)."),
    learning_rate: float = typer.Option(0.1, help="Client SGD learning rate."),
    proximal_mu: float = typer.Option(0.1, help="FedProx proximal coefficient."),
    fraction_fit: float = typer.Option(1.0, help="Share of clients sampled per round."),
    seed: int = typer.Option(0, help="Seed of the split, initial model and local shuffles."),
    audit_dir: Path | None = typer.Option(None, help="Store every message clients send here."),
    out: Path = typer.Option(Path("report.json"), help="Report JSON (plot written beside it)."),
) -> None:
    """Many virtual hospitals on Flower's simulation engine (Ray, 2 CPUs)."""
    from federated.simulation import simulate as run

    try:
        report = run(
            clients=clients, rounds=rounds, task=_task_argument(task, clients),
            strategy=strategy, secagg=secagg, dp=dp, out=out, model=model,
            local_epochs=local_epochs, learning_rate=learning_rate, proximal_mu=proximal_mu,
            fraction_fit=fraction_fit, noise_multiplier=noise_multiplier,
            clipping_norm=clipping_norm, seed=seed, audit_dir=audit_dir,
        )
    except FederatedError as exc:
        console.print(f"[red]{type(exc).__name__}[/red]: {exc}")
        raise typer.Exit(code=2) from exc
    _print_summary(report)


@app.command()
def deploy(
    ca_cert: Path = typer.Option(..., exists=True, dir_okay=False, help="Federation CA (PEM)."),
    server_cert: Path = typer.Option(..., exists=True, dir_okay=False,
                                     help="SuperLink certificate (PEM, SAN 127.0.0.1)."),
    server_key: Path = typer.Option(..., exists=True, dir_okay=False,
                                    help="SuperLink private key (PEM)."),
    client: list[Path] = typer.Option(..., exists=True, dir_okay=False,
                                      help="A hospital's local-data Parquet (repeat per node)."),
    eval_data: Path = typer.Option(..., exists=True, dir_okay=False,
                                   help="Held-out Parquet the server scores rounds on."),
    rounds: int = typer.Option(3, help="Federated rounds."),
    strategy: str = typer.Option("fedavg", help=STRATEGY_HELP),
    model: str = typer.Option("logreg", help=MODEL_HELP),
    secagg: bool = typer.Option(False, help="Aggregate with Flower's SecAgg+ protocol."),
    dp: bool = typer.Option(False, help="Client-side clipping with central Gaussian noise."),
    noise_multiplier: float = typer.Option(1.0, help="DP noise multiplier."),
    clipping_norm: float = typer.Option(1.0, help="DP clipping norm of a client update."),
    local_epochs: int = typer.Option(1, help="Local epochs per round."),
    audit_dir: Path | None = typer.Option(None, help="Store every message clients send here."),
    out: Path = typer.Option(Path("report.json"), help="Report JSON (plot written beside it)."),
) -> None:
    """A SuperLink and one SuperNode per hospital, as processes on loopback, over TLS."""
    from federated.deployment import DeployCertificates
    from federated.deployment import deploy as run

    try:
        report = run(
            DeployCertificates(ca_cert, server_cert, server_key), list(client), rounds,
            eval_data=eval_data, strategy=strategy, secagg=secagg, dp=dp, out=out,
            model=model, local_epochs=local_epochs, noise_multiplier=noise_multiplier,
            clipping_norm=clipping_norm, audit_dir=audit_dir,
        )
    except FederatedError as exc:
        console.print(f"[red]{type(exc).__name__}[/red]: {exc}")
        raise typer.Exit(code=2) from exc
    _print_summary(report)


def _task_argument(task: str, clients: int):
    from federated.datasets import FederatedTask, load_local_data

    folder = Path(task)
    if not folder.is_dir():
        return task
    files = tuple(sorted(folder.glob("client-*.parquet")))
    holdout = folder / "holdout.parquet"
    if not holdout.is_file() or not files:
        raise typer.BadParameter(f"{folder} needs client-*.parquet files and holdout.parquet")
    if len(files) != clients:
        raise typer.BadParameter(f"--clients {clients} but {folder} holds {len(files)} clients")
    names = load_local_data(holdout).feature_names
    return FederatedTask(folder.name, files, holdout, names)


def _print_summary(report) -> None:
    table = Table(title=f"{report.task} — {report.clients} clients, {report.engine}")
    for column in ("round", "loss", "accuracy", "auc", "bytes up/client", "bytes down/client"):
        table.add_column(column, justify="right")
    for r in report.history:
        table.add_row(str(r.round), _fmt(r.loss), _fmt(r.accuracy), _fmt(r.auc),
                      f"{r.bytes_up_per_client:,.0f}", f"{r.bytes_down_per_client:,.0f}")
    console.print(table)
    console.print(f"federated accuracy {_fmt(report.federated_accuracy)}, "
                  f"centralized {_fmt(report.centralized_accuracy)}")
    if report.dp:
        console.print(f"(epsilon, delta) = ({_fmt(report.epsilon)}, {report.delta})")
    console.print(f"report: {report.report_file}\nplot:   {report.plot_file}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
