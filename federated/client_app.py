"""The hospital side: a Flower ClientApp that trains on the node's own Parquet file.

The same `app` runs under the simulation engine and on a SuperNode. It reads only
`local-data` from its node config; hyperparameters arrive with every round's fit
instructions. Flower's SecAgg+ workflow requires the legacy (FitIns/FitRes) message
shape in 1.42, so the client is a `NumPyClient` wrapped by `secaggplus_mod` when
the server runs SecAgg+, and by `fixedclipping_mod` when it asks for DP clipping.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from federated.audit import record_outbound_mod
from federated.datasets import LocalData, load_local_data
from federated.errors import InvalidLocalData
from federated.models import build_model, get_weights, set_weights
from federated.training import evaluate, train_epochs

LOCAL_DATA_KEY = "local-data"
FEATURE_STATS = "query.feature_stats"
# A hospital with fewer training rows than this declines to report feature sums:
# the sum of one or two rows would be those rows.
MIN_STATS_ROWS = 10


class HospitalClient(NumPyClient):
    """Trains the received global model on local rows; returns weights and a loss."""

    def __init__(self, data: LocalData, stable_id: int) -> None:
        self.data = data
        self.stable_id = stable_id

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return get_weights(self._model(config))

    def fit(self, parameters: list[np.ndarray], config: dict):  # type: ignore[override]
        model = self._model(config)
        set_weights(model, parameters)
        server_round = int(config.get("server-round", 0))
        seed = int(config.get("seed", 0)) * 1_000_003 + server_round * 10_007 + self.stable_id
        loss = train_epochs(
            model,
            scale_features(self.data.x_train, config),
            self.data.y_train,
            epochs=int(config.get("local-epochs", 1)),
            learning_rate=float(config.get("learning-rate", 0.1)),
            batch_size=int(config.get("batch-size", 32)),
            seed=seed,
            proximal_mu=float(config.get("proximal_mu", 0.0)),
        )
        # Under DP every client weighs the same, so one client's influence is bounded
        # by the clipping norm alone (the accountant's assumption).
        weight = 1 if config.get("uniform-weight", False) else len(self.data.y_train)
        return get_weights(model), weight, {"train_loss": float(loss)}

    def evaluate(self, parameters: list[np.ndarray], config: dict):  # type: ignore[override]
        model = self._model(config)
        set_weights(model, parameters)
        x, y = self.data.x_test, self.data.y_test
        if len(y) == 0:
            x, y = self.data.x_train, self.data.y_train
        scores = evaluate(model, scale_features(x, config), y)
        metrics = {"accuracy": scores.accuracy}
        if scores.auc is not None:
            metrics["auc"] = scores.auc
        return scores.loss, scores.examples, metrics

    def _model(self, config: dict):
        return build_model(
            str(config.get("model", "logreg")),
            self.data.num_features,
            hidden=int(config.get("hidden", 32)),
        )


def scale_features(x: np.ndarray, config: dict) -> np.ndarray:
    """Apply the federation-wide standardization the server sends with each round."""
    if "feature-mean" not in config:
        return x
    mean = np.frombuffer(config["feature-mean"], dtype=np.float32)
    scale = np.frombuffer(config["feature-scale"], dtype=np.float32)
    return ((x - mean) / scale).astype(np.float32)


def feature_stats_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Answer the server's `query.feature_stats` with row count, sums and sums of squares.

    These per-feature aggregates let the server standardize features for the whole
    federation. A hospital with fewer than MIN_STATS_ROWS training rows reports a
    count of zero and no sums.
    """
    if msg.metadata.message_type != FEATURE_STATS:
        return call_next(msg, ctxt)
    x = local_data_for(ctxt).x_train.astype(np.float64)
    if len(x) < MIN_STATS_ROWS:
        content = RecordDict({"feature_stats_count": MetricRecord({"count": 0})})
    else:
        content = RecordDict({
            "feature_stats_count": MetricRecord({"count": len(x)}),
            "feature_stats": ArrayRecord([x.sum(axis=0), (x * x).sum(axis=0)]),
        })
    return Message(content, reply_to=msg)


@lru_cache(maxsize=8)
def _cached_local_data(path: str, mtime_ns: int) -> LocalData:
    return load_local_data(path)


def local_data_for(context: Context) -> LocalData:
    """The node's own rows, from the Parquet file named in its node config."""
    path = context.node_config.get(LOCAL_DATA_KEY)
    if not path:
        raise InvalidLocalData(f"node config has no '{LOCAL_DATA_KEY}' entry")
    file = Path(str(path))
    if not file.is_file():
        raise InvalidLocalData(f"local data file not found: {file}")
    return _cached_local_data(str(file), file.stat().st_mtime_ns)


def stable_node_id(context: Context) -> int:
    """A per-node number that survives restarts (partition id, else a hash of the path)."""
    partition = context.node_config.get("partition-id")
    if partition is not None:
        return int(partition)
    return zlib.crc32(str(context.node_config.get(LOCAL_DATA_KEY, "")).encode())


def client_fn(context: Context):
    return HospitalClient(local_data_for(context), stable_node_id(context)).to_client()


def privacy_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Route a training message through SecAgg+ and/or DP clipping when the server asks.

    SecAgg+ stages carry their own config record; DP clipping is requested by the
    server's DP strategy wrapper putting `clipping_norm` in the fit config. Clipping
    sits inside SecAgg+, so the update is clipped before it is masked.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)

    def clip_if_requested(inner_msg: Message, inner_ctxt: Context) -> Message:
        fit_ins = compat.recorddict_to_fitins(inner_msg.content, keep_input=True)
        if KEY_CLIPPING_NORM in fit_ins.config:
            return fixedclipping_mod(inner_msg, inner_ctxt, call_next)
        return call_next(inner_msg, inner_ctxt)

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, clip_if_requested)
    return clip_if_requested(msg, ctxt)


def build_client_app(extra_mods: Sequence[Mod] = ()) -> ClientApp:
    """The hospital ClientApp; `extra_mods` run outermost (e.g. simulated node config)."""
    return ClientApp(
        client_fn=client_fn,
        mods=[*extra_mods, record_outbound_mod, feature_stats_mod, privacy_mod],
    )


app = build_client_app()
