"""Log entries a node owes the log: kept, signed, while the log cannot take them.

An entry that must reach the log but gates nothing (a refusal, the note that an answer
was withheld) is appended with `append_or_defer`: when the log is unavailable (the
operator unreachable, too slow, or failing) the signed entry is kept in this node's store,
and `complete_deferred`, run every `RETRY_S` by the node, appends the kept entries in
order once the log is back. Appends are idempotent (the log stores an entry once, by its
signature), so a retry after a lost response stores nothing twice.

The log refuses an entry dated further from its clock than its skew bound; a kept entry
that outlived it is signed again, dated now, with its original time in the payload
(`deferred_from_ms`), so a long outage loses no entry. (The log never held the first
signature, so nothing is stored twice.)

An entry still deferred `bound_s()` seconds after it was made raises an incident, once:
recorded in this node's store (`incident_at`) and its node log
(`log_deferral_incident`), so an operator and an auditor see that the log is behind.
Entries that gate a release (the meter of an answer) are never deferred: the answer
waits for its entry, or is withheld (`parties.claims.service`).
"""

import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from governance.ledger import SignedEntry, make_event, sign_event
from governance.ledger.errors import TimestampSkewed
from parties.ledger.client import append_signed, signed_entry
from parties.runtime.context import NodeContext
from parties.runtime.errors import NodeUnavailable, RemoteError

COMPONENT = "ledger_deferred"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE ledger_deferred (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        entry TEXT NOT NULL,               -- the signed entry (JSON), appended as is
        deferred_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 1,
        last_error TEXT NOT NULL,
        incident_at REAL                   -- set once the entry outlived the bound
    )
    """,
)
BOUND_ENV = "COGOV_LOG_DEFERRAL_BOUND_S"
DEFAULT_BOUND_S = 300.0
RETRY_S = 1.0


def bound_s() -> float:
    """How long an entry may stay deferred before it raises an incident ($COGOV_LOG_
    DEFERRAL_BOUND_S, else five minutes)."""
    return float(os.environ.get(BOUND_ENV) or DEFAULT_BOUND_S)


def log_unavailable(exc: Exception) -> bool:
    """Whether an append failed because the log could not take it (worth retrying), as
    opposed to the log refusing the entry (a 4xx: retrying would not help)."""
    if isinstance(exc, RemoteError):
        return exc.http_status >= 500
    return isinstance(exc, NodeUnavailable | sqlite3.OperationalError)


@dataclass(frozen=True)
class Completed:
    appended: int
    pending: int
    incidents: int  # raised by this pass


def defer(ctx: NodeContext, entry: SignedEntry, reason: str) -> None:
    """Keep `entry` for `complete_deferred` (`reason`: why it is not appended now)."""
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute(
            "INSERT INTO ledger_deferred (kind, entry, deferred_at, last_error)"
            " VALUES (?, ?, ?, ?)",
            (entry.event.kind, entry.model_dump_json(), time.time(), reason))
    ctx.log.event("log_entry_deferred", kind=entry.event.kind, error=reason,
                  request_id=entry.event.request_id)


def append_or_defer(ctx: NodeContext, kind: str, payload: dict[str, Any]) -> bool:
    """Append a signed entry of `kind` now, or keep it for later; True when appended."""
    entry = signed_entry(ctx, kind, payload)
    try:
        append_signed(ctx, entry)
    except Exception as exc:
        if not log_unavailable(exc):
            raise
        defer(ctx, entry, type(exc).__name__)
        return False
    return True


def complete_deferred(ctx: NodeContext, now: float | None = None) -> Completed:
    """Append the kept entries in order, up to the first the log still cannot take; raise
    an incident for each entry left deferred beyond the bound."""
    with ctx.store.lock:
        rows = ctx.store.conn.execute(
            "SELECT seq, entry FROM ledger_deferred ORDER BY seq").fetchall()
    appended = 0
    for seq, document in rows:
        entry = SignedEntry.model_validate_json(document)
        try:
            _append_kept(ctx, entry)
        except Exception as exc:
            if log_unavailable(exc):
                with ctx.store.lock, ctx.store.conn as conn:
                    conn.execute("UPDATE ledger_deferred SET attempts = attempts + 1,"
                                 " last_error = ? WHERE seq = ?", (type(exc).__name__, seq))
                break
            # Refused by the log: keeping it would block every later entry.
            ctx.log.event("deferred_entry_refused", kind=entry.event.kind,
                          error=type(exc).__name__, detail=str(exc),
                          request_id=entry.event.request_id)
        else:
            appended += 1
        with ctx.store.lock, ctx.store.conn as conn:
            conn.execute("DELETE FROM ledger_deferred WHERE seq = ?", (seq,))
    return Completed(appended, *_raise_incidents(ctx, time.time() if now is None else now))


def _append_kept(ctx: NodeContext, entry: SignedEntry) -> None:
    try:
        append_signed(ctx, entry)
    except TimestampSkewed:
        event = entry.event
        redated = make_event(event.kind, event.actor, event.request_id,
                             {**event.payload, "deferred_from_ms": event.timestamp_ms})
        append_signed(ctx, sign_event(redated, ctx.signing_key))


def _raise_incidents(ctx: NodeContext, now: float) -> tuple[int, int]:
    with ctx.store.lock, ctx.store.conn as conn:
        pending = conn.execute("SELECT COUNT(*) FROM ledger_deferred").fetchone()[0]
        late = conn.execute(
            "SELECT seq, kind, deferred_at, attempts, last_error FROM ledger_deferred"
            " WHERE incident_at IS NULL AND deferred_at < ? ORDER BY seq",
            (now - bound_s(),)).fetchall()
        conn.executemany("UPDATE ledger_deferred SET incident_at = ? WHERE seq = ?",
                         [(now, row[0]) for row in late])
    for seq, kind, deferred_at, attempts, error in late:
        ctx.log.event("log_deferral_incident", seq=seq, kind=kind, attempts=attempts,
                      error=error, deferred_s=round(now - deferred_at, 1))
    return pending, len(late)


def deferral_incidents(ctx: NodeContext) -> list[dict[str, Any]]:
    """The deferred entries that raised an incident and are still not in the log."""
    with ctx.store.lock:
        rows = ctx.store.conn.execute(
            "SELECT seq, kind, deferred_at, attempts, last_error, incident_at"
            " FROM ledger_deferred WHERE incident_at IS NOT NULL ORDER BY seq").fetchall()
    names = ("seq", "kind", "deferred_at", "attempts", "last_error", "incident_at")
    return [dict(zip(names, row, strict=True)) for row in rows]


def complete_deferred_forever(ctx: NodeContext) -> None:
    """The node's loop: complete deferred entries every `RETRY_S`."""
    while True:
        time.sleep(RETRY_S)
        try:
            complete_deferred(ctx)
        except Exception as exc:  # a store or network fault: the next pass retries
            ctx.log.event("deferred_completion_failed", error=type(exc).__name__,
                          detail=str(exc))
