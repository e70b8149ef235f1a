"""Typed errors of the node runtime, one HTTP status each."""


class NodeError(Exception):
    http_status: int = 400


class NotAuthenticated(NodeError):
    """No verified federation certificate came with the request."""

    http_status = 401


class UnknownNode(NodeError):
    """The certificate names a node that is not in the topology."""

    http_status = 403


class IdentityMismatch(NodeError):
    """The caller claims to be a node other than the one its certificate names."""

    http_status = 403


class FlowNotAllowed(NodeError):
    """The topology does not allow this caller to make this kind of call here."""

    http_status = 403


class RoleNotAllowed(NodeError):
    """The route does not serve callers of this role."""

    http_status = 403


class PeerIdentityMismatch(NodeError):
    """The server answering is not the node the client meant to reach."""

    http_status = 502


class RemoteError(NodeError):
    """Another node refused or failed a call; carries its typed error."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{error} ({status}): {detail}")
        self.http_status = status
        self.error = error
        self.detail = detail


class NodeUnavailable(NodeError):
    """Another node could not be reached."""

    http_status = 503
