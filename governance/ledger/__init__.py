"""The tamper-evident log (RFC 6962 / RFC 9162 design): the paper's "blockchain evidence".

Front door: build the event an entry states (`make_event`), the actor signs it into a
log entry (`sign_event`), the operator appends batches of entries (`MerkleLog.append`),
witnesses countersign heads (`Witness.cosign`), anyone verifies offline (`verify_log`,
`check_inclusion_proof`). A node changes its signing key in the log itself
(`rotation_entry`, `revocation_entry`); verifiers follow the key history the log gives.
Tree arithmetic lives one level down in `merkle`.
"""

from governance.ledger.errors import (
    EntryInvalid,
    EntrySignatureInvalid,
    InclusionProofInvalid,
    KeyEntryInvalid,
    LedgerError,
    LogInconsistent,
    PersonalDataInPayload,
    ProofUnavailable,
    StaleTreeHead,
    TimestampSkewed,
    TreeHeadInvalid,
    UnknownActor,
    UnknownEventKind,
)
from governance.ledger.events import (
    EventKind,
    LogEntry,
    LogEvent,
    SignedEntry,
    decode_leaf,
    encode_leaf,
    make_event,
    register_event_kind,
    sha256_hex,
    sign_event,
    validate_event,
)
from governance.ledger.key_history import (
    KeyHistory,
    derive_key_history,
    revocation_entry,
    rotation_entry,
)
from governance.ledger.signing import private_key_from_hex, public_key_hex
from governance.ledger.store import AppendResult, InclusionProof, MerkleLog
from governance.ledger.tree_head import Cosignature, SignedTreeHead
from governance.ledger.verify import (
    Finding,
    VerificationReport,
    check_inclusion_proof,
    verify_log,
)
from governance.ledger.witness import Witness, WitnessedHead

__all__ = [
    "AppendResult",
    "Cosignature",
    "EntryInvalid",
    "EntrySignatureInvalid",
    "EventKind",
    "Finding",
    "InclusionProof",
    "InclusionProofInvalid",
    "KeyEntryInvalid",
    "KeyHistory",
    "LedgerError",
    "LogEntry",
    "LogEvent",
    "LogInconsistent",
    "MerkleLog",
    "PersonalDataInPayload",
    "ProofUnavailable",
    "SignedEntry",
    "SignedTreeHead",
    "StaleTreeHead",
    "TimestampSkewed",
    "TreeHeadInvalid",
    "UnknownActor",
    "UnknownEventKind",
    "VerificationReport",
    "Witness",
    "WitnessedHead",
    "check_inclusion_proof",
    "decode_leaf",
    "derive_key_history",
    "encode_leaf",
    "make_event",
    "private_key_from_hex",
    "public_key_hex",
    "register_event_kind",
    "revocation_entry",
    "rotation_entry",
    "sha256_hex",
    "sign_event",
    "validate_event",
    "verify_log",
]
