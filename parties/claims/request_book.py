"""The regulator's book of claim requests: idempotency, deduplication, quota reservations,
metering.

One row per request id. A retry with the same id and the same body is answered from the
stored answer and not billed again; the same id for another body is refused. An identical
check under a new request id (the same question: contract, mode, K, HE context and every
claim's tags, `parties.claims.fingerprints.check_key`) is answered with the stored bytes of
the first answer: nothing is computed, charged to the check budget or billed, so asking a
claim again yields the same verdict and nothing more. The stored answer opens only with the
reply key the insurer derived for that question. The quota a
request reserved (`ContractBook.authorize`) is given back when it is refused or fails, and
at start for requests that died with the previous process. An answer is kept, and
released, only once its meter is in the log: the signed meter is noted first
(`metering`), so a request that died between the log and the book is known at start
(`release_dead`) and its meter voided.
"""

import sqlite3
import threading
import time

from parties.claims.api import RequestIdReused, RequestInProgress
from parties.runtime.context import NodeContext

RESPONSE_RETENTION_S = 3600  # stored answers for retried request ids

COMPONENT = "claims_product"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE claim_requests (
        request_id TEXT PRIMARY KEY,
        insurer TEXT NOT NULL,
        contract_id TEXT NOT NULL,
        digest TEXT NOT NULL,
        mode TEXT NOT NULL,
        claims INTEGER NOT NULL,
        status TEXT NOT NULL,          -- pending | answered | failed | refused
        usage_id INTEGER,              -- the contract quota reservation
        meter TEXT,                    -- the signed meter entry (JSON), noted before appending
        logged INTEGER NOT NULL DEFAULT 0, -- 1 once the meter is in the log
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE claim_responses (      -- stored answers, for retries (purged after an hour)
        request_id TEXT PRIMARY KEY REFERENCES claim_requests (request_id),
        response BLOB NOT NULL,
        stored_at REAL NOT NULL
    );
    CREATE INDEX claim_responses_by_age ON claim_responses (stored_at)
    """,
    """
    ALTER TABLE claim_requests ADD COLUMN same_as TEXT;  -- deduplicated: whose answer it got
    CREATE TABLE claim_checks (          -- answered questions, for deduplication
        insurer TEXT NOT NULL,
        check_key TEXT NOT NULL,
        request_id TEXT NOT NULL,        -- the request whose stored answer it is
        answered_at REAL NOT NULL,
        PRIMARY KEY (insurer, check_key)
    );
    CREATE INDEX claim_checks_by_age ON claim_checks (answered_at)
    """,
)


class RequestBook:
    """The regulator's table of claim requests (one row per request id)."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.in_flight: set[str] = set()
        self.lock = threading.Lock()
        self.purged_at = 0.0

    def _conn(self) -> sqlite3.Connection:
        return self.ctx.store.conn

    def begin(self, rid: str, insurer: str, contract_id: str, digest: str, mode: str,
              claims: int) -> tuple[str, bytes | None]:
        """('new', None) | ('answered', the stored response)."""
        now = time.time()
        with self.lock:
            if rid in self.in_flight:
                raise RequestInProgress(f"request {rid} is being answered")
            with self.ctx.store.lock, self._conn() as conn:
                row = conn.execute(
                    "SELECT r.insurer, r.digest, r.status, a.response, r.usage_id"
                    " FROM claim_requests r LEFT JOIN claim_responses a"
                    " ON a.request_id = COALESCE(r.same_as, r.request_id)"
                    " WHERE r.request_id = ?", (rid,)).fetchone()
                if row is not None:
                    if row[0] != insurer or row[1] != digest:
                        raise RequestIdReused(
                            f"request id {rid} was used for another request; use a fresh id")
                    if row[2] == "answered" and row[3] is not None:
                        return "answered", bytes(row[3])
                    if row[4] is not None:  # a crashed attempt's reservation
                        _release_usage(conn, int(row[4]))
                conn.execute(
                    "INSERT OR REPLACE INTO claim_requests (request_id, insurer, contract_id,"
                    " digest, mode, claims, status, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                    (rid, insurer, contract_id, digest, mode, claims, now, now))
                if now - self.purged_at > 60:
                    conn.execute("DELETE FROM claim_responses WHERE stored_at < ?",
                                 (now - RESPONSE_RETENTION_S,))
                    conn.execute("DELETE FROM claim_checks WHERE answered_at < ?",
                                 (now - RESPONSE_RETENTION_S,))
                    self.purged_at = now
            self.in_flight.add(rid)
        return "new", None

    def reserved(self, rid: str, usage_id: int) -> None:
        with self.ctx.store.lock, self._conn() as conn:
            conn.execute("UPDATE claim_requests SET usage_id = ? WHERE request_id = ?",
                         (usage_id, rid))

    def metering(self, rid: str, meter_entry: str) -> None:
        """Note the signed meter about to be appended (before it is: see `release_dead`)."""
        with self.ctx.store.lock, self._conn() as conn:
            conn.execute("UPDATE claim_requests SET meter = ? WHERE request_id = ?",
                         (meter_entry, rid))

    def answered(self, rid: str, response: bytes, check_key: str) -> None:
        """Keep the answer, its meter being in the log: for retries of `rid`, and for any
        later request that asks the same question (`check_key`)."""
        with self.ctx.store.lock, self._conn() as conn:
            now = time.time()
            conn.execute(
                "UPDATE claim_requests SET status = 'answered', logged = 1, updated_at = ?"
                " WHERE request_id = ?", (now, rid))
            conn.execute("INSERT OR REPLACE INTO claim_responses VALUES (?, ?, ?)",
                         (rid, response, now))
            conn.execute(
                "INSERT OR REPLACE INTO claim_checks (insurer, check_key, request_id,"
                " answered_at) SELECT insurer, ?, request_id, ? FROM claim_requests"
                " WHERE request_id = ?", (check_key, now, rid))
        self._done(rid)

    def stored_check(self, insurer: str, check_key: str) -> tuple[str, bytes] | None:
        """(request id, answer) of the request that answered this question, if still kept."""
        with self.ctx.store.lock:
            row = self._conn().execute(
                "SELECT c.request_id, a.response FROM claim_checks c JOIN claim_responses a"
                " ON a.request_id = c.request_id WHERE c.insurer = ? AND c.check_key = ?",
                (insurer, check_key)).fetchone()
        return None if row is None else (row[0], bytes(row[1]))

    def deduplicated(self, rid: str, answered_by: str) -> None:
        """`rid` asked a question already answered: it gets that answer, gives back its quota
        reservation and is neither metered nor charged (nothing was computed)."""
        with self.ctx.store.lock, self._conn() as conn:
            _release_reservation(conn, rid)
            conn.execute(
                "UPDATE claim_requests SET status = 'answered', usage_id = NULL, same_as = ?,"
                " logged = 1, updated_at = ? WHERE request_id = ?",
                (answered_by, time.time(), rid))
        self._done(rid)

    def failed(self, rid: str, status: str) -> None:
        """Give back the quota reservation: a refused or failed request costs nothing."""
        with self.ctx.store.lock, self._conn() as conn:
            _release_reservation(conn, rid)
            conn.execute(
                "UPDATE claim_requests SET status = ?, usage_id = NULL, meter = NULL,"
                " updated_at = ? WHERE request_id = ?", (status, time.time(), rid))
        self._done(rid)

    def _done(self, rid: str) -> None:
        with self.lock:
            self.in_flight.discard(rid)

    def release_dead(self) -> tuple[int, list[str]]:
        """At start, before serving: requests left pending died with the last process; give
        back their quota reservations. Returns how many, and the signed meters of those
        that died with a meter on its way to the log: their answers never left, so the
        meters, if they landed, are to be voided."""
        with self.ctx.store.lock, self._conn() as conn:
            dead = conn.execute(
                "SELECT request_id, usage_id, meter FROM claim_requests"
                " WHERE status = 'pending'").fetchall()
            for _, usage_id, _ in dead:
                if usage_id is not None:
                    _release_usage(conn, int(usage_id))
            conn.execute("UPDATE claim_requests SET status = 'failed', usage_id = NULL,"
                         " meter = NULL WHERE status = 'pending'")
        return len(dead), [meter for _, _, meter in dead if meter is not None]


def _release_reservation(conn: sqlite3.Connection, rid: str) -> None:
    """Give back the quota that request `rid` reserved, if it still holds any."""
    row = conn.execute("SELECT usage_id FROM claim_requests WHERE request_id = ?",
                       (rid,)).fetchone()
    if row is not None and row[0] is not None:
        _release_usage(conn, int(row[0]))


def _release_usage(conn: sqlite3.Connection, usage_id: int) -> None:
    # Drop the reservation row `ContractBook.authorize` made, inside the caller's
    # transaction, so the request's status and its quota change together.
    conn.execute("DELETE FROM contract_usage WHERE usage_id = ?", (usage_id,))


def request_book(ctx: NodeContext) -> RequestBook:
    return ctx.component(RequestBook)


