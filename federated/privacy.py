"""Privacy accounting for client-level DP (client-side clipping, server-side noise).

Each round releases the average of clipped client updates plus Gaussian noise of
std `noise_multiplier * clipping_norm / sampled_clients`: a subsampled Gaussian
mechanism with noise multiplier `noise_multiplier` and sampling rate
`sampled_clients / total_clients`. Opacus' RDP accountant composes the rounds.
"""

from __future__ import annotations

import math

from federated.errors import InvalidFederatedConfig


def client_level_epsilon(
    noise_multiplier: float, sample_rate: float, rounds: int, delta: float
) -> float:
    """The epsilon of `rounds` releases at (noise_multiplier, sample_rate), for `delta`."""
    from opacus.accountants import RDPAccountant

    if not 0.0 < sample_rate <= 1.0:
        raise InvalidFederatedConfig("sample_rate must be in (0, 1]")
    if not 0.0 < delta < 1.0:
        raise InvalidFederatedConfig("delta must be in (0, 1)")
    if rounds < 1:
        raise InvalidFederatedConfig("rounds must be positive")
    if noise_multiplier <= 0.0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta=delta))
