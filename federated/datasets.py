"""Local data of one hospital, and the bundled breast-cancer task split across clients.

Every client, simulated or deployed, reads its rows from one Parquet file: numeric
feature columns, a binary `label` column and an optional `split` column (`train` /
`test`). The breast-cancer builder writes such files so that tests, benchmarks and
real hospitals all go through the same loader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from federated.errors import InvalidFederatedConfig, InvalidLocalData

LABEL_COLUMN = "label"
SPLIT_COLUMN = "split"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class LocalData:
    """Rows one client trains and evaluates on (float32 features, {0,1} labels)."""

    feature_names: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    def all_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Train and test rows together (a held-out file uses every row)."""
        return (
            np.concatenate([self.x_train, self.x_test]),
            np.concatenate([self.y_train, self.y_test]),
        )


@dataclass(frozen=True)
class FederatedTask:
    """One Parquet file per client plus a held-out file the server evaluates on."""

    name: str
    client_files: tuple[Path, ...]
    holdout_file: Path
    feature_names: tuple[str, ...]


def load_local_data(path: str | os.PathLike[str]) -> LocalData:
    """Read and validate one client's Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidLocalData(f"local data file not found: {path}")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types
        raise InvalidLocalData(f"cannot read {path} as Parquet: {exc}") from exc
    return local_data_from_frame(frame, source=str(path))


def local_data_from_frame(frame: pd.DataFrame, source: str = "<frame>") -> LocalData:
    """Validate a frame with the local-data shape and split it into arrays."""
    if LABEL_COLUMN not in frame.columns:
        raise InvalidLocalData(f"{source}: no '{LABEL_COLUMN}' column")
    features = [c for c in frame.columns if c not in (LABEL_COLUMN, SPLIT_COLUMN)]
    if not features:
        raise InvalidLocalData(f"{source}: no feature columns")
    not_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
    if not_numeric:
        raise InvalidLocalData(f"{source}: non-numeric feature columns {not_numeric}")
    if frame.empty:
        raise InvalidLocalData(f"{source}: no rows")
    x = frame[features].to_numpy(dtype=np.float64)
    if not np.isfinite(x).all():
        raise InvalidLocalData(f"{source}: features contain NaN or infinite values")
    labels = frame[LABEL_COLUMN]
    if labels.isna().any() or not set(np.unique(labels.to_numpy())) <= {0, 1}:
        raise InvalidLocalData(f"{source}: '{LABEL_COLUMN}' must hold only 0 and 1")
    y = labels.to_numpy(dtype=np.float32)
    if SPLIT_COLUMN in frame.columns:
        split = frame[SPLIT_COLUMN].astype(str).to_numpy()
        unknown = sorted(set(split) - set(SPLITS))
        if unknown:
            raise InvalidLocalData(f"{source}: unknown '{SPLIT_COLUMN}' values {unknown}")
        train = split == "train"
    else:
        train = np.ones(len(frame), dtype=bool)
    if not train.any():
        raise InvalidLocalData(f"{source}: no training rows")
    return LocalData(
        feature_names=tuple(str(c) for c in features),
        x_train=x[train].astype(np.float32),
        y_train=y[train],
        x_test=x[~train].astype(np.float32),
        y_test=y[~train],
    )


def count_training_rows(path: str | os.PathLike[str]) -> int:
    """Number of `train` rows in a local-data file."""
    return len(load_local_data(path).y_train)


def pool_local_data(paths: list[Path]) -> LocalData:
    """Concatenate several clients' files (the centralized baseline's view)."""
    parts = [load_local_data(p) for p in paths]
    names = parts[0].feature_names
    for path, part in zip(paths, parts, strict=True):
        if part.feature_names != names:
            raise InvalidLocalData(f"{path}: feature columns differ from {paths[0]}")
    return LocalData(
        feature_names=names,
        x_train=np.concatenate([p.x_train for p in parts]),
        y_train=np.concatenate([p.y_train for p in parts]),
        x_test=np.concatenate([p.x_test for p in parts]),
        y_test=np.concatenate([p.y_test for p in parts]),
    )


def partition_iid(num_rows: int, clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle row indices and deal them into `clients` near-equal parts."""
    _check_partition_args(num_rows, clients)
    order = np.random.default_rng(seed).permutation(num_rows)
    return [np.sort(part) for part in np.array_split(order, clients)]


def partition_dirichlet(
    labels: np.ndarray, clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Label-skewed split: each class is spread over clients by Dirichlet(alpha) shares.

    Every client ends up with at least one row: rows are moved from the largest
    parts to empty ones, which keeps the skew while making every client usable.
    """
    _check_partition_args(len(labels), clients)
    if alpha <= 0:
        raise InvalidFederatedConfig("dirichlet alpha must be positive")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
        for client, chunk in enumerate(np.split(rows, cuts)):
            parts[client].extend(chunk.tolist())
    for client in range(clients):
        if not parts[client]:
            donor = max(range(clients), key=lambda c: len(parts[c]))
            parts[client].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=int)) for p in parts]


def write_breast_cancer_task(
    out_dir: str | os.PathLike[str],
    clients: int,
    partition: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    holdout_fraction: float = 0.2,
) -> FederatedTask:
    """Split scikit-learn's bundled breast-cancer set over `clients` Parquet files.

    A stratified `holdout_fraction` of rows is kept aside for the server's held-out
    evaluation. Features are standardized with the statistics of the remaining
    (client) rows; this stands in for the governance layer's standardization stage,
    which puts every hospital's data on one scale before training.
    """
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    if partition not in ("iid", "dirichlet"):
        raise InvalidFederatedConfig(f"unknown partition {partition!r} (iid or dirichlet)")
    if not 0.0 < holdout_fraction < 1.0:
        raise InvalidFederatedConfig("holdout_fraction must be in (0, 1)")
    bunch = load_breast_cancer()
    names = tuple(f"f{i:02d}_" + n.replace(" ", "_") for i, n in enumerate(bunch.feature_names))
    x = bunch.data.astype(np.float64)
    # sklearn labels malignant as 0; flag malignant (the "anomaly") as 1 instead.
    y = (bunch.target == 0).astype(np.int64)
    pool_idx, hold_idx = train_test_split(
        np.arange(len(y)), test_size=holdout_fraction, stratify=y, random_state=seed
    )
    mean = x[pool_idx].mean(axis=0)
    std = x[pool_idx].std(axis=0)
    x = (x - mean) / np.where(std > 0, std, 1.0)

    if partition == "iid":
        parts = partition_iid(len(pool_idx), clients, seed)
    else:
        parts = partition_dirichlet(y[pool_idx], clients, alpha, seed)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    holdout_file = out / "holdout.parquet"
    _write_rows(holdout_file, names, x[hold_idx], y[hold_idx], None)
    rng = np.random.default_rng(seed + 1)
    files = []
    for client, part in enumerate(parts):
        rows = pool_idx[part]
        split = _local_split(len(rows), rng)
        path = out / f"client-{client:04d}.parquet"
        _write_rows(path, names, x[rows], y[rows], split)
        files.append(path)
    label = f"breast-cancer-{partition}" + (f"-a{alpha:g}" if partition == "dirichlet" else "")
    return FederatedTask(label, tuple(files), holdout_file, names)


def _local_split(rows: int, rng: np.random.Generator) -> np.ndarray:
    """Mark about a fifth of a client's rows as its local test set (if it has 10+)."""
    split = np.full(rows, "train", dtype=object)
    if rows >= 10:
        test = rng.choice(rows, size=rows // 5, replace=False)
        split[test] = "test"
    return split


def _write_rows(
    path: Path,
    names: tuple[str, ...],
    x: np.ndarray,
    y: np.ndarray,
    split: np.ndarray | None,
) -> None:
    frame = pd.DataFrame(x, columns=list(names))
    frame[LABEL_COLUMN] = y.astype(np.int64)
    if split is not None:
        frame[SPLIT_COLUMN] = split.astype(str)
    tmp = path.with_suffix(".parquet.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def _check_partition_args(num_rows: int, clients: int) -> None:
    if clients < 1:
        raise InvalidFederatedConfig("need at least one client")
    if clients > num_rows:
        raise InvalidFederatedConfig(f"{clients} clients but only {num_rows} rows to share")
