"""Typed errors of the claim-check engines (same convention as `mpc.errors`)."""

from mpc.errors import MalformedInput, MpcError

__all__ = ["EngineMismatch", "MalformedInput", "MpcError", "TooManyCandidates"]


class TooManyCandidates(MpcError):
    """A claim has more candidate visit rows than the fixed slot count K."""

    http_status = 422


class EngineMismatch(MpcError):
    """A payload or response belongs to another mode, batch or key."""

    http_status = 409
