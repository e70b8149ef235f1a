"""The coordinator side: a Flower ServerApp running FedAvg/FedProx, SecAgg+ and DP.

In Flower 1.42 SecAgg+ (`SecAggPlusWorkflow`) runs inside the legacy
`DefaultWorkflow` with a legacy `Strategy`, so this app uses that pair for every
run: one code path whether or not secure aggregation is on. The server evaluates
each round's global model on a held-out Parquet file it owns (`eval-data`), meters
the bytes exchanged with each node, and writes a `ServerRunResult` JSON to
`report-path`, next to the final model (`.model.npz`, with the feature scaling).
Before round 1 it pools per-hospital feature sums into one standardization
(`federated.scaling`), unless `standardize` is off.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedProx,
    Strategy,
)
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid, ServerApp

from federated.datasets import load_local_data
from federated.errors import InvalidFederatedConfig, NodesMissing
from federated.metering import MeteredGrid
from federated.models import build_model, get_weights, set_weights
from federated.privacy import client_level_epsilon
from federated.report import RoundRecord, ServerRunResult, write_json_atomic
from federated.scaling import collect_feature_scaling
from federated.settings import RunSettings
from federated.training import evaluate


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Block until `count` nodes are connected; return their ids."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise NodesMissing(f"{len(nodes)} of {count} nodes connected after {timeout:.0f}s")
        time.sleep(0.2)


def sampled_per_round(settings: RunSettings, nodes: int) -> int:
    """Clients FedAvg samples per round (its own rule: fraction, at least the minimum)."""
    return min(nodes, max(int(nodes * settings.fraction_fit), _min_fit_clients(settings, nodes)))


def _min_fit_clients(settings: RunSettings, nodes: int) -> int:
    return min(nodes, 3 if settings.secagg else 2)


def run_server(grid: Grid, context: Context, settings: RunSettings) -> ServerRunResult:
    """Run all rounds on `grid` and write the server's result to `settings.report_path`."""
    if not settings.eval_data or not settings.report_path:
        raise InvalidFederatedConfig("eval-data and report-path must be set")
    started = time.monotonic()
    holdout = load_local_data(settings.eval_data)
    x_eval, y_eval = holdout.all_rows()
    model = build_model(settings.model, holdout.num_features, settings.hidden, settings.seed)
    nodes = wait_for_nodes(grid, settings.min_nodes, settings.node_wait_timeout)
    sampled = sampled_per_round(settings, len(nodes))
    metered = MeteredGrid(grid)
    scaling = None
    if settings.standardize:
        scaling = collect_feature_scaling(metered, nodes, holdout.num_features,
                                          settings.round_timeout)
    if scaling is not None:
        x_eval = scaling.apply(x_eval)

    records: dict[int, RoundRecord] = {}

    def evaluate_global(server_round: int, weights: list[np.ndarray], _config: dict):
        set_weights(model, weights)
        scores = evaluate(model, x_eval, y_eval)
        records[server_round] = RoundRecord(
            round=server_round,
            loss=scores.loss,
            accuracy=scores.accuracy,
            auc=scores.auc,
            elapsed_seconds=time.monotonic() - started,
        )
        metrics = {"accuracy": scores.accuracy}
        if scores.auc is not None:
            metrics["auc"] = scores.auc
        return scores.loss, metrics

    extra_config = scaling.as_config() if scaling is not None else {}
    strategy = _build_strategy(settings, len(nodes), sampled, get_weights(model),
                               evaluate_global, extra_config)
    fit_workflow = None
    if settings.secagg:
        fit_workflow = SecAggPlusWorkflow(
            num_shares=_count_or_fraction(settings.secagg_num_shares),
            reconstruction_threshold=_count_or_fraction(settings.secagg_threshold),
            max_weight=1.0 if settings.dp else settings.secagg_max_weight,
            clipping_range=settings.secagg_clipping_range,
            timeout=settings.secagg_timeout or None,
        )
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=settings.rounds, round_timeout=settings.round_timeout),
        strategy=strategy,
    )
    DefaultWorkflow(fit_workflow=fit_workflow)(metered, legacy)

    train_losses = dict(legacy.history.metrics_distributed_fit.get("train_loss", []))
    history = []
    for server_round in sorted(records):
        traffic = metered.rounds[str(server_round)].summary() if server_round else {}
        loss = train_losses.get(server_round)
        history.append(records[server_round].model_copy(update={
            **traffic, "train_loss": None if loss is None else float(loss)}))

    report_path = Path(settings.report_path)
    model_file = report_path.with_suffix(".model.npz")
    final = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    model_file.parent.mkdir(parents=True, exist_ok=True)
    if scaling is not None:
        mean, scale = scaling.mean, scaling.scale
    else:
        mean = np.zeros(holdout.num_features, np.float32)
        scale = np.ones(holdout.num_features, np.float32)
    with model_file.with_suffix(".tmp").open("wb") as handle:
        np.savez(handle, *final, feature_mean=mean, feature_scale=scale)
    model_file.with_suffix(".tmp").replace(model_file)

    result = ServerRunResult(
        settings=settings.model_dump(),
        nodes=len(nodes),
        sampled_per_round=sampled,
        history=history,
        model_file=str(model_file),
        wall_seconds=time.monotonic() - started,
        feature_scaling=None if scaling is None else {
            "clients_reporting": scaling.clients_reporting, "rows": scaling.rows,
            "bytes_total": metered.rounds["feature-stats"].summary()["bytes_total"]},
    )
    if settings.dp:
        rate = sampled / len(nodes)
        result = result.model_copy(update={
            "epsilon": client_level_epsilon(
                settings.dp_noise_multiplier, rate, settings.rounds, settings.dp_delta),
            "delta": settings.dp_delta,
            "dp_sample_rate": rate,
        })
    write_json_atomic(report_path, result.model_dump(mode="json"))
    return result


def _build_strategy(settings, nodes, sampled, initial, evaluate_fn, extra_config) -> Strategy:
    def fit_config(server_round: int) -> dict:
        return {
            **extra_config,
            "server-round": server_round,
            "model": settings.model,
            "hidden": settings.hidden,
            "local-epochs": settings.local_epochs,
            "learning-rate": settings.learning_rate,
            "batch-size": settings.batch_size,
            "seed": settings.seed,
            "uniform-weight": settings.dp,
        }

    common = dict(
        fraction_fit=settings.fraction_fit,
        fraction_evaluate=0.0,
        min_fit_clients=_min_fit_clients(settings, nodes),
        min_available_clients=settings.min_nodes,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=fit_config,
        on_evaluate_config_fn=fit_config,
        initial_parameters=ndarrays_to_parameters(initial),
        fit_metrics_aggregation_fn=_weighted_mean,
        accept_failures=True,
    )
    if settings.strategy == "fedprox":
        strategy: Strategy = FedProx(proximal_mu=settings.proximal_mu, **common)
    else:
        strategy = FedAvg(**common)
    if settings.dp:
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=settings.dp_noise_multiplier,
            clipping_norm=settings.dp_clipping_norm,
            num_sampled_clients=sampled,
        )
    return strategy


def _weighted_mean(results: list[tuple[int, dict]]) -> dict:
    total = sum(n for n, _ in results)
    if not total:
        return {}
    keys = set.intersection(*(set(m) for _, m in results)) if results else set()
    return {k: sum(n * float(m[k]) for n, m in results) / total for k in keys
            if all(math.isfinite(float(m[k])) for _, m in results)}


def _count_or_fraction(value: float) -> int | float:
    """SecAgg+ reads ints as counts and floats as fractions of the sampled clients."""
    return int(value) if value > 1 else float(value)


def build_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp using `settings`, or (when None) the run config Flower hands it."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_settings = settings or RunSettings.from_run_config(dict(context.run_config))
        run_server(grid, context, run_settings)

    return server_app


app = build_server_app()
