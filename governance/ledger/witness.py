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

A smaller head is checked too: it must be a prefix of the witnessed history (a
consistency proof from it to the latest head), or it is a fork and an incident. A
head whose timestamp runs ahead of the witness's clock by more than
`MAX_CLOCK_AHEAD_MS` is refused and recorded, so one far-future head cannot make
every honest head after it look as if time ran backwards. The same inconsistency
seen again (the loop polls every few seconds) counts up one incident instead of
adding rows; incidents stay open until the witness's administrator clears them.
"""

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict

from governance.ledger.checkpoint import checkpoint_text, cosign_line, origin_of
from governance.ledger.errors import (
    LogInconsistent,
    ProofUnavailable,
    StaleTreeHead,
    TreeHeadInvalid,
)
from governance.ledger.merkle import EMPTY_ROOT, verify_consistency
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
    # Deduplicated incidents: one row per distinct inconsistency, counted, open until
    # cleared by the witness's administrator.
    """
    ALTER TABLE witness_incidents ADD COLUMN fingerprint TEXT;
    ALTER TABLE witness_incidents ADD COLUMN last_seen_ms INTEGER;
    ALTER TABLE witness_incidents ADD COLUMN seen INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE witness_incidents ADD COLUMN cleared_at_ms INTEGER;
    CREATE UNIQUE INDEX witness_incident_fingerprint ON witness_incidents (fingerprint);
    UPDATE witness_incidents SET last_seen_ms = detected_at_ms;
    """,
)
MAX_CLOCK_AHEAD_MS = 60_000


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
        asks the log for a proof between the two heads' sizes when they differ (it raises
        `ProofUnavailable` when the log answers without one). A split view, or a log that
        will not prove two cosigned heads one history, is recorded as an incident and
        raised as `LogInconsistent`; a head or cosignature that does not verify is refused
        with `TreeHeadInvalid`.
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
            try:
                proof = list(consistency_proof(small.tree_size, large.tree_size))
            except ProofUnavailable:  # an honest log can always prove two heads it signed
                proof, reason = [], f"the log will not prove {peer}'s head and this one's"
            else:
                if verify_consistency(small.tree_size, large.tree_size, small.root,
                                      large.root, proof):
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

    def incidents(self, log_id: str | None = None, *, open_only: bool = False) -> list[dict]:
        """Recorded inconsistencies, oldest first (each distinct one once, with its count)."""
        cursor = self._conn.execute(
            "SELECT incident_id, log_id, detected_at_ms, last_seen_ms, seen, reason, evidence,"
            " cleared_at_ms FROM witness_incidents WHERE (? IS NULL OR log_id = ?)"
            " AND (? = 0 OR cleared_at_ms IS NULL) ORDER BY incident_id",
            (log_id, log_id, int(open_only)),
        )
        return [
            {
                "incident_id": r[0],
                "log_id": r[1],
                "detected_at_ms": r[2],
                "last_seen_ms": r[3],
                "seen": r[4],
                "reason": r[5],
                "evidence": json.loads(r[6]),
                "cleared_at_ms": r[7],
            }
            for r in cursor
        ]

    def refuse_unproven(self, head: SignedTreeHead, *, now_ms: int | None = None) -> None:
        """The log showed `head`, larger than the witnessed one, and would not prove it
        extends it: recorded as an incident and raised as `LogInconsistent`."""
        log_key = self._log_keys.get(head.log_id)
        if log_key is None or not head.signature_valid(log_key):
            raise TreeHeadInvalid(f"tree head of size {head.tree_size} does not verify")
        latest = self.latest(head.log_id)
        if latest is None or latest.tree_size >= head.tree_size:
            raise TreeHeadInvalid("only a larger head than the witnessed one needs its proof")
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        reason = "the log will not prove its head extends the witnessed one"
        with write_transaction(self._conn):
            self._record_incident(head.log_id, now_ms, reason, {
                "witnessed": latest.model_dump(mode="json"),
                "shown": head.model_dump(mode="json"), "proof": []})
        raise LogInconsistent(f"{reason} (witnessed size {latest.tree_size}, shown size "
                              f"{head.tree_size})")

    def clear_incidents(self, *, now_ms: int | None = None) -> int:
        """Close every open incident (the administrator has dealt with them); how many."""
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        with write_transaction(self._conn):
            return self._conn.execute(
                "UPDATE witness_incidents SET cleared_at_ms = ? WHERE cleared_at_ms IS NULL",
                (now_ms,),
            ).rowcount

    def cosign(
        self,
        head: SignedTreeHead,
        consistency_proof: Sequence[bytes] = (),
        *,
        now_ms: int | None = None,
    ) -> Cosignature:
        """Countersign `head` given a consistency proof from the latest head witnessed (for
        a head smaller than that one, a proof from it to the latest: it is then stale)."""
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
                problem = self._problem_with(head, consistency_proof, now_ms)
            if problem is None:
                text = checkpoint_text(origin_of(head.log_id, log_key), head.tree_size, head.root)
                cosignature = cosign_tree_head(head, self.name, now_ms, self._key).model_copy(
                    update={"checkpoint_cosignature": cosign_line(
                        text, self.name, self._key, now_ms // 1000)})
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
        """One row per distinct inconsistency (what was shown against what was witnessed,
        whatever proof came with it); seeing it again counts up and reopens it."""
        document = json.dumps(evidence, sort_keys=True)
        # the heads by size and root: a log re-signing one head at ever new times (or with
        # ever new proofs) repeats one incident, it does not add rows
        heads = {k: (v["tree_size"], v["root_hash"]) if "root_hash" in v else v
                 for k, v in evidence.items() if k != "proof"}
        fingerprint = hashlib.sha256(
            json.dumps([log_id, reason, heads], sort_keys=True).encode()).hexdigest()
        self._conn.execute(
            "INSERT INTO witness_incidents (log_id, detected_at_ms, reason, evidence,"
            " fingerprint, last_seen_ms) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (fingerprint) DO UPDATE SET seen = seen + 1,"
            " last_seen_ms = excluded.last_seen_ms, cleared_at_ms = NULL",
            (log_id, now_ms, reason, document, fingerprint, now_ms),
        )

    def _problem_with(
        self, head: SignedTreeHead, proof: Sequence[bytes], now_ms: int
    ) -> "_Problem | None":
        latest = self.latest(head.log_id)
        if head.timestamp_ms > now_ms + MAX_CLOCK_AHEAD_MS:
            return _Problem("tree head timestamp is ahead of the witness's clock",
                            latest or head)
        if latest is None:
            return None  # first head seen: trust on first use
        if head.tree_size < latest.tree_size:
            return self._smaller(head, latest, proof)
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


    @staticmethod
    def _smaller(head: SignedTreeHead, latest: SignedTreeHead, proof: Sequence[bytes]
                 ) -> "_Problem":
        """A head older than the witnessed one: stale if it is a prefix of the witnessed
        history (proof from it to the latest head), else a fork."""
        # An honest log's head never shrinks, and it can always prove the old one a prefix
        # of the new: a smaller head without that proof is evidence too.
        if head.tree_size == 0:
            consistent = head.root == EMPTY_ROOT
        else:
            consistent = bool(proof) and verify_consistency(
                head.tree_size, latest.tree_size, head.root, latest.root, list(proof))
        if not consistent:
            return _Problem("a smaller head is not a prefix of the witnessed history", latest)
        if head.timestamp_ms > latest.timestamp_ms:  # signed after the larger one: shrunk
            return _Problem("the log signed a smaller head after a larger one", latest)
        raise StaleTreeHead(
            f"head of size {head.tree_size} is older than the witnessed {latest.tree_size}"
        )


class _Problem(NamedTuple):
    reason: str
    seen: SignedTreeHead
