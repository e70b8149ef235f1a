"""Claim-risk models: logistic regression and a small MLP, both emitting one logit."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from federated.errors import InvalidFederatedConfig

MODEL_KINDS = ("logreg", "mlp")


def build_model(kind: str, num_features: int, hidden: int = 32, seed: int = 0) -> nn.Module:
    """A freshly initialised model; the same (kind, sizes, seed) gives the same weights."""
    if num_features < 1:
        raise InvalidFederatedConfig("a model needs at least one feature")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if kind == "logreg":
            model: nn.Module = nn.Linear(num_features, 1)
        elif kind == "mlp":
            if hidden < 1:
                raise InvalidFederatedConfig("mlp hidden width must be positive")
            model = nn.Sequential(
                nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, 1)
            )
        else:
            raise InvalidFederatedConfig(f"unknown model {kind!r} (one of {MODEL_KINDS})")
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """Parameters as float32 arrays, in `state_dict` order."""
    return [t.detach().cpu().numpy().astype(np.float32, copy=True)
            for t in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    """Load arrays produced by `get_weights` (shapes must match)."""
    keys = list(model.state_dict().keys())
    if len(keys) != len(weights):
        raise InvalidFederatedConfig(
            f"model has {len(keys)} tensors, received {len(weights)} arrays"
        )
    state = {}
    for key, current, array in zip(keys, model.state_dict().values(), weights, strict=True):
        if tuple(current.shape) != tuple(np.shape(array)):
            raise InvalidFederatedConfig(
                f"shape mismatch for {key}: {tuple(current.shape)} vs {np.shape(array)}"
            )
        state[key] = torch.as_tensor(np.asarray(array, dtype=np.float32))
    model.load_state_dict(state)
