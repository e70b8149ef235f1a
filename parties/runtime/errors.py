"""Typed errors of the node runtime, one HTTP status each, and the registry that turns a
remote node's refusal back into its typed error."""

from governance.errors import GovernanceError
from mpc.errors import MpcError


class NodeError(Exception):
    http_status: int = 400
    # What the node's own log and refusal record keep instead of the message, for a refusal
    # whose message must not say why (one refusal for several causes): the caller is
    # answered the message, the node keeps the cause.
    log_detail: str | None = None


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
    """Another node refused or failed a call; carries its typed error.

    `remote_error` returns an instance that is also of the remote's own class when this
    process knows it, so a caller catches `ClaimNotCheckable` whether it was raised here or by
    the node it called, and a relay re-raises it unchanged.
    """

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{error} ({status}): {detail}")
        self.http_status = status
        self.error = error
        self.detail = detail


# Errors of these families carry `http_status` and are answered as typed refusals;
# anything else is a bug and becomes a 500 without details.
TYPED_ERROR_BASES: tuple[type[Exception], ...] = (NodeError, GovernanceError, MpcError)

_remote_classes: dict[type[Exception], type[RemoteError]] = {}


def typed_error_class(name: str) -> type[Exception] | None:
    """The typed error class called `name` among those this process has loaded."""
    pending: list[type[Exception]] = list(TYPED_ERROR_BASES)
    while pending:
        cls = pending.pop()
        if cls.__name__ == name and not issubclass(cls, RemoteError):
            return cls
        pending.extend(cls.__subclasses__())
    return None


def remote_error(status: int, error: str, detail: str) -> RemoteError:
    """The typed error a remote node answered with `error`, as an exception to raise here."""
    cls = typed_error_class(error)
    if cls is None:
        return RemoteError(status, error, detail)
    remote_cls = _remote_classes.get(cls)
    if remote_cls is None:
        remote_cls = _remote_classes[cls] = type(
            cls.__name__, (cls, RemoteError), {"__module__": cls.__module__,
                                                "__doc__": cls.__doc__}
        )
    exc = remote_cls.__new__(remote_cls)
    RemoteError.__init__(exc, status, error, detail)
    return exc


def error_detail(exc: Exception) -> str:
    """What a refusal says: a relayed error's own detail, else the message."""
    return exc.detail if isinstance(exc, RemoteError) else str(exc)


class NodeUnavailable(NodeError):
    """Another node could not be reached."""

    http_status = 503
