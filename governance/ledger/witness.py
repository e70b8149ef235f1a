"""Witnesses (regulator, health authority) that countersign the log's tree heads.

A witness remembers every head it cosigned. Shown a newer head with a
consistency proof from the latest one it holds, it checks the proof and
countersigns; a head that contradicts its memory (same size with another
root, a failed consistency proof, time running backwards) is recorded as an
incident with its evidence and refused with `LogInconsistent`. This is what
turns a silent rewrite into evidence.

A log that shows each witness its own consistent history (a split view) passes
both witnesses' checks. Witnesses therefore gossip: each fetches a fellow
witness's latest cosigned head and checks that it and its own latest head are
one history (equal roots at one size, else a consistency proof from the log
between the two). A log that forked cannot produce that proof; the failure is
recorded as an incident with both cosigned heads as evidence.
"""

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict

from governance.ledger.errors import LogInconsistent, StaleTreeHead, TreeHeadInvalid
from governance.ledger.merkle import verify_consistency
from governance.ledger.signing import PublicKeyLike, public_key_bytes, public_key_hex
from governance.ledger.transactions import write_transaction
from governance.ledger.tree_head import Cosignature, SignedTreeHead, cosign_tree_head
from governance.migrations import apply_migrations

if TYPE_CHECKING:
    import sqlite3  # annotations only: the caller opens the connection

COMPONENT = "ledger_witness"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE witness_heads (
        log_id TEXT NOT NULL,
        tree_size INTEGER NOT NULL,
        root_hash TEXT NOT NULL,
        timestamp_ms INTEGER NOT NULL,
        tree_head TEXT NOT NULL,
        cosignature TEXT NOT NULL,
        PRIMARY KEY (log_id, tree_size)
    );
    CREATE TABLE witness_incidents (
        incident_id INTEGER PRIMARY KEY AUTOINCREMENT,
        log_id TEXT NOT NULL,
        detected_at_ms INTEGER NOT NULL,
        reason TEXT NOT NULL,
        evidence TEXT NOT NULL
    );
    """,
)


class WitnessedHead(BaseModel):
    """A witness's latest cosigned head: what it shows fellow witnesses when they gossip."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    head: SignedTreeHead
    cosignature: Cosignature


class Witness:
    """Checks and countersigns tree heads of the logs it watches, remembering each."""

    def __init__(
        self,
        conn: "sqlite3.Connection",
        name: str,
        signing_key: Ed25519PrivateKey,
        log_keys: Mapping[str, PublicKeyLike],
    ) -> None:
        apply_migrations(conn, COMPONENT, MIGRATIONS)
        self._conn = conn
        self.name = name
        self._key = signing_key
        self._log_keys = {log_id: public_key_bytes(k) for log_id, k in log_keys.items()}

    @property
    def public_key_hex(self) -> str:
        return public_key_hex(self._key)

    def latest(self, log_id: str) -> SignedTreeHead | None:
        """The largest head of `log_id` this witness cosigned, if any."""
        row = self._conn.execute(
            "SELECT tree_head FROM witness_heads WHERE log_id = ? ORDER BY tree_size DESC LIMIT 1",
            (log_id,),
        ).fetchone()
        return None if row is None else SignedTreeHead.model_validate_json(row[0])

    def witnessed(self, log_id: str) -> WitnessedHead | None:
        """The largest head of `log_id` this witness cosigned, with its cosignature."""
        row = self._conn.execute(
            "SELECT tree_head, cosignature FROM witness_heads WHERE log_id = ?"
            " ORDER BY tree_size DESC LIMIT 1",
            (log_id,),
        ).fetchone()
        if row is None:
            return None
        return WitnessedHead(
            head=SignedTreeHead.model_validate_json(row[0]),
            cosignature=Cosignature.model_validate_json(row[1]),
        )

    def compare_with_peer(
        self,
        peer: str,
        peer_key: PublicKeyLike,
        shown: WitnessedHead,
        consistency_proof: Callable[[int, int], Sequence[bytes]],
        *,
        now_ms: int | None = None,
    ) -> None:
        """Check that fellow witness `peer` saw the same log as this one (gossip).

        `shown` is the peer's latest cosigned head; `consistency_proof(first, second)`
        asks the log for a proof between the two heads' sizes when they differ. A
        split view is recorded as an incident and raised as `LogInconsistent`; a
        head or cosignature that does not verify is refused with `TreeHeadInvalid`.
        """
        head, cosignature = shown.head, shown.cosignature
        log_key = self._log_keys.get(head.log_id)
        if log_key is None:
            raise TreeHeadInvalid(f"witness {self.name} does not watch log {head.log_id!r}")
        if not (
            head.signature_valid(log_key)
            and cosignature.witness == peer
            and cosignature.covers(head)
            and cosignature.signature_valid(peer_key)
        ):
            raise TreeHeadInvalid(f"{peer}'s witnessed head does not verify")
        mine = self.latest(head.log_id)
        if mine is None:
            return
        small, large = sorted((mine, head), key=lambda h: h.tree_size)
        if small.tree_size == large.tree_size:
            if small.root_hash == large.root_hash:
                return
            reason, proof = f"split view: {peer} cosigned another root for one tree size", []
        elif small.tree_size == 0:
            return  # every tree extends the empty one
        else:
            proof = list(consistency_proof(small.tree_size, large.tree_size))
            if verify_consistency(small.tree_size, large.tree_size, small.root, large.root, proof):
                return
            reason = f"split view: {peer}'s head and this witness's are not one history"
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        evidence = {
            "witnessed": mine.model_dump(mode="json"),
            "shown": head.model_dump(mode="json"),
            "peer_cosignature": cosignature.model_dump(mode="json"),
            "proof": [bytes(p).hex() for p in proof],
        }
        with write_transaction(self._conn):
            self._record_incident(head.log_id, now_ms, reason, evidence)
        raise LogInconsistent(
            f"{reason} (witnessed size {mine.tree_size} root {mine.root_hash[:16]}..., "
            f"{peer} size {head.tree_size} root {head.root_hash[:16]}...)"
        )

    def incidents(self, log_id: str | None = None) -> list[dict]:
        """Recorded inconsistencies, oldest first."""
        cursor = self._conn.execute(
            "SELECT incident_id, log_id, detected_at_ms, reason, evidence"
            " FROM witness_incidents WHERE ? IS NULL OR log_id = ? ORDER BY incident_id",
            (log_id, log_id),
        )
        return [
            {
                "incident_id": r[0],
                "log_id": r[1],
                "detected_at_ms": r[2],
                "reason": r[3],
                "evidence": json.loads(r[4]),
            }
            for r in cursor
        ]

    def cosign(
        self,
        head: SignedTreeHead,
        consistency_proof: Sequence[bytes] = (),
        *,
        now_ms: int | None = None,
    ) -> Cosignature:
        """Countersign `head` given a consistency proof from the latest head witnessed."""
        log_key = self._log_keys.get(head.log_id)
        if log_key is None:
            raise TreeHeadInvalid(f"witness {self.name} does not watch log {head.log_id!r}")
        if not head.signature_valid(log_key):
            raise TreeHeadInvalid(f"tree head of size {head.tree_size} has a bad signature")
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        with write_transaction(self._conn):
            stored = self._conn.execute(
                "SELECT tree_head, cosignature FROM witness_heads"
                " WHERE log_id = ? AND tree_size = ?",
                (head.log_id, head.tree_size),
            ).fetchone()
            if stored is not None:
                seen = SignedTreeHead.model_validate_json(stored[0])
                if seen.root_hash == head.root_hash:
                    return Cosignature.model_validate_json(stored[1])
                problem = _Problem("two roots for one tree size", seen)
            else:
                problem = self._problem_with(head, consistency_proof)
            if problem is None:
                cosignature = cosign_tree_head(head, self.name, now_ms, self._key)
                self._conn.execute(
                    "INSERT INTO witness_heads VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        head.log_id,
                        head.tree_size,
                        head.root_hash,
                        head.timestamp_ms,
                        head.model_dump_json(),
                        cosignature.model_dump_json(),
                    ),
                )
                return cosignature
            # The incident is committed with this transaction; the head is not stored.
            evidence = {
                "witnessed": problem.seen.model_dump(mode="json"),
                "shown": head.model_dump(mode="json"),
                "proof": [bytes(p).hex() for p in consistency_proof],
            }
            self._record_incident(head.log_id, now_ms, problem.reason, evidence)
        raise LogInconsistent(
            f"{problem.reason} (witnessed size {problem.seen.tree_size} root "
            f"{problem.seen.root_hash[:16]}..., shown size {head.tree_size} root "
            f"{head.root_hash[:16]}...)"
        )

    def _record_incident(self, log_id: str, now_ms: int, reason: str, evidence: dict) -> None:
        self._conn.execute(
            "INSERT INTO witness_incidents (log_id, detected_at_ms, reason, evidence)"
            " VALUES (?, ?, ?, ?)",
            (log_id, now_ms, reason, json.dumps(evidence, sort_keys=True)),
        )

    def _problem_with(self, head: SignedTreeHead, proof: Sequence[bytes]) -> "_Problem | None":
        latest = self.latest(head.log_id)
        if latest is None:
            return None  # first head seen: trust on first use
        if head.tree_size < latest.tree_size:
            raise StaleTreeHead(
                f"head of size {head.tree_size} is older than the witnessed {latest.tree_size}"
            )
        if latest.tree_size == 0:
            return None  # every tree extends the empty one; RFC 9162 has no proof for it
        if head.tree_size > latest.tree_size and not proof:
            raise TreeHeadInvalid(
                f"a consistency proof from size {latest.tree_size} to {head.tree_size} is required"
            )
        if head.timestamp_ms < latest.timestamp_ms:
            return _Problem("tree head timestamp went backwards", latest)
        if not verify_consistency(
            latest.tree_size, head.tree_size, latest.root, head.root, list(proof)
        ):
            return _Problem("consistency proof fails: the log was rewritten or forked", latest)
        return None


class _Problem(NamedTuple):
    reason: str
    seen: SignedTreeHead
