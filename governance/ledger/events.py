"""Log entries: the event each states, its signature by the acting node, and the stored
leaf encoding (the bytes RFC 6962 hashes as the Merkle leaf).

An entry's event says what happened (kind), who did it (actor node), when, under which
request id, with a payload of hashes, ids and counters only. A simple guard
refuses any string of an entry (payload values, the actor, the request id) that looks like
personal data (national ids, phone
numbers, e-mail addresses, free text); it catches mistakes, not an adversary.
"""

import hashlib
import json
import re
import time
from enum import StrEnum
from typing import Annotated, Any, NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from governance.ledger.errors import EntryInvalid, PersonalDataInPayload, UnknownEventKind
from governance.ledger.signing import (
    PublicKeyLike,
    canonical_json,
    public_key_bytes,
    verify_message,
)

ENTRY_DOMAIN = "cogov-ledger-entry-v1"
ENTRY_PREFIX = ENTRY_DOMAIN.encode("ascii") + b"\x00"  # as signing.signing_message frames it


class EventKind(StrEnum):
    """Kinds of events the log records; extend with `register_event_kind`."""

    DATA_REGISTERED = "data_registered"
    DOMAIN_CREATED = "domain_created"
    DOMAIN_DELETED = "domain_deleted"
    CONSENT_GIVEN = "consent_given"
    CONSENT_REVOKED = "consent_revoked"
    CONTRACT_SIGNED = "contract_signed"
    CONTRACT_TERMINATED = "contract_terminated"
    PACKAGE_SUBMITTED = "package_submitted"
    PACKAGE_APPROVED = "package_approved"
    PACKAGE_REJECTED = "package_rejected"
    QUERY_ANSWERED = "query_answered"
    QUERY_REFUSED = "query_refused"
    QUERY_WITHHELD = "query_withheld"  # an answer withheld: its meter, if logged, is void
    PACKAGE_RUN = "package_run"  # a production run of a package, metered by the data owner
    FLOW_REFUSED = "flow_refused"
    BILL_ISSUED = "bill_issued"
    KEY_DESTROYED = "key_destroyed"
    LEAK_TRACED = "leak_traced"


_KIND_PATTERN = r"^[a-z][a-z0-9_]{2,63}$"
_known_kinds: set[str] = {kind.value for kind in EventKind}


def register_event_kind(name: str) -> str:
    """Allow a new event kind (lowercase snake case) to be appended; returns it."""
    if not re.fullmatch(_KIND_PATTERN, name):
        raise EntryInvalid(f"kind {name!r}: must match {_KIND_PATTERN}")
    _known_kinds.add(name)
    return name


def is_known_kind(name: str) -> bool:
    return name in _known_kinds


# Personal-data guard. Boundaries exclude letters and digits so the patterns do
# not fire inside hex hashes or ids; the string rule (printable ASCII, no
# spaces) already keeps out names in Chinese characters and free text.
_NUMBER_LIKE = re.compile(
    r"(?<![0-9A-Za-z])(?:(?P<id>\d{17}[\dXx]|\d{15})|(?P<phone>(?:\+?86-?)?1[3-9]\d{9}))"
    r"(?![0-9A-Za-z])"
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_TOKEN = re.compile(r"^[\x21-\x7e]{0,256}$")
_FORBIDDEN_KEYS = frozenset(
    {
        "name",
        "full_name",
        "patient_name",
        "person_name",
        "national_id",
        "id_number",
        "id_card",
        "identity_card",
        "phone",
        "mobile",
        "telephone",
        "address",
        "email",
        "birth_date",
        "date_of_birth",
        "dob",
    }
)


def personal_data_problem(key: str, value: Any) -> str | None:
    """Why `value` under `key` looks like personal data, or None."""
    if key.lower() in _FORBIDDEN_KEYS:
        return f"payload key {key!r} names personal data"
    values = value if isinstance(value, list) else [value]
    for item in values:
        if isinstance(item, bool) or item is None:
            continue
        text = str(item)
        if isinstance(item, str) and not _TOKEN.fullmatch(text):
            return (
                f"payload {key!r}: value looks like a name or free text; strings are hashes, "
                "ids or codes (printable ASCII without spaces, at most 256 chars)"
            )
        # Ids and phone numbers have at least 11 digits: skip shorter values cheaply.
        found = _NUMBER_LIKE.search(text) if len(text) >= 11 else None
        if found:
            what = "a national id number" if found["id"] else "a phone number"
            return f"payload {key!r}: value looks like {what}"
        if "@" in text and _EMAIL.search(text):
            return f"payload {key!r}: value looks like an e-mail address"
    return None


Scalar = StrictStr | StrictInt | StrictBool | None
PayloadValue = Scalar | Annotated[list[StrictStr | StrictInt | StrictBool], Field(max_length=256)]


class LogEvent(BaseModel):
    """One thing that happened, as the acting node states it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Annotated[str, Field(pattern=_KIND_PATTERN)]
    actor: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
    timestamp_ms: Annotated[int, Field(ge=0, lt=2**53)]
    request_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
    payload: Annotated[dict[str, PayloadValue], Field(max_length=64)] = {}

    @field_validator("actor", "request_id")
    @classmethod
    def _not_personal(cls, value: str, info: ValidationInfo) -> str:
        # Every string of an entry is guarded, not only the payload: a client-chosen request
        # id that is a national id must never reach the log (nodes log a derived id).
        problem = personal_data_problem(str(info.field_name), value)
        if problem:
            raise ValueError(problem.split(": ", 1)[-1])
        return value

    @field_validator("payload")
    @classmethod
    def _no_personal_data(cls, payload: dict[str, Any]) -> dict[str, Any]:
        for key, value in payload.items():
            if not re.fullmatch(r"^[a-z][a-z0-9_]{0,63}$", key):
                raise ValueError(f"payload key {key!r}: lowercase snake case")
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
                raise ValueError(f"payload {key!r}: integer out of 64-bit range")
            problem = personal_data_problem(key, value)
            if problem:
                raise ValueError(problem)
        return payload

    def document(self) -> dict[str, Any]:
        """The JSON document that is signed and stored."""
        return self.model_dump(mode="json")

    def canonical(self) -> bytes:
        """`canonical_json(self.document())`: the bytes the actor signs and the log stores."""
        return canonical_json(self.document())

    def signing_message(self) -> bytes:
        return ENTRY_PREFIX + self.canonical()


def make_event(
    kind: str,
    actor: str,
    request_id: str,
    payload: dict[str, Any] | None = None,
    timestamp_ms: int | None = None,
) -> LogEvent:
    """Build a validated event of a registered kind; typed errors name the field."""
    return validate_event(
        {
            "kind": kind,
            "actor": actor,
            "request_id": request_id,
            "payload": payload or {},
            "timestamp_ms": time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms,
        }
    )


def validate_event(document: dict[str, Any]) -> LogEvent:
    """Validate an event document (e.g. received from another node) with typed errors."""
    if document.get("kind") not in _known_kinds:
        raise UnknownEventKind(f"kind {document.get('kind')!r} is not registered")
    try:
        return LogEvent.model_validate(document)
    except ValidationError as exc:
        raise _typed_error(exc) from None


def _typed_error(exc: ValidationError) -> EntryInvalid:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "event"
    message = first["msg"].removeprefix("Value error, ")
    if "looks like" in message or "names personal data" in message:
        return PersonalDataInPayload(f"{field}: {message}")
    return EntryInvalid(f"{field}: {message}")


class SignedEntry(BaseModel):
    """An event with its actor's Ed25519 signature (hex)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event: LogEvent
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]

    def document(self) -> dict[str, Any]:
        return {"event": self.event.document(), "signature": self.signature}

    def signature_valid(self, public_key: PublicKeyLike) -> bool:
        message = self.event.signing_message()
        return verify_message(public_key_bytes(public_key), message, bytes.fromhex(self.signature))


def sign_event(event: LogEvent, key: Ed25519PrivateKey) -> SignedEntry:
    """The actor signs its event before handing it to the log."""
    return SignedEntry(event=event, signature=key.sign(event.signing_message()).hex())


class LogEntry(NamedTuple):
    """A log entry as the log holds it: its index, the signed entry (a decoded leaf) and the
    log's integration time (None in a leaf of format 1, which had none)."""

    index: int
    entry: SignedEntry
    integrated_ms: int | None = None

    @property
    def time_ms(self) -> int:
        """When the entry happened for billing and quotas: the log's integration time, or
        the actor's claimed time in a format-1 leaf."""
        return self.entry.event.timestamp_ms if self.integrated_ms is None else self.integrated_ms


# Leaf format 2 adds the log's integration time (and says its version); format 1 leaves,
# `{"entry":...,"index":N}`, stay readable so logs written before stay verifiable.
LEAF_VERSION = 2
LEAF_HEAD = b'{"entry":{"event":'
LEAF_SIGNATURE = b',"signature":"'


def encode_leaf(index: int, entry: SignedEntry, integrated_ms: int | None) -> bytes:
    """The exact bytes stored and hashed as leaf `index`.

    Equal to `canonical_json({"entry": entry.document(), "index": index,
    "integrated_ms": integrated_ms, "v": 2})`, or without the last two keys (format 1)
    when `integrated_ms` is None.
    """
    return encode_leaf_parts(index, entry.event.canonical(), entry.signature, integrated_ms)


def encode_leaf_parts(index: int, event_canonical: bytes, signature_hex: str,
                      integrated_ms: int | None) -> bytes:
    """`encode_leaf` from the event's canonical bytes, so a hot path encodes the event once."""
    tail = b"}" if integrated_ms is None else b',"integrated_ms":%d,"v":%d}' % (
        integrated_ms, LEAF_VERSION)
    return b"".join(
        (
            LEAF_HEAD,
            event_canonical,
            LEAF_SIGNATURE,
            signature_hex.encode("ascii"),
            b'"},"index":',
            str(index).encode("ascii"),
            tail,
        )
    )


def decode_leaf(data: bytes) -> LogEntry:
    """Parse stored leaf bytes (format 1 or 2), refusing anything not in canonical form."""
    try:
        document = json.loads(data)
        keys = set(document)
        if keys not in ({"entry", "index"}, {"entry", "index", "integrated_ms", "v"}):
            raise ValueError(f"leaf keys {sorted(keys)}")
        integrated = document.get("integrated_ms")
        if "v" in document and (document["v"] != LEAF_VERSION or type(integrated) is not int
                                or not 0 <= integrated < 2**53):
            raise ValueError("format 2 leaf with a bad version or integration time")
        decoded = LogEntry(index=document["index"],
                           entry=SignedEntry.model_validate(document["entry"]),
                           integrated_ms=integrated)
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise EntryInvalid(f"stored entry does not parse: {str(exc).splitlines()[0]}") from None
    if encode_leaf(decoded.index, decoded.entry, decoded.integrated_ms) != bytes(data):
        raise EntryInvalid("stored entry is not in canonical form")
    return decoded


def sha256_hex(data: bytes | str) -> str:
    """SHA-256 of bytes (or UTF-8 text) as hex: the usual way to put a document in a payload."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()
