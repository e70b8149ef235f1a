"""Federated training of the claim-risk model across hospitals (Flower 1.42).

Front door:

- `simulate(...)`: many virtual hospitals on Flower's simulation engine (Ray).
- `deploy(DeployCertificates(...), clients=[...], eval_data=...)`: a SuperLink and
  one SuperNode per hospital as OS processes over TLS.

Both write a JSON report (per-round held-out loss/accuracy/AUC and bytes per
client, the centralized baseline, epsilon/delta under DP) and a PNG plot.
The ServerApp / ClientApp live in `federated.server_app` / `federated.client_app`.
Names are imported lazily so `import federated` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "simulate": "federated.simulation",
    "deploy": "federated.deployment",
    "DeployCertificates": "federated.deployment",
    "FederatedReport": "federated.report",
    "RunSettings": "federated.settings",
    "FederatedTask": "federated.datasets",
    "load_local_data": "federated.datasets",
    "write_breast_cancer_task": "federated.datasets",
    "FederatedError": "federated.errors",
    "InvalidLocalData": "federated.errors",
    "InvalidFederatedConfig": "federated.errors",
    "InvalidCertificates": "federated.errors",
    "SimulationFailed": "federated.errors",
    "DeploymentFailed": "federated.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'federated' has no attribute {name!r}")
