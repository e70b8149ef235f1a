"""Typed errors of the cryptographic engines.

Each carries the HTTP status a node answers with when the error reaches its API.
"""


class MpcError(Exception):
    """Base of every error raised by `mpc`."""

    http_status: int = 400


class MalformedInput(MpcError):
    """A token, ciphertext, share or key that does not decode or is out of range."""

    http_status = 422


class HashVersionMismatch(MpcError):
    """Stored xID state was derived with another hash-to-curve version than this build's:
    old and new tokens would never match, so the state is refused, not mixed."""

    http_status = 409


class IntersectionTooSmall(MpcError):
    """A private-intersection result was refused: the intersection is below the agreed minimum."""

    http_status = 403


class ProtocolStateError(MpcError):
    """A protocol message arrived out of order, for another session, or under another policy."""

    http_status = 409
