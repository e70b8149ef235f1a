"""Local training (with FedProx's proximal term) and evaluation of a claim-risk model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Scores:
    """Loss (mean binary cross-entropy), accuracy at 0.5 and ROC AUC of one evaluation."""

    loss: float
    accuracy: float
    auc: float | None  # None when the evaluated rows hold a single class
    examples: int


def train_epochs(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    proximal_mu: float = 0.0,
) -> float:
    """Mini-batch SGD for `epochs` passes; returns the mean loss of the last pass.

    With `proximal_mu > 0` the loss gains FedProx's term mu/2 * ||w - w_start||^2,
    where w_start are the weights the model had on entry (the global model).
    """
    torch.set_num_threads(1)  # clients share two cores; threads only add contention
    generator = torch.Generator().manual_seed(seed)
    features = torch.tensor(x, dtype=torch.float32)
    labels = torch.tensor(y, dtype=torch.float32).reshape(-1, 1)
    anchor = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    criterion = nn.BCEWithLogitsLoss()
    model.train()
    last_loss = math.nan
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        total, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = criterion(model(features[batch]), labels[batch])
            if proximal_mu > 0:
                drift = sum(((p - a) ** 2).sum() for p, a in
                            zip(model.parameters(), anchor, strict=True))
                loss = loss + 0.5 * proximal_mu * drift
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
        last_loss = total / max(seen, 1)
    return last_loss


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> Scores:
    """Scores of `model` on rows `x` with labels `y`."""
    if len(y) == 0:
        return Scores(loss=math.nan, accuracy=math.nan, auc=None, examples=0)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(x, dtype=torch.float32)).reshape(-1)
        target = torch.tensor(y, dtype=torch.float32)
        loss = float(nn.functional.binary_cross_entropy_with_logits(logits, target))
        probability = torch.sigmoid(logits).numpy()
    accuracy = float(((probability >= 0.5) == (y >= 0.5)).mean())
    auc = roc_auc(y, probability) if len(np.unique(y)) == 2 else None
    return Scores(loss=loss, accuracy=accuracy, auc=auc, examples=len(y))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties get mid-ranks).

    Written out rather than imported from scikit-learn, whose import costs seconds in
    every short-lived ClientApp process of the deployment engine.
    """
    labels = np.asarray(labels) >= 0.5
    scores = np.asarray(scores, dtype=np.float64)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both classes")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mid_ranks = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = mid_ranks[inverse][labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))
