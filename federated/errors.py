"""Typed errors of the federated package.

Each carries the HTTP status a node answers with when the error reaches its API.
"""


class FederatedError(Exception):
    """Base of every error raised by `federated`."""

    http_status: int = 500


class InvalidLocalData(FederatedError):
    """A hospital's local data file is missing, unreadable or malformed."""

    http_status = 422


class InvalidFederatedConfig(FederatedError):
    """A run was asked for with settings that cannot work together."""

    http_status = 422


class InvalidCertificates(FederatedError):
    """TLS material for the deployment engine is missing or unparsable."""

    http_status = 422


class NodesMissing(FederatedError):
    """Fewer SuperNodes connected than the run needs, within the wait timeout."""

    http_status = 503


class SimulationFailed(FederatedError):
    """The simulation engine ended without producing a report."""

    http_status = 500


class DeploymentFailed(FederatedError):
    """The SuperLink/SuperNode deployment did not complete the run."""

    http_status = 502
