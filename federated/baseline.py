"""The centralized peer: the same model on every client's rows pooled in one place."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from federated.datasets import load_local_data, pool_local_data
from federated.models import build_model
from federated.report import CentralizedBaseline
from federated.settings import RunSettings
from federated.training import evaluate, train_epochs


def train_centralized(
    client_files: list[Path],
    holdout_file: Path,
    settings: RunSettings,
    model_file: Path | None = None,
) -> CentralizedBaseline:
    """Train for rounds x local epochs on the pooled train rows; score on the holdout.

    Same model, initial weights, learning rate, batch size and feature scaling (read
    from the federated run's `model_file`) as the federated run, without FedProx's
    term or DP noise: it is the no-privacy reference point.
    """
    started = time.monotonic()
    pooled = pool_local_data(client_files)
    holdout = load_local_data(holdout_file)
    mean = np.zeros(pooled.num_features, np.float32)
    scale = np.ones(pooled.num_features, np.float32)
    if model_file is not None:
        with np.load(model_file) as saved:
            mean, scale = saved["feature_mean"], saved["feature_scale"]
    model = build_model(settings.model, pooled.num_features, settings.hidden, settings.seed)
    epochs = settings.rounds * settings.local_epochs
    train_epochs(
        model,
        (pooled.x_train - mean) / scale,
        pooled.y_train,
        epochs=epochs,
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        seed=settings.seed,
    )
    x_eval, y_eval = holdout.all_rows()
    scores = evaluate(model, (x_eval - mean) / scale, y_eval)
    return CentralizedBaseline(
        epochs=epochs,
        rows=len(pooled.y_train),
        loss=scores.loss,
        accuracy=scores.accuracy,
        auc=scores.auc,
        seconds=time.monotonic() - started,
    )
