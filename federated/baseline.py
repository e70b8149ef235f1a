"""The centralized peer: the same model on every client's rows pooled in one place."""

from __future__ import annotations

import time
from pathlib import Path

from federated.datasets import load_local_data, pool_local_data
from federated.models import build_model
from federated.report import CentralizedBaseline
from federated.settings import RunSettings
from federated.training import evaluate, train_epochs


def train_centralized(
    client_files: list[Path], holdout_file: Path, settings: RunSettings
) -> CentralizedBaseline:
    """Train for rounds x local epochs on the pooled train rows; score on the holdout.

    Same model, initial weights, learning rate and batch size as the federated run,
    without FedProx's term or DP noise: it is the no-privacy reference point.
    """
    started = time.monotonic()
    pooled = pool_local_data(client_files)
    holdout = load_local_data(holdout_file)
    model = build_model(settings.model, pooled.num_features, settings.hidden, settings.seed)
    epochs = settings.rounds * settings.local_epochs
    train_epochs(
        model,
        pooled.x_train,
        pooled.y_train,
        epochs=epochs,
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        seed=settings.seed,
    )
    x_eval, y_eval = holdout.all_rows()
    scores = evaluate(model, x_eval, y_eval)
    return CentralizedBaseline(
        epochs=epochs,
        rows=len(pooled.y_train),
        loss=scores.loss,
        accuracy=scores.accuracy,
        auc=scores.auc,
        seconds=time.monotonic() - started,
    )
