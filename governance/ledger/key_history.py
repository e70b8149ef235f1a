"""Node signing keys with a history: which key signs a node's entries at each log index.

A node's first key is certified by the federation CA (its node certificate carries it).
The node changes keys in the log itself: a `signing_key_rotated` entry is signed by the
old key (the log entry's signature) and by the new one (over a rotation statement in the
payload), so the chain is linked in both directions and any certified key of the chain
anchors every key of it. A node's first key is its certified key, or, when the certificate
carries a later key of the chain, the key reached by following valid rotations back from
it; a rotation that is not signed by the node's current key is refused and changes no key
(it never re-roots the chain). A `signing_key_revoked` entry, signed by the node's current
key, ends an earlier key's validity at an index no earlier than the rotation entry that
retired that key: a revocation bounds what a stolen retired key signs, and cannot void
entries made while that key was the node's current one (its meters stay billable).
Renewing a TLS certificate changes no signing key. The history is derived from the log
plus the certified keys alone (public material), so the log, `verify_log`, billing and a
third party all judge an entry the same way.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.ledger.events import (
    LogEntry,
    SignedEntry,
    is_known_kind,
    make_event,
    register_event_kind,
    sign_event,
)
from governance.ledger.signing import (
    PublicKeyLike,
    public_key_bytes,
    public_key_hex,
    sign_document,
    verify_document,
    verify_message,
)


def _kind(name: str) -> str:
    return name if is_known_kind(name) else register_event_kind(name)


# Distinct from `key_rotated`, which the domain keys (k1, k2[d]) already log.
SIGNING_KEY_ROTATED = _kind("signing_key_rotated")
SIGNING_KEY_REVOKED = _kind("signing_key_revoked")
KEY_KINDS = frozenset({SIGNING_KEY_ROTATED, SIGNING_KEY_REVOKED})
ROTATION_DOMAIN = "cogov-signing-key-rotation-v1"


def rotation_statement(actor: str, old_key: str, new_key: str, request_id: str) -> dict[str, str]:
    """What the new key signs: this node moves from `old_key` to `new_key` (hex)."""
    return {"actor": actor, "old_key": old_key, "new_key": new_key, "request_id": request_id}


def rotation_entry(actor: str, old_key: Ed25519PrivateKey, new_key: Ed25519PrivateKey,
                   request_id: str, timestamp_ms: int | None = None) -> SignedEntry:
    """The `signing_key_rotated` entry: signed by `old_key`, countersigned by `new_key`."""
    old_hex, new_hex = public_key_hex(old_key), public_key_hex(new_key)
    statement = rotation_statement(actor, old_hex, new_hex, request_id)
    payload = {"old_key": old_hex, "new_key": new_hex,
               "new_key_signature": sign_document(new_key, ROTATION_DOMAIN, statement)}
    event = make_event(SIGNING_KEY_ROTATED, actor, request_id, payload, timestamp_ms)
    return sign_event(event, old_key)


def revocation_entry(actor: str, current_key: Ed25519PrivateKey, revoked_key: PublicKeyLike,
                     invalid_from: int, request_id: str,
                     timestamp_ms: int | None = None) -> SignedEntry:
    """The `signing_key_revoked` entry: `revoked_key` (an earlier key of `actor`) signs
    nothing valid from log index `invalid_from` on."""
    payload = {"revoked_key": public_key_hex(revoked_key), "invalid_from": invalid_from}
    event = make_event(SIGNING_KEY_REVOKED, actor, request_id, payload, timestamp_ms)
    return sign_event(event, current_key)


@dataclass
class KeySpan:
    """A key and the entries [start, end) it may sign (end None: still valid)."""

    key: bytes
    start: int
    end: int | None = None
    retired_at: int | None = None  # the index of the rotation entry that retired the key

    def covers(self, index: int) -> bool:
        return self.start <= index and (self.end is None or index < self.end)


@dataclass
class KeyHistory:
    """Every node's keys over log indices, and the verdict on each key entry.

    Plain data (picklable), so verification workers receive it whole.
    """

    spans: dict[str, list[KeySpan]] = field(default_factory=dict)
    links: set[int] = field(default_factory=set)  # key entries accepted (already verified)
    refused: dict[int, str] = field(default_factory=dict)  # key entries refused, and why
    certified: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def start(cls, certified: Mapping[str, PublicKeyLike],
              genesis: Mapping[str, bytes] | None = None) -> "KeyHistory":
        """A history before any key entry: each node signs with its first key (`genesis`,
        default its certified key)."""
        keys = {name: public_key_bytes(key) for name, key in certified.items()}
        first = {**keys, **(genesis or {})}
        return cls(spans={name: [KeySpan(key, 0)] for name, key in first.items()},
                   certified=keys)

    def copy(self) -> "KeyHistory":
        return KeyHistory(
            spans={name: [KeySpan(s.key, s.start, s.end, s.retired_at) for s in spans]
                   for name, spans in self.spans.items()},
            links=set(self.links), refused=dict(self.refused), certified=dict(self.certified))

    def current_key(self, actor: str) -> bytes | None:
        """The key `actor`'s next entry must be signed with, or None (unknown actor)."""
        spans = self.spans.get(actor)
        return spans[-1].key if spans and spans[-1].end is None else None

    def key_at(self, actor: str, index: int) -> bytes | None:
        """The key valid for `actor`'s entry at `index`, or None."""
        for span in self.spans.get(actor, ()):
            if span.covers(index):
                return span.key
        return None

    def anchored(self, actor: str) -> bool:
        """Whether `actor`'s chain contains its certified key (the federation root's word)."""
        certified = self.certified.get(actor)
        return certified is not None and any(s.key == certified for s in self.spans.get(actor, ()))

    def apply(self, index: int, entry: SignedEntry) -> str | None:
        """Take key entry `entry` at `index` into the history; why it is refused, or None.

        The entry's own signature must be by the actor's current key. A refused entry
        changes nothing (it is recorded in `refused`).
        """
        problem = self._problem(index, entry)
        if problem is None:
            self.links.add(index)
        else:
            self.refused[index] = problem
        return problem

    def _problem(self, index: int, entry: SignedEntry) -> str | None:
        event, payload = entry.event, entry.event.payload
        current = self.current_key(event.actor)
        if current is None:
            return f"{event.actor!r} has no current signing key"
        if not entry.signature_valid(current):
            return f"not signed by {event.actor}'s key valid at index {index}"
        spans = self.spans[event.actor]
        if event.kind == SIGNING_KEY_ROTATED:
            return self._rotate(index, entry, spans, payload)
        if event.kind == SIGNING_KEY_REVOKED:
            return _revoke(spans, payload)
        return f"{event.kind} is not a key entry"

    @staticmethod
    def _rotate(index: int, entry: SignedEntry, spans: list[KeySpan],
                payload: Mapping[str, Any]) -> str | None:
        old, new, signature = (payload.get(k) for k in ("old_key", "new_key",
                                                         "new_key_signature"))
        if not all(isinstance(v, str) for v in (old, new, signature)):
            return "a rotation names old_key, new_key and new_key_signature"
        if old != spans[-1].key.hex():
            return "the rotation's old_key is not the key it is signed with"
        try:
            new_bytes = public_key_bytes(new)
        except ValueError:
            return "new_key is not an Ed25519 public key"
        if any(s.key == new_bytes for s in spans):
            return "new_key was already used by this node"
        statement = rotation_statement(entry.event.actor, old, new, entry.event.request_id)
        if not verify_document(new_bytes, ROTATION_DOMAIN, statement, signature):
            return "the new key did not sign the rotation"
        spans[-1].end = index + 1  # the rotation entry is the old key's last
        spans[-1].retired_at = index
        spans.append(KeySpan(new_bytes, index + 1))
        return None


def _revoke(spans: list[KeySpan], payload: Mapping[str, Any]) -> str | None:
    revoked, invalid_from = payload.get("revoked_key"), payload.get("invalid_from")
    if not isinstance(revoked, str) or type(invalid_from) is not int:
        return "a revocation names revoked_key and invalid_from"
    span = next((s for s in spans[:-1] if s.key.hex() == revoked), None)
    if span is None:
        return "revoked_key is not an earlier key of this node (rotate the current one first)"
    if span.retired_at is None or invalid_from < span.retired_at:
        # Before its rotation the key was the node's current one: voiding those entries
        # would let a node (or a thief holding its current key) erase its own meters.
        return (f"invalid_from {invalid_from} is before the rotation entry "
                f"{span.retired_at} that retired the key")
    span.end = invalid_from if span.end is None else min(span.end, invalid_from)
    return None


def derive_key_history(key_entries: Iterable[LogEntry],
                       certified: Mapping[str, PublicKeyLike]) -> KeyHistory:
    """The key history from the log's key entries (in log order) and the certified keys.

    A node's first key comes from its certified key (`_first_key`), never from a rotation
    entry alone; the chain must contain the certified key (`KeyHistory.anchored`).
    """
    key_entries = sorted(key_entries, key=lambda e: e.index)
    genesis = {name: _first_key(key_entries, name, public_key_bytes(key))
               for name, key in certified.items()}
    history = KeyHistory.start(certified, genesis)
    for log_entry in key_entries:
        history.apply(log_entry.index, log_entry.entry)
    for index in sorted(history.links):
        actor = next(e.entry.event.actor for e in key_entries if e.index == index)
        if not history.anchored(actor):
            history.links.discard(index)
            history.refused[index] = f"no key in {actor}'s chain is its certified key"
    return history


def _first_key(key_entries: list[LogEntry], actor: str, certified: bytes) -> bytes:
    """`actor`'s first key: from its certified key, step back over each rotation (latest
    first) whose new key is the key reached so far and that both its keys signed.

    Each step is vouched for by a key the certified one leads to, so an entry that key
    never signed (a rotation the operator made with two keys of its own) cannot move the
    root; forward, `KeyHistory.apply` then refuses it.
    """
    key = certified
    for log_entry in reversed(key_entries):
        entry = log_entry.entry
        event, payload = entry.event, entry.event.payload
        if (event.kind != SIGNING_KEY_ROTATED or event.actor != actor
                or payload.get("new_key") != key.hex()):
            continue
        try:
            old = public_key_bytes(payload.get("old_key"))  # type: ignore[arg-type]
        except (ValueError, TypeError):
            continue
        if not entry.signature_valid(old):
            continue
        statement = rotation_statement(actor, old.hex(), key.hex(), event.request_id)
        signature = payload.get("new_key_signature")
        if isinstance(signature, str) and verify_document(key, ROTATION_DOMAIN, statement,
                                                          signature):
            key = old
    return key


def entry_problem(history: KeyHistory, index: int, entry: SignedEntry) -> str | None:
    """Why `entry` at `index` does not verify under the key history, or None."""
    if index in history.refused:
        return f"key entry refused: {history.refused[index]}"
    if index in history.links:
        return None
    actor = entry.event.actor
    if actor not in history.spans:
        return f"actor {actor!r} has no known public key"
    if not history.anchored(actor):
        return f"no key in {actor}'s chain is its certified key"
    message = entry.event.signing_message()
    signature = bytes.fromhex(entry.signature)
    key = history.key_at(actor, index)
    if key is not None and verify_message(key, message, signature):
        return None
    for span in history.spans[actor]:
        if verify_message(span.key, message, signature):
            end = "" if span.end is None else f" ended at index {span.end}"
            return (f"signed by {actor}'s key {span.key.hex()[:16]}... outside its validity "
                    f"(from index {span.start}{end})")
    return f"signature by {actor!r} does not verify (content or signature altered)"
