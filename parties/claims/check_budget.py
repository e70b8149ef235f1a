"""The regulator's check budget: how many checks one consent buys at one hospital per day.

A consent authorizes checking claims, not probing a person's records. Each check answers
a few bits at most, so the number of checks bounds what any adaptive sequence can learn:
with `b` checks a day, a bisection of a self-pay over a range of 2^m fen is left with an
interval of 2^(m-b) fen at best, and a scan of dates covers `b` days. The contract sets
`b` (`quota.checks_per_consent_per_day`, `governance.contracts`).

A bucket is (contract, consent, hospital tag, UTC day); the hospital tag names the
hospital without showing it (`parties.claims.fingerprints`). A check is spent when the
regulator accepts it for computation, whatever follows: a check refused by the operator
(the uniform `ClaimNotCheckable`, a hospital not in the topology) or failed costs the
same as an answered one, so refusals are no free probe. A batch spends one check per
claim; it is refused whole (`CheckBudgetSpent`, 429), spending nothing, when any bucket
would go over. A retry of the same request id spends nothing again; an identical check
answered from the request book spends nothing at all. The counts live in the regulator's
store and survive a restart.
"""

import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from datetime import date

from parties.claims.api import CheckBudgetSpent, ClaimRef
from parties.runtime.context import NodeContext

RETENTION_DAYS = 2  # a day's counts are kept until the day is safely over everywhere

COMPONENT = "claims_check_budget"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE claim_check_budget (
        request_id TEXT NOT NULL,
        contract_id TEXT NOT NULL,
        insurer TEXT NOT NULL,
        consent_id TEXT NOT NULL,
        hospital_tag TEXT NOT NULL,
        day TEXT NOT NULL,             -- UTC day, YYYY-MM-DD
        checks INTEGER NOT NULL,
        spent_at REAL NOT NULL,
        PRIMARY KEY (request_id, contract_id, consent_id, hospital_tag)
    );
    CREATE INDEX claim_check_budget_by_bucket
        ON claim_check_budget (contract_id, consent_id, hospital_tag, day)
    """,
)

Bucket = tuple[str, str]  # (consent id, hospital tag)


class CheckBudget:
    """Spends and counts checks per (contract, consent, hospital tag, UTC day)."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.purged_on: date | None = None

    def spend(self, request_id: str, contract_id: str, insurer: str,
              claims: Sequence[ClaimRef], limit: int, day: date) -> dict[Bucket, int]:
        """Spend one check per claim, all or nothing; the bucket counts after spending.

        Raises `CheckBudgetSpent` (nothing spent) when a bucket would exceed `limit`. A
        request id that already spent (a retry) spends nothing again.
        """
        wanted = Counter((c.consent_id, c.hospital_tag) for c in claims)
        today = day.isoformat()
        self._purge(day)
        with self.ctx.store.lock, self.ctx.store.conn as conn:
            if conn.execute("SELECT 1 FROM claim_check_budget WHERE request_id = ? LIMIT 1",
                            (request_id,)).fetchone() is not None:
                return {b: self._spent(conn, contract_id, b, today) for b in wanted}
            counts = {}
            for bucket, checks in wanted.items():
                used = self._spent(conn, contract_id, bucket, today)
                if used + checks > limit:
                    claim = next(c.claim_id for c in claims
                                 if (c.consent_id, c.hospital_tag) == bucket)
                    raise CheckBudgetSpent(
                        f"claim {claim}: consent {bucket[0]} has {max(0, limit - used)} of "
                        f"its {limit} checks a day left at this claim's hospital on {today} "
                        f"(UTC) and the batch needs {checks}; nothing was checked")
                counts[bucket] = used + checks
            now = time.time()
            conn.executemany(
                "INSERT INTO claim_check_budget (request_id, contract_id, insurer, consent_id,"
                " hospital_tag, day, checks, spent_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(request_id, contract_id, insurer, consent, tag, today, checks, now)
                 for (consent, tag), checks in wanted.items()])
        return counts

    def spent(self, contract_id: str, consent_id: str, hospital_tag: str, day: date) -> int:
        """Checks spent in one bucket on `day`."""
        with self.ctx.store.lock:
            return self._spent(self.ctx.store.conn, contract_id, (consent_id, hospital_tag),
                               day.isoformat())

    @staticmethod
    def _spent(conn: sqlite3.Connection, contract_id: str, bucket: Bucket, day: str) -> int:
        row = conn.execute(
            "SELECT COALESCE(SUM(checks), 0) FROM claim_check_budget WHERE contract_id = ?"
            " AND consent_id = ? AND hospital_tag = ? AND day = ?",
            (contract_id, *bucket, day)).fetchone()
        return int(row[0])

    def _purge(self, day: date) -> None:
        """Drop the counts of days long over (once a day)."""
        if self.purged_on == day:
            return
        cutoff = date.fromordinal(day.toordinal() - RETENTION_DAYS).isoformat()
        with self.ctx.store.lock, self.ctx.store.conn as conn:
            conn.execute("DELETE FROM claim_check_budget WHERE day < ?", (cutoff,))
        self.purged_on = day


def check_budget(ctx: NodeContext) -> CheckBudget:
    return ctx.component(CheckBudget)
