"""Benchmark of federated training (Flower 1.42) against centralized training.

Measured in one run, on the bundled breast-cancer task (scikit-learn, no download):

* simulation engine, 100 hospitals x 10 rounds, IID, FedAvg, logistic regression:
  wall time (process start to report, Ray start-up included) as the median of
  repeats, and the federated / centralized held-out accuracy ratio (the peer is
  the same model trained on the pooled rows for the same total epochs, in the
  same run);
* the same with SecAgg+, and with a Dirichlet(0.5) label-skewed split (FedProx);
* deployment engine: a SuperLink and 5 SuperNodes as processes over TLS (with
  SuperNode authentication), a few rounds: wall time and accuracy;
* bytes per client per round (serialized Flower messages, up and down).

Goals (measured, not asserted): 100 clients x 10 rounds <= 180 s on 2 cores; 5
SuperNodes over TLS complete; federated / centralized accuracy ratio >= 0.98.
Quick mode (20 x 3) cannot judge the 100 x 10 goals and reports them as `null`.
Run: `python -m bench.federated [--quick]`; writes bench/results/latest/federated.json
and federated.md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from federated.datasets import write_breast_cancer_task
from federated.deployment import deploy
from federated.loopback_pki import issue_loopback_certificates
from federated.report import FederatedReport
from federated.settings import SIMULATION_LOCAL_EPOCHS
from federated.simulation import simulate

RESULTS = Path(__file__).parent / "results" / "latest"
# Tiny hospitals (~4.5 rows each at 100 clients) need several local passes per round
# for FedAvg to match pooled training within 10 rounds.


def _row(label: str, report: FederatedReport, seconds: list[float]) -> dict:
    rounds = report.history[1:]
    return {
        "case": label,
        "engine": report.engine,
        "clients": report.clients,
        "rounds": report.rounds,
        "strategy": report.strategy,
        "secagg": report.secagg,
        "wall_seconds_median": statistics.median(seconds),
        "wall_seconds_all": seconds,
        "seconds_per_round_after_first": (
            (rounds[-1].elapsed_seconds - rounds[0].elapsed_seconds) / max(len(rounds) - 1, 1)
        ),
        "federated_accuracy": report.federated_accuracy,
        "centralized_accuracy": report.centralized_accuracy,
        "accuracy_ratio": report.accuracy_ratio,
        "federated_auc": report.federated_auc,
        "centralized_auc": report.centralized_auc,
        "bytes_up_per_client_per_round": statistics.median(r.bytes_up_per_client for r in rounds),
        "bytes_down_per_client_per_round": statistics.median(
            r.bytes_down_per_client for r in rounds),
    }


def _simulate_case(label, work, repeats, **kwargs) -> dict:
    seconds, report = [], None
    for repeat in range(repeats):
        report = simulate(out=work / f"{label}-{repeat}.json", **kwargs)
        seconds.append(report.wall_seconds)
    return _row(label, report, seconds)


def run(quick: bool = False) -> dict:
    clients, rounds = (20, 3) if quick else (100, 10)
    repeats = 1 if quick else 3
    deploy_nodes, deploy_rounds = 5, (1 if quick else 3)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fl-") as scratch:
        work = Path(scratch)
        common = dict(clients=clients, rounds=rounds, local_epochs=SIMULATION_LOCAL_EPOCHS)
        rows.append(_simulate_case("simulation-fedavg", work, repeats, **common))
        # SecAgg+ proper: each client shares keys with ~10% of the others (odd count),
        # not all of them, which keeps the per-round cost near-linear in clients.
        rows.append(_simulate_case("simulation-fedavg-secagg", work, 1, secagg=True,
                                   secagg_num_shares=0.1, secagg_threshold=0.6, **common))
        rows.append(_simulate_case("simulation-fedprox-dirichlet", work, 1,
                                   task="breast-cancer-dirichlet", strategy="fedprox",
                                   **common))
        certs = issue_loopback_certificates(work / "pki")
        task = write_breast_cancer_task(work / "deploy-data", deploy_nodes, "iid")
        report = deploy(certs, list(task.client_files), deploy_rounds,
                        eval_data=task.holdout_file, out=work / "deploy.json",
                        task=task.name, local_epochs=5)
        rows.append(_row(f"deployment-{deploy_nodes}-supernodes-tls", report,
                         [report.wall_seconds]))

    main, deployed = rows[0], rows[-1]
    goals = {
        "simulation_100x10_within_180s": {
            "target": "<= 180 s for 100 clients x 10 rounds on 2 cores",
            "measured": main["wall_seconds_median"],
            "met": None if quick else main["wall_seconds_median"] <= 180,
        },
        "deployment_5_supernodes_tls": {
            "target": "5 SuperNodes over TLS complete the run",
            "measured": f"{deployed['clients']} nodes, {deployed['rounds']} rounds, "
                        f"{deployed['wall_seconds_median']:.0f} s",
            "met": deployed["clients"] == 5 and deployed["federated_accuracy"] is not None,
        },
        "accuracy_ratio_at_least_0.98": {
            "target": "federated / centralized accuracy >= 0.98 (100 x 10, IID)",
            "measured": main["accuracy_ratio"],
            "met": None if quick else (main["accuracy_ratio"] or 0) >= 0.98,
        },
    }
    result = {
        "benchmark": "federated",
        "quick": quick,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {"local_epochs": SIMULATION_LOCAL_EPOCHS, "learning_rate": 0.1,
                     "batch_size": 32, "model": "logreg", "ray_num_cpus": 2,
                     "cpus_per_client": 1.0},
        "cases": rows,
        "goals": goals,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "federated.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "federated.md").write_text(_markdown(result))
    return result


def _markdown(result: dict) -> str:
    lines = [
        "# Federated training (Flower 1.42)" + (" — quick" if result["quick"] else ""),
        "",
        "| case | clients x rounds | wall s (median) | s/round | fed acc | central acc |"
        " ratio | bytes up/client/round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["cases"]:
        lines.append(
            f"| {r['case']} | {r['clients']} x {r['rounds']} | {r['wall_seconds_median']:.1f} "
            f"| {r['seconds_per_round_after_first']:.2f} | {_f(r['federated_accuracy'])} "
            f"| {_f(r['centralized_accuracy'])} | {_f(r['accuracy_ratio'])} "
            f"| {r['bytes_up_per_client_per_round']:,.0f} |"
        )
    lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
    for name, goal in result["goals"].items():
        lines.append(f"| {name} | {goal['target']} | {goal['measured']} | {goal['met']} |")
    return "\n".join(lines) + "\n"


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv)["goals"], indent=2))
