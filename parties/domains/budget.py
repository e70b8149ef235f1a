"""The health authority's book of OPRF batches: replay refusal, daily id budgets, incidents.

Every batch the authority applies k1 to is recorded once (`oprf_batches`: data user,
request id, batch id, count, digest; never a point), which is both the replay table and
the authority's own log of what it evaluated. Each data user may have at most
`ids_per_day()` ids evaluated per UTC day (`oprf_usage`). A batch that would cross the
cap trips the budget: the trip is an incident (`oprf_budget_incidents`, a log entry) and
every further batch of that data user is refused with `OprfBudgetSpent` until the next
UTC day or an administrator's reset (`reset_budget`). All of it is SQLite, so it holds
across restarts.

The cap is a node setting of the authority ($COGOV_OPRF_IDS_PER_DAY), not a contract
term: one k1 serves every scenario and every contract of a data user, the authority holds
no contract book, and the contract's own `rows_per_day` already bounds the claim checks
at the serving nodes.
"""

import os
from datetime import UTC, datetime

from governance.ledger.events import register_event_kind
from parties.domains.api import (
    BatchReplayed,
    NotADataUser,
    OprfBudget,
    OprfBudgetSpent,
    SignedBatch,
)
from parties.domains.batch import insurer_keys
from parties.ledger.client import append_entry
from parties.runtime.context import NodeContext

IDS_PER_DAY_ENV = "COGOV_OPRF_IDS_PER_DAY"
DEFAULT_IDS_PER_DAY = 100_000

OPRF_LEVEL1_APPLIED = register_event_kind("oprf_level1_applied")
OPRF_BUDGET_TRIPPED = register_event_kind("oprf_budget_tripped")
OPRF_BUDGET_RESET = register_event_kind("oprf_budget_reset")

COMPONENT = "oprf-budget"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE oprf_batches (
        batch_id TEXT PRIMARY KEY,
        data_user TEXT NOT NULL,
        request_id TEXT NOT NULL,
        points INTEGER NOT NULL,
        digest TEXT NOT NULL,
        day TEXT NOT NULL,
        at TEXT NOT NULL DEFAULT (datetime('now'))
    );
    CREATE TABLE oprf_usage (
        data_user TEXT NOT NULL,
        day TEXT NOT NULL,
        ids INTEGER NOT NULL,
        PRIMARY KEY (data_user, day)
    );
    CREATE TABLE oprf_budget_incidents (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        data_user TEXT NOT NULL,
        day TEXT NOT NULL,
        used INTEGER NOT NULL,
        asked INTEGER NOT NULL,
        cap INTEGER NOT NULL,
        at TEXT NOT NULL DEFAULT (datetime('now')),
        reset_at TEXT,
        reset_by TEXT
    );
    """,
)


def ids_per_day() -> int:
    """Ids one data user may have evaluated per UTC day: $COGOV_OPRF_IDS_PER_DAY or the
    default."""
    raw = os.environ.get(IDS_PER_DAY_ENV)
    return int(raw) if raw else DEFAULT_IDS_PER_DAY


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


def _is_spent(ctx: NodeContext, data_user: str, day: str) -> bool:
    return ctx.store.conn.execute(
        "SELECT 1 FROM oprf_budget_incidents WHERE data_user = ? AND day = ?"
        " AND reset_at IS NULL", (data_user, day)).fetchone() is not None


def _used(ctx: NodeContext, data_user: str, day: str) -> int:
    row = ctx.store.conn.execute("SELECT ids FROM oprf_usage WHERE data_user = ? AND day = ?",
                                 (data_user, day)).fetchone()
    return row[0] if row else 0


def admit_batch(ctx: NodeContext, batch: SignedBatch, digest: str) -> None:
    """Record a verified batch as evaluated and charge its ids to its data user's day.

    Raises `BatchReplayed` for a batch id seen before and `OprfBudgetSpent` once the day's
    budget tripped; the batch that trips it records the incident (committed, logged) and
    is refused too. A refused batch is not recorded, so it charges nothing.
    """
    day, cap, asked = _today(), ids_per_day(), len(batch.points)
    conn = ctx.store.conn
    with ctx.store.lock, conn:
        if conn.execute("SELECT 1 FROM oprf_batches WHERE batch_id = ?",
                        (batch.batch_id,)).fetchone():
            raise BatchReplayed(f"batch {batch.batch_id} was evaluated before")
        if _is_spent(ctx, batch.data_user, day):
            raise OprfBudgetSpent(f"{batch.data_user} spent its OPRF budget of {day}")
        used = _used(ctx, batch.data_user, day)
        tripped = used + asked > cap
        if tripped:
            conn.execute("INSERT INTO oprf_budget_incidents (data_user, day, used, asked, cap)"
                         " VALUES (?, ?, ?, ?, ?)", (batch.data_user, day, used, asked, cap))
        else:
            conn.execute(
                "INSERT INTO oprf_usage (data_user, day, ids) VALUES (?, ?, ?)"
                " ON CONFLICT (data_user, day) DO UPDATE SET ids = ids + excluded.ids",
                (batch.data_user, day, asked))
            conn.execute(
                "INSERT INTO oprf_batches (batch_id, data_user, request_id, points, digest, day)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (batch.batch_id, batch.data_user, batch.request_id, asked, digest, day))
    if tripped:
        ctx.log.event("oprf_budget_tripped", data_user=batch.data_user, day=day, used=used,
                      asked=asked, cap=cap)
        append_entry(ctx, OPRF_BUDGET_TRIPPED, {
            "data_user": batch.data_user, "day": day, "used": used, "asked": asked, "cap": cap})
        raise OprfBudgetSpent(f"{batch.data_user} would exceed its {cap} OPRF ids of {day}; "
                              "refused until the next UTC day or an administrator's reset")
    append_entry(ctx, OPRF_LEVEL1_APPLIED, {
        "data_user": batch.data_user, "batch_id": batch.batch_id, "points": asked,
        "batch_digest": digest})


def budget_of(ctx: NodeContext, data_user: str) -> OprfBudget:
    day = _today()
    with ctx.store.lock:
        (incidents,) = ctx.store.conn.execute(
            "SELECT COUNT(*) FROM oprf_budget_incidents WHERE data_user = ?",
            (data_user,)).fetchone()
        return OprfBudget(data_user=data_user, day=day, used=_used(ctx, data_user, day),
                          cap=ids_per_day(), spent=_is_spent(ctx, data_user, day),
                          incidents=incidents)


def list_budgets(ctx: NodeContext) -> list[OprfBudget]:
    """Today's budget of every data user (insurer) of the federation."""
    return [budget_of(ctx, name) for name in sorted(insurer_keys(ctx))]


def reset_budget(ctx: NodeContext, data_user: str, by: str) -> OprfBudget:
    """Close the data user's open incidents and zero today's count; logged."""
    if data_user not in insurer_keys(ctx):
        raise NotADataUser(f"{data_user} is not a data user (insurer) of the federation")
    day = _today()
    with ctx.store.lock, ctx.store.conn as conn:
        closed = conn.execute(
            "UPDATE oprf_budget_incidents SET reset_at = datetime('now'), reset_by = ?"
            " WHERE data_user = ? AND reset_at IS NULL", (by, data_user)).rowcount
        conn.execute("DELETE FROM oprf_usage WHERE data_user = ? AND day = ?", (data_user, day))
    ctx.log.event("oprf_budget_reset", data_user=data_user, by=by, incidents=closed)
    append_entry(ctx, OPRF_BUDGET_RESET, {"data_user": data_user, "day": day, "by": by,
                                          "incidents": closed})
    return budget_of(ctx, data_user)
