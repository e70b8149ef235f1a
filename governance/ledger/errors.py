"""Typed errors of the tamper-evident log."""

from governance.errors import GovernanceError


class LedgerError(GovernanceError):
    """Base of the log's errors."""


class EntryInvalid(LedgerError):
    """An event or stored entry is malformed (the detail names the field)."""

    http_status = 400


class PersonalDataInPayload(EntryInvalid):
    """A payload value looks like personal data; payloads carry hashes, ids and counters only."""

    http_status = 422


class UnknownEventKind(EntryInvalid):
    """The event kind is not registered (a typo, or `register_event_kind` was not called)."""


class UnknownActor(LedgerError):
    """The log holds no public key for the node that signed the entry."""

    http_status = 403


class TimestampSkewed(EntryInvalid):
    """An entry claims a time too far from the log's clock (back- or forward-dated)."""

    http_status = 422


class KeyEntryInvalid(LedgerError):
    """A signing-key rotation or revocation is refused (not signed by the current key, a
    rotation the new key did not sign, a revocation of no earlier key)."""

    http_status = 400


class EntrySignatureInvalid(LedgerError):
    """An entry's signature does not verify with its actor's key."""

    http_status = 400


class TreeHeadInvalid(LedgerError):
    """A signed tree head or cosignature does not verify."""

    http_status = 400


class StaleTreeHead(LedgerError):
    """A witness was shown a head older than one it already witnessed."""

    http_status = 409


class LogInconsistent(LedgerError):
    """The log showed a head that contradicts one already witnessed (rewrite or split view)."""

    http_status = 409


class InclusionProofInvalid(LedgerError):
    """An inclusion proof does not lead to the signed tree head."""

    http_status = 400


class ProofUnavailable(LedgerError):
    """A proof was asked for sizes or indices the log does not have."""

    http_status = 404
