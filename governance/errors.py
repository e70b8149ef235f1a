"""Typed errors of the governance layer.

Each carries the HTTP status a node answers with when the error reaches its API.
"""


class GovernanceError(Exception):
    """Base of every error raised by `governance`."""

    http_status: int = 400
