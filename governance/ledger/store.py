"""The append-only Merkle log persisted in SQLite (the operator's primary log).

Tables: the leaf bytes by index, every complete subtree hash (level, index),
and the signed tree heads. Appends run one transaction per batch and cost
O(log n) hashes per entry through a compact range kept in memory; proofs read
O(log^2 n) stored node hashes and never rehash the log.
"""

import base64
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field

from governance.ledger.errors import (
    EntrySignatureInvalid,
    KeyEntryInvalid,
    ProofUnavailable,
    TimestampSkewed,
    UnknownActor,
)
from governance.ledger.events import (
    ENTRY_PREFIX,
    LogEntry,
    LogEvent,
    SignedEntry,
    decode_leaf,
    encode_leaf_parts,
    validate_event,
)
from governance.ledger.key_history import KEY_KINDS, KeyHistory, derive_key_history
from governance.ledger.merkle import (
    EMPTY_ROOT,
    CompactRange,
    consistency_path,
    inclusion_path,
    leaf_hash,
    subtree_hash_from_nodes,
)
from governance.ledger.signing import (
    PublicKeyLike,
    canonical_json,
    public_key_bytes,
    public_key_hex,
    verify_message,
)
from governance.ledger.transactions import write_transaction
from governance.ledger.tree_head import SignedTreeHead, sign_tree_head
from governance.migrations import apply_migrations

if TYPE_CHECKING:
    import sqlite3  # annotations only: the caller opens the connection

COMPONENT = "ledger"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE ledger_entries (
        leaf_index INTEGER PRIMARY KEY,
        leaf BLOB NOT NULL,
        kind TEXT NOT NULL,
        actor TEXT NOT NULL,
        request_id TEXT NOT NULL,
        timestamp_ms INTEGER NOT NULL
    );
    CREATE INDEX ledger_entries_by_kind ON ledger_entries (kind, timestamp_ms);
    CREATE INDEX ledger_entries_by_request ON ledger_entries (request_id);
    CREATE TABLE ledger_nodes (
        level INTEGER NOT NULL,
        node_index INTEGER NOT NULL,
        hash BLOB NOT NULL,
        PRIMARY KEY (level, node_index)
    ) WITHOUT ROWID;
    CREATE TABLE ledger_tree_heads (
        tree_size INTEGER PRIMARY KEY,
        log_id TEXT NOT NULL,
        root_hash BLOB NOT NULL,
        timestamp_ms INTEGER NOT NULL,
        signature BLOB NOT NULL
    );
    """,
    # An entry's signature identifies it (Ed25519 is deterministic): an entry posted
    # again, as a replay or a retry after a lost response, is not stored twice.
    """
    CREATE TABLE ledger_signatures (
        signature TEXT PRIMARY KEY,
        leaf_index INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO ledger_signatures
        SELECT substr(CAST(leaf AS TEXT), instr(CAST(leaf AS TEXT), '"signature":"') + 13, 128),
               leaf_index
        FROM ledger_entries;
    """,
    # Leaf format 2: the log's own integration time (NULL in format-1 leaves, which had none).
    """
    ALTER TABLE ledger_entries ADD COLUMN integrated_ms INTEGER;
    """,
)
DEFAULT_MAX_SKEW_MS = 300_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class InclusionProof(BaseModel):
    """Audit path of one leaf; `to_json()` is the compact wire form (< 1 KiB at 1M entries)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    log_id: str
    leaf_index: Annotated[int, Field(ge=0)]
    tree_size: Annotated[int, Field(ge=1)]
    leaf_hash: bytes
    path: tuple[bytes, ...]

    def to_json(self) -> str:
        body = {
            "v": 1,
            "log": self.log_id,
            "i": self.leaf_index,
            "n": self.tree_size,
            "leaf": _b64(self.leaf_hash),
            "path": _b64(b"".join(self.path)),
        }
        return json.dumps(body, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "InclusionProof":
        body = json.loads(text)
        if body.get("v") != 1:
            raise ValueError("unknown inclusion proof version")
        joined = _unb64(body["path"])
        if len(joined) % 32:
            raise ValueError("path length is not a multiple of 32 bytes")
        return cls(
            log_id=body["log"],
            leaf_index=body["i"],
            tree_size=body["n"],
            leaf_hash=_unb64(body["leaf"]),
            path=tuple(joined[i : i + 32] for i in range(0, len(joined), 32)),
        )


@dataclass(frozen=True)
class AppendResult:
    """Where a batch landed and the signed head that commits to it."""

    first_index: int
    count: int
    tree_head: SignedTreeHead
    duplicates: int = 0  # entries already in the log, not stored again


class MerkleLog:
    """The operator's append-only log: verify, store and commit signed entries.

    `actor_keys` maps node names to their certified Ed25519 public keys; with the log's
    key entries they give each node's key history (`governance.ledger.key_history`),
    and an entry must verify with its actor's current key. Each leaf records the log's
    integration time, and an entry whose claimed time is more than `max_skew_ms` away from
    it is refused (`TimestampSkewed`). A batch with any unknown actor, unregistered kind,
    bad signature, refused key entry or skewed time is refused whole; nothing is written.
    """

    def __init__(
        self,
        conn: "sqlite3.Connection",
        log_id: str,
        signing_key: Ed25519PrivateKey,
        actor_keys: Mapping[str, PublicKeyLike],
        *,
        max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
    ) -> None:
        apply_migrations(conn, COMPONENT, MIGRATIONS)
        self._conn = conn
        self.log_id = log_id
        row = conn.execute("SELECT DISTINCT log_id FROM ledger_tree_heads LIMIT 2").fetchall()
        if row and [r[0] for r in row] != [log_id]:
            raise ValueError(f"this store holds log {row[0][0]!r}, not {log_id!r}")
        self._key = signing_key
        self.max_skew_ms = max_skew_ms
        self._actor_keys = {name: public_key_bytes(k) for name, k in actor_keys.items()}
        self._actor_keys.setdefault(log_id, public_key_bytes(signing_key))
        self._compact = self._load_compact_range()
        self._history = self._load_key_history()
        self._last_integrated_ms = self._load_last_integrated_ms()

    # -- keys and size -------------------------------------------------------------

    @property
    def public_key_hex(self) -> str:
        return public_key_hex(self._key)

    @property
    def size(self) -> int:
        return self._compact.size

    @property
    def key_history(self) -> KeyHistory:
        """Every node's signing keys over the log's indices (a copy)."""
        return self._history.copy()

    def sync(self) -> None:
        """Catch up with entries another connection appended (e.g. a local CLI)."""
        if self._stored_size() != self._compact.size:
            self._compact = self._load_compact_range()
            self._history = self._load_key_history()
            self._last_integrated_ms = self._load_last_integrated_ms()

    def register_actor(self, name: str, public_key: PublicKeyLike) -> None:
        """Accept entries signed by `name`, whose certified key is `public_key`, from now on."""
        self._actor_keys[name] = public_key_bytes(public_key)
        self._history = self._load_key_history()

    def _load_key_history(self) -> KeyHistory:
        marks = ",".join("?" * len(KEY_KINDS))
        cursor = self._conn.execute(
            f"SELECT leaf FROM ledger_entries WHERE kind IN ({marks}) ORDER BY leaf_index",
            sorted(KEY_KINDS))
        return derive_key_history((decode_leaf(bytes(r[0])) for r in cursor), self._actor_keys)

    def _load_last_integrated_ms(self) -> int:
        row = self._conn.execute("SELECT MAX(integrated_ms) FROM ledger_entries").fetchone()
        return int(row[0] or 0)

    def _stored_size(self) -> int:
        row = self._conn.execute("SELECT COALESCE(MAX(leaf_index) + 1, 0) FROM ledger_entries")
        return int(row.fetchone()[0])

    def _load_compact_range(self) -> CompactRange:
        size = self._stored_size()
        positions = CompactRange.node_positions(size)
        hashes = [self._node(level, index) for level, index in positions]
        return CompactRange(size, hashes)

    def _node(self, level: int, index: int) -> bytes:
        row = self._conn.execute(
            "SELECT hash FROM ledger_nodes WHERE level = ? AND node_index = ?", (level, index)
        ).fetchone()
        if row is None:
            raise ProofUnavailable(f"node ({level}, {index}) missing from the store")
        return bytes(row[0])

    # -- writing -------------------------------------------------------------------

    def _checked_event_bytes(self, entry: SignedEntry) -> bytes:
        """The event's canonical bytes, once its kind and actor are checked."""
        document = entry.event.document()
        # Re-validate: model_copy(update=...) elsewhere could have skipped the guards.
        event = validate_event(document)
        if event.actor not in self._actor_keys:
            raise UnknownActor(f"no public key for actor {event.actor!r}")
        return canonical_json(document)

    def _check_skew(self, event: LogEvent, now_ms: int) -> None:
        """Measured against this batch's clock reading, not the never-backwards clock: an
        earlier batch dated ahead (a clock stepped back since) refuses no honest entry."""
        skew = event.timestamp_ms - now_ms
        if abs(skew) > self.max_skew_ms:
            raise TimestampSkewed(
                f"entry by {event.actor!r} (request {event.request_id}) claims a time "
                f"{abs(skew) // 1000} s {'ahead of' if skew > 0 else 'behind'} the log's clock "
                f"(at most {self.max_skew_ms // 1000} s)")

    def _admit(self, history: KeyHistory, index: int, entry: SignedEntry, canonical: bytes
               ) -> None:
        """Check `entry`'s signature (over its `canonical` event bytes) with its actor's
        current key; take a key entry into `history` (the batch's working copy)."""
        event = entry.event
        if event.kind in KEY_KINDS:
            problem = history.apply(index, entry)
            if problem:
                raise KeyEntryInvalid(f"{event.kind} by {event.actor!r} refused: {problem}")
            return
        key = history.current_key(event.actor)
        if key is None or not history.anchored(event.actor):
            raise UnknownActor(f"no valid signing key for actor {event.actor!r}")
        if not verify_message(key, ENTRY_PREFIX + canonical, bytes.fromhex(entry.signature)):
            raise EntrySignatureInvalid(
                f"entry by {event.actor!r} (request {event.request_id}) is not signed with "
                f"its current key")

    def _is_stored(self, entry: SignedEntry, canonical: bytes) -> bool:
        """Whether this very entry is in the log already; the same signature over another
        event is refused."""
        row = self._conn.execute(
            "SELECT leaf_index FROM ledger_signatures WHERE signature = ?", (entry.signature,)
        ).fetchone()
        if row is None:
            return False
        if decode_leaf(self.leaf(row[0])).entry.event.canonical() != canonical:
            raise EntrySignatureInvalid("a stored entry's signature over another event")
        return True

    def append(
        self, entries: Sequence[SignedEntry], *, timestamp_ms: int | None = None
    ) -> AppendResult:
        """Append a batch in one transaction and sign the new tree head; all or nothing.

        Entries already in the log (same signature) are skipped, so a retried or
        replayed batch adds nothing; `AppendResult.duplicates` counts them. `timestamp_ms`
        sets the log's clock for this batch (default: now; never more than the skew bound
        ahead of wall time); it never runs backwards.
        """
        if not entries:
            raise ValueError("empty batch")
        with write_transaction(self._conn):
            self.sync()  # another connection may have appended since we loaded
            # The log's own clock, never running backwards: it dates the batch and the head.
            wall = time.time_ns() // 1_000_000
            now = wall if timestamp_ms is None else timestamp_ms
            if now > wall + self.max_skew_ms:
                # Advancing the clock past wall time would refuse every honest entry until
                # real time catches up (one early reading freezes the log).
                raise TimestampSkewed(
                    f"the log's clock reading is {(now - wall) // 1000} s ahead of wall time "
                    f"(at most {self.max_skew_ms // 1000} s)")
            integrated = max(now, self._last_integrated_ms)
            event_bytes = [self._checked_event_bytes(entry) for entry in entries]
            history = self._history.copy()
            compact = self._compact.copy()
            first = compact.size
            fresh: list[tuple[SignedEntry, bytes]] = []
            seen: dict[str, bytes] = {}
            for entry, canonical in zip(entries, event_bytes, strict=True):
                if seen.get(entry.signature, canonical) != canonical:
                    raise EntrySignatureInvalid("one signature over two events in a batch")
                if entry.signature in seen or self._is_stored(entry, canonical):
                    continue
                # After the stored check: a retry of a stored entry is a duplicate however
                # old its claimed time, never a refusal that gets it re-signed and stored twice.
                self._check_skew(entry.event, now)
                self._admit(history, first + len(fresh), entry, canonical)
                seen[entry.signature] = canonical
                fresh.append((entry, canonical))
            if not fresh:
                return AppendResult(first_index=self._compact.size, count=0,
                                    tree_head=self.tree_head(), duplicates=len(entries))
            rows, nodes = [], []
            for offset, (entry, canonical) in enumerate(fresh):
                leaf = encode_leaf_parts(first + offset, canonical, entry.signature, integrated)
                nodes.extend(compact.append(leaf_hash(leaf)))
                event = entry.event
                rows.append(
                    (
                        first + offset,
                        leaf,
                        event.kind,
                        event.actor,
                        event.request_id,
                        event.timestamp_ms,
                        integrated,
                    )
                )
            self._conn.executemany(
                "INSERT INTO ledger_entries (leaf_index, leaf, kind, actor, request_id,"
                " timestamp_ms, integrated_ms) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            self._conn.executemany(
                "INSERT INTO ledger_signatures VALUES (?, ?)",
                [(entry.signature, first + i) for i, (entry, _) in enumerate(fresh)],
            )
            self._conn.executemany("INSERT INTO ledger_nodes VALUES (?, ?, ?)", nodes)
            head = self._store_tree_head(compact.size, compact.root(), integrated)
        self._compact = compact
        self._history = history
        self._last_integrated_ms = integrated
        return AppendResult(first_index=first, count=len(fresh), tree_head=head,
                            duplicates=len(entries) - len(fresh))

    def _store_tree_head(self, size: int, root: bytes, timestamp_ms: int | None) -> SignedTreeHead:
        now = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
        head = sign_tree_head(self.log_id, size, root, now, self._key)
        self._conn.execute(
            "INSERT OR REPLACE INTO ledger_tree_heads VALUES (?, ?, ?, ?, ?)",
            (size, self.log_id, root, now, bytes.fromhex(head.signature)),
        )
        return head

    def sign_tree_head(self, *, timestamp_ms: int | None = None) -> SignedTreeHead:
        """Sign and store a fresh head at the current size (e.g. on a timer, with no appends)."""
        with write_transaction(self._conn):
            return self._store_tree_head(self.size, self.root_at(self.size), timestamp_ms)

    # -- reading -------------------------------------------------------------------

    def tree_head(self, tree_size: int | None = None) -> SignedTreeHead:
        """The stored signed head at `tree_size` (default: the latest)."""
        if tree_size is None:
            row = self._conn.execute(
                "SELECT tree_size, log_id, root_hash, timestamp_ms, signature"
                " FROM ledger_tree_heads ORDER BY tree_size DESC LIMIT 1"
            ).fetchone()
        else:
            row = self._conn.execute(
                "SELECT tree_size, log_id, root_hash, timestamp_ms, signature"
                " FROM ledger_tree_heads WHERE tree_size = ?",
                (tree_size,),
            ).fetchone()
        if row is None:
            if tree_size in (None, 0) and self.size == 0:
                return self.sign_tree_head()
            raise ProofUnavailable(f"no signed tree head at size {tree_size}")
        return SignedTreeHead(
            tree_size=row[0],
            log_id=row[1],
            root_hash=bytes(row[2]).hex(),
            timestamp_ms=row[3],
            signature=bytes(row[4]).hex(),
        )

    def tree_heads(self) -> list[SignedTreeHead]:
        """Every stored head, oldest first (checkpoints for `verify_log`)."""
        sizes = [r[0] for r in self._conn.execute("SELECT tree_size FROM ledger_tree_heads")]
        return [self.tree_head(size) for size in sorted(sizes)]

    def leaf(self, index: int) -> bytes:
        row = self._conn.execute(
            "SELECT leaf FROM ledger_entries WHERE leaf_index = ?", (index,)
        ).fetchone()
        if row is None:
            raise ProofUnavailable(f"no entry at index {index}")
        return bytes(row[0])

    def index_of(self, signature: str) -> int:
        """The index of the entry carrying `signature` (an entry is stored once)."""
        row = self._conn.execute(
            "SELECT leaf_index FROM ledger_signatures WHERE signature = ?", (signature,)
        ).fetchone()
        if row is None:
            raise ProofUnavailable("no entry with that signature")
        return int(row[0])

    def leaves(self, start: int = 0, end: int | None = None) -> list[bytes]:
        """Stored leaf bytes of [start, end), the input of `verify_log`."""
        end = self.size if end is None else end
        cursor = self._conn.execute(
            "SELECT leaf FROM ledger_entries WHERE leaf_index >= ? AND leaf_index < ?"
            " ORDER BY leaf_index",
            (start, end),
        )
        return [bytes(row[0]) for row in cursor]

    def entries(
        self,
        kind: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
    ) -> Iterator[LogEntry]:
        """Decoded entries in log order, optionally of one kind integrated within
        [since_ms, until_ms) (format-1 leaves: by their claimed time)."""
        clauses, params = [], []
        for clause, value in (
            ("kind = ?", kind),
            ("COALESCE(integrated_ms, timestamp_ms) >= ?", since_ms),
            ("COALESCE(integrated_ms, timestamp_ms) < ?", until_ms),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        cursor = self._conn.execute(
            f"SELECT leaf FROM ledger_entries{where} ORDER BY leaf_index", params
        )
        for row in cursor:
            yield decode_leaf(bytes(row[0]))

    # -- proofs --------------------------------------------------------------------

    def _subtree(self, start: int, end: int) -> bytes:
        return subtree_hash_from_nodes(self._node)(start, end)

    def root_at(self, tree_size: int) -> bytes:
        """Merkle tree hash of the first `tree_size` entries."""
        if not 0 <= tree_size <= self.size:
            raise ProofUnavailable(f"tree size {tree_size} outside 0..{self.size}")
        return EMPTY_ROOT if tree_size == 0 else self._subtree(0, tree_size)

    def inclusion_proof(self, index: int, tree_size: int | None = None) -> InclusionProof:
        """Audit path of entry `index` in the tree of `tree_size` entries (default: all)."""
        tree_size = self.size if tree_size is None else tree_size
        if not 0 <= index < tree_size <= self.size:
            raise ProofUnavailable(f"no entry {index} in a tree of size {tree_size}")
        path = inclusion_path(index, tree_size, self._subtree)
        return InclusionProof(
            log_id=self.log_id,
            leaf_index=index,
            tree_size=tree_size,
            leaf_hash=self._node(0, index),
            path=tuple(path),
        )

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """Proof that the tree of `old_size` entries is a prefix of the one of `new_size`."""
        new_size = self.size if new_size is None else new_size
        if not 0 <= old_size <= new_size <= self.size:
            raise ProofUnavailable(f"no consistency proof from {old_size} to {new_size}")
        return consistency_path(old_size, new_size, self._subtree)
