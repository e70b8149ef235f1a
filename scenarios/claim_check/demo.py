"""`cogov demo` (`make demo`): the Suzhou fast-claim scenario end to end on real nodes.

Every stage is a `cogov` command a person could type, run in this process in
order, so the demo is also the scenario's executable documentation:

 1. generate the hospital data            `cogov data generate`
 2. start the federation, govern, ingest  `cogov up`, `cogov admin ...`, `cogov govern ingest`
 3. create the insurer domains            `cogov domain create`
 4. sign the contracts, hospitals too     `cogov contract sign|register`
    (the claim checks', the package runs'; consents: stage 6)
 5. develop, validate, approve the package `cogov package libraries|test|submit|approve|run`
 6. claims in `ss` and `he` mode          `cogov claim check`
 7. a noised regulator statistic over     `cogov stats claimant-self-pay`
    the checked, consenting claimants
 8. federated training across hospitals   `cogov fl deploy`
 9. verdicts vs truth, bill, log check    `cogov billing statement`, `cogov ledger verify`
10. stop the nodes                        `cogov down`
"""

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import click
import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from governance.contracts import load_contract
from governance.packages import package_hash
from parties.runtime.state import StateDir
from parties.runtime.supervisor import down
from parties.runtime.topology import load_topology
from scenarios.claim_check.features import write_holdout, write_hospital_features

console = Console()
SCENARIO_DIR = Path(__file__).resolve().parent
CONTRACTS = SCENARIO_DIR / "contracts"
CLAIM_PACKAGE = SCENARIO_DIR / "claim_package"
PACKAGE_CONTRACT = CONTRACTS / "package-run-claim-check.toml"  # the package's production runs
INSURERS = ("insurer-a", "insurer-b")


class StageFailed(RuntimeError):
    pass


@dataclass
class DemoRun:
    # The `cogov` command the demo was started from; its stages are its subcommands.
    command: click.Command
    state: Path
    topology: Path
    data: Path
    out: Path
    patients: int
    claims: int
    timings: list[tuple[str, float]] = field(default_factory=list)

    def cogov(self, *args: str, with_state: bool = True) -> None:
        """Run one `cogov` command in this process; a non-zero exit stops the demo."""
        argv = [*args]
        if with_state:
            argv += ["--state", str(self.state), "--topology", str(self.topology)]
        console.print(f"[dim]$ cogov {' '.join(args)}[/dim]")
        try:
            # Without standalone mode click returns the exit code of `typer.Exit`.
            code = self.command.main(argv, standalone_mode=False)
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        except click.ClickException as exc:
            raise StageFailed(f"`cogov {' '.join(args)}`: {exc.format_message()}") from exc
        if isinstance(code, int) and code != 0:
            raise StageFailed(f"`cogov {' '.join(args)}` exited with {code}")

    def stage(self, title: str, body: Callable[[], None]) -> None:
        console.rule(f"[bold]{len(self.timings) + 1}. {title}")
        started = time.monotonic()
        body()
        self.timings.append((title, time.monotonic() - started))


def _generate(run: DemoRun) -> None:
    if (run.data / "claims.csv").exists():
        console.print(f"reusing the generated data in {run.data}/ (delete it to regenerate)")
        return
    run.cogov("data", "generate", "--out", str(run.data), "--patients", str(run.patients),
              "--claims", str(run.claims), with_state=False)


def _start_and_ingest(run: DemoRun) -> None:
    run.cogov("pki", "init")
    run.cogov("up")
    run.cogov("admin", "enroll", "--save-secret")
    run.cogov("admin", "login")
    run.cogov("govern", "ingest", "--data", str(run.data), "--no-domains")


def _domains(run: DemoRun) -> None:
    for insurer in INSURERS:
        run.cogov("domain", "create", "--data-user", insurer)
    run.cogov("domain", "list")


def _contracts(run: DemoRun) -> None:
    for source in [*(CONTRACTS / f"claim-check-{i}.toml" for i in INSURERS), PACKAGE_CONTRACT]:
        work = run.out / source.name
        shutil.copyfile(source, work)
        signed = work.with_name(work.stem + ".signed.json")
        # Every party signs, the data owners (each hospital) among them.
        for n, party in enumerate(load_contract(source).parties):
            run.cogov("contract", "sign", str(signed if n else work), "--as", party,
                      "--out", str(signed))
        run.cogov("contract", "register", str(signed))


def _package(run: DemoRun) -> None:
    run.cogov("package", "libraries")
    run.cogov("package", "test", str(CLAIM_PACKAGE))
    run.cogov("package", "submit", str(CLAIM_PACKAGE))
    digest = package_hash(CLAIM_PACKAGE)
    run.cogov("package", "approve", digest)
    run.cogov("package", "run", digest, "--contract", load_contract(PACKAGE_CONTRACT).contract_id,
              "--query", f"claims={run.data / 'claims.csv'}",
              "--query", f"policies={run.data / 'policies.csv'}")
    run.cogov("catalogue", "list")


def _claims(run: DemoRun) -> None:
    for insurer in INSURERS:
        for mode in ("ss", "he"):
            run.cogov("claim", "check", "--insurer", insurer, "--mode", mode,
                      "--data", str(run.data), "--out", str(run.out / f"{insurer}-{mode}.csv"),
                      "--consents", str(run.out / f"consents-{insurer}.jsonl"), "--statistics")


def _statistics(run: DemoRun) -> None:
    # The generator's visits span 2024-07 .. 2026-03; a year keeps the group above 10. The
    # statistic counts the claimants checked in stage 6, whose consents allow it.
    run.cogov("stats", "claimant-self-pay", "--insurer", "insurer-a",
              "--contract", "claim-check-insurer-a-2026", "--hospital", "hospital-2",
              "--month", "2025-04", "--through", "2026-03", "--epsilon", "1")


def _federated(run: DemoRun) -> None:
    files = write_hospital_features(run.data, run.out / "fl")
    for f in files:
        console.print(f"{f.hospital}: {f.rows:,} local examples in {f.path} "
                      f"({f.anomalous_share:.0%} anomalous); they stay there")
    holdout = write_holdout([f.path for f in files], run.out / "fl" / "holdout.parquet")
    ca = run.state / "ca" / "ca.crt"
    server = run.state / "regulator"
    clients = [a for f in files for a in ("--client", str(f.path))]
    run.cogov("fl", "deploy", "--ca-cert", str(ca), "--server-cert", str(server / "tls.crt"),
              "--server-key", str(server / "tls.key"), *clients, "--eval-data", str(holdout),
              "--rounds", "2", "--local-epochs", "5", "--secagg",
              "--out", str(run.out / "fl" / "report.json"),
              with_state=False)


def _summary(run: DemoRun) -> None:
    truth = pd.read_csv(run.data / "ground_truth" / "claims_truth.csv", dtype={"claim_id": str})
    table = Table(title="verdicts against the generator's ground truth")
    for column in ("insurer", "mode", "claims", "agree with truth", "found", "covered",
                   "payable (yuan)"):
        table.add_column(column, justify="right" if column not in ("insurer", "mode") else "left")
    disagreements = 0
    for insurer in INSURERS:
        for mode in ("ss", "he"):
            verdicts = pd.read_csv(run.out / f"{insurer}-{mode}.csv", dtype={"claim_id": str})
            joined = verdicts.merge(truth, on="claim_id", suffixes=("", "_truth"))
            same = (
                (joined["visit_found"] == joined["visit_found_truth"])
                & (joined["amount_consistent"] == joined["amount_consistent_truth"])
                & (joined["diagnosis_covered"] == joined["diagnosis_covered_truth"])
                & (joined["payable"].round(2) == joined["payable_truth"].round(2))
            )
            disagreements += int((~same).sum())
            table.add_row(insurer, mode, f"{len(verdicts):,}", f"{int(same.sum()):,}",
                          f"{int(verdicts['visit_found'].sum()):,}",
                          f"{int(verdicts['diagnosis_covered'].sum()):,}",
                          f"{verdicts['payable'].sum():,.2f}")
    console.print(table)
    report = json.loads((run.out / "fl" / "report.json").read_text())
    console.print(f"claim-risk model: federated accuracy {report['federated_accuracy']:.3f}, "
                  f"centralized on pooled data {report['centralized_accuracy']:.3f}")
    period = datetime.now(UTC).astimezone().strftime("%Y-%m")
    for insurer in INSURERS:
        run.cogov("billing", "statement", "--contract", f"claim-check-{insurer}-2026",
                  "--period", period)
    run.cogov("billing", "statement", "--contract", load_contract(PACKAGE_CONTRACT).contract_id,
              "--period", period)
    run.cogov("ledger", "verify")
    if disagreements:
        raise StageFailed(f"{disagreements} verdicts differ from the ground truth")


def demo(
    context: typer.Context,
    state: Path = typer.Option(Path(".cogov/demo"), help="State directory (wiped first)."),
    topology: Path = typer.Option(Path("topologies/suzhou.toml"), help="Topology TOML."),
    data: Path = typer.Option(Path("data"), help="Generated data (reused when present)."),
    out: Path = typer.Option(Path("data/demo-out"), help="Verdicts, consents, reports."),
    patients: int = typer.Option(20_000, min=100, help="Patients to generate."),
    claims: int = typer.Option(600, min=60, help="Claims to generate."),
    keep_running: bool = typer.Option(False, help="Leave the nodes up afterwards."),
) -> None:
    """Run the Suzhou fast-claim scenario end to end on real node processes over mutual TLS."""
    if state.exists():
        down(StateDir(state), load_topology(topology), grace=5.0)
        shutil.rmtree(state)
    out.mkdir(parents=True, exist_ok=True)
    run = DemoRun(context.find_root().command, state, topology, data, out, patients, claims)
    started = time.monotonic()
    failed: Exception | None = None
    try:
        run.stage("generate the hospital data", lambda: _generate(run))
        run.stage("start the nodes, govern and ingest", lambda: _start_and_ingest(run))
        run.stage("create the insurer domains", lambda: _domains(run))
        run.stage("sign the contracts", lambda: _contracts(run))
        run.stage("develop, validate, approve the claim package", lambda: _package(run))
        run.stage("check claims in ss and he mode (with consents)", lambda: _claims(run))
        run.stage("a noised regulator statistic over the checked claimants",
                  lambda: _statistics(run))
        run.stage("train the claim-risk model federatedly", lambda: _federated(run))
        run.stage("verdicts, bills and the log", lambda: _summary(run))
    except StageFailed as exc:
        failed = exc
    finally:
        if not keep_running:
            console.rule(f"[bold]{len(run.timings) + 1}. stop the nodes")
            run.cogov("down")
    timing = Table(title=f"demo finished in {time.monotonic() - started:.0f} s")
    timing.add_column("stage")
    timing.add_column("seconds", justify="right")
    for title, seconds in run.timings:
        timing.add_row(title, f"{seconds:.1f}")
    console.print(timing)
    if failed is not None:
        console.print(f"[red]demo failed: {failed}[/red]")
        raise typer.Exit(1)
