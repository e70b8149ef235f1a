"""Federation-wide feature standardization from per-hospital sums.

Before round 1 the server asks every node for (row count, per-feature sum, per-feature
sum of squares) of its training rows, pools them into one mean and standard
deviation, and sends both with every round's instructions. Hospitals therefore train
on one common scale without any row leaving them; a hospital with too few rows to
hide in a sum declines (see `client_app.MIN_STATS_ROWS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from federated.client_app import FEATURE_STATS


@dataclass(frozen=True)
class FeatureScaling:
    """Mean and scale (std, or 1 where a feature is constant) of the pooled rows."""

    mean: np.ndarray
    scale: np.ndarray
    clients_reporting: int
    rows: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale).astype(np.float32)

    def as_config(self) -> dict[str, bytes]:
        return {
            "feature-mean": self.mean.astype(np.float32).tobytes(),
            "feature-scale": self.scale.astype(np.float32).tobytes(),
        }


def scaling_from_sums(count: int, total: np.ndarray, squares: np.ndarray,
                      clients: int) -> FeatureScaling:
    mean = total / count
    variance = np.maximum(squares / count - mean * mean, 0.0)
    std = np.sqrt(variance)
    scale = np.where(std > 1e-8, std, 1.0)
    return FeatureScaling(mean.astype(np.float32), scale.astype(np.float32), clients, count)


def scaling_from_rows(x: np.ndarray) -> FeatureScaling:
    """The same statistics computed on rows held in one place (for the baseline)."""
    x = x.astype(np.float64)
    return scaling_from_sums(len(x), x.sum(axis=0), (x * x).sum(axis=0), 1)


def collect_feature_scaling(
    grid: Grid, nodes: list[int], num_features: int, timeout: float
) -> FeatureScaling | None:
    """Ask `nodes` for their sums; None when no node had enough rows to answer."""
    queries = [
        Message(content=RecordDict(), dst_node_id=node, message_type=FEATURE_STATS,
                group_id="feature-stats")
        for node in nodes
    ]
    count, clients = 0, 0
    total = np.zeros(num_features)
    squares = np.zeros(num_features)
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error() or "feature_stats" not in reply.content.array_records:
            continue
        sums = reply.content.array_records["feature_stats"].to_numpy_ndarrays()
        rows = int(reply.content.metric_records["feature_stats_count"]["count"])
        if rows <= 0 or len(sums) != 2 or sums[0].shape != (num_features,):
            continue
        count += rows
        clients += 1
        total += sums[0]
        squares += sums[1]
    if count == 0:
        return None
    return scaling_from_sums(count, total, squares, clients)
