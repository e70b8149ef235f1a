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
    ProofUnavailable,
    UnknownActor,
)
from governance.ledger.events import (
    ENTRY_PREFIX,
    LogEntry,
    SignedEntry,
    decode_leaf,
    encode_leaf_parts,
    validate_event,
)
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
)


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

    `actor_keys` maps node names to the Ed25519 public keys their entries must
    verify with; a batch with any unknown actor, unregistered kind or bad
    signature is refused whole and nothing is written.
    """

    def __init__(
        self,
        conn: "sqlite3.Connection",
        log_id: str,
        signing_key: Ed25519PrivateKey,
        actor_keys: Mapping[str, PublicKeyLike],
    ) -> None:
        apply_migrations(conn, COMPONENT, MIGRATIONS)
        self._conn = conn
        self.log_id = log_id
        row = conn.execute("SELECT DISTINCT log_id FROM ledger_tree_heads LIMIT 2").fetchall()
        if row and [r[0] for r in row] != [log_id]:
            raise ValueError(f"this store holds log {row[0][0]!r}, not {log_id!r}")
        self._key = signing_key
        self._actor_keys = {name: public_key_bytes(k) for name, k in actor_keys.items()}
        self._actor_keys.setdefault(log_id, public_key_bytes(signing_key))
        self._compact = self._load_compact_range()

    # -- keys and size -------------------------------------------------------------

    @property
    def public_key_hex(self) -> str:
        return public_key_hex(self._key)

    @property
    def size(self) -> int:
        return self._compact.size

    def sync(self) -> None:
        """Catch up with entries another connection appended (e.g. a local CLI)."""
        if self._stored_size() != self._compact.size:
            self._compact = self._load_compact_range()

    def register_actor(self, name: str, public_key: PublicKeyLike) -> None:
        """Accept entries signed by `name` with `public_key` from now on."""
        self._actor_keys[name] = public_key_bytes(public_key)

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
        """The event's canonical bytes, once its kind, actor and signature are checked."""
        document = entry.event.document()
        # Re-validate: model_copy(update=...) elsewhere could have skipped the guards.
        event = validate_event(document)
        key = self._actor_keys.get(event.actor)
        if key is None:
            raise UnknownActor(f"no public key for actor {event.actor!r}")
        canonical = canonical_json(document)
        message = ENTRY_PREFIX + canonical
        if not verify_message(key, message, bytes.fromhex(entry.signature)):
            raise EntrySignatureInvalid(
                f"entry by {event.actor!r} (request {event.request_id}) has a bad signature"
            )
        return canonical

    def append(
        self, entries: Sequence[SignedEntry], *, timestamp_ms: int | None = None
    ) -> AppendResult:
        """Append a batch in one transaction and sign the new tree head; all or nothing.

        Entries already in the log (same signature) are skipped, so a retried or
        replayed batch adds nothing; `AppendResult.duplicates` counts them.
        """
        if not entries:
            raise ValueError("empty batch")
        event_bytes = [self._checked_event_bytes(entry) for entry in entries]
        with write_transaction(self._conn):
            self.sync()  # another connection may have appended since we loaded
            fresh, seen = [], set()
            for entry, canonical in zip(entries, event_bytes, strict=True):
                if entry.signature in seen or self._conn.execute(
                    "SELECT 1 FROM ledger_signatures WHERE signature = ?", (entry.signature,)
                ).fetchone():
                    continue
                seen.add(entry.signature)
                fresh.append((entry, canonical))
            if not fresh:
                return AppendResult(first_index=self._compact.size, count=0,
                                    tree_head=self.tree_head(), duplicates=len(entries))
            compact = self._compact.copy()
            first = compact.size
            rows, nodes = [], []
            for offset, (entry, canonical) in enumerate(fresh):
                leaf = encode_leaf_parts(first + offset, canonical, entry.signature)
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
                    )
                )
            self._conn.executemany("INSERT INTO ledger_entries VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._conn.executemany(
                "INSERT INTO ledger_signatures VALUES (?, ?)",
                [(entry.signature, first + i) for i, (entry, _) in enumerate(fresh)],
            )
            self._conn.executemany("INSERT INTO ledger_nodes VALUES (?, ?, ?)", nodes)
            head = self._store_tree_head(compact.size, compact.root(), timestamp_ms)
        self._compact = compact
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
        """Decoded entries in log order, optionally of one kind within [since_ms, until_ms)."""
        clauses, params = [], []
        for clause, value in (
            ("kind = ?", kind),
            ("timestamp_ms >= ?", since_ms),
            ("timestamp_ms < ?", until_ms),
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
