"""The operator's book of checked claimants: whom an insurer actually submitted, with consent.

A claim reaches the operator's computation only after the regulator checked its consent
document (registered, unrevoked, in its window, given to this insurer for the contract's
purpose) and the operator checked that the consent is signed by the key the health
authority delivered for the person behind the claim's token (`parties.claims.compute`).
Each such claim's (insurer, shared-domain token, consent id) is kept here, so a statistic
over "the insurer's claimants" runs over people who were really claimed for and who
consented, never over ids the insurer picks: the insurer cannot add anyone without a
real, consented, person-bound claim check.

The operator learns nothing new by keeping it: the tokens, consents and hospitals were in
the sealed envelope it opened for the check. Rows name tokens of the insurer's shared
domain at the time of the check (`domain_id`); after a domain rotation they match nothing
until the claimant is checked again.
"""

import sqlite3
import time
from collections.abc import Iterable

from parties.runtime.context import NodeContext
from parties.runtime.store import STORE_BUSY_MS

_BUSY_MS = 250

COMPONENT = "claims_checked_claimants"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE checked_claimants (
        insurer TEXT NOT NULL,
        domain_id TEXT NOT NULL,
        token BLOB NOT NULL,
        consent_id TEXT NOT NULL,
        checked_at REAL NOT NULL,
        PRIMARY KEY (insurer, domain_id, token, consent_id)
    )
    """,
)


def record_checked(ctx: NodeContext, insurer: str, domain_id: str,
                   claimants: Iterable[tuple[bytes, str]]) -> None:
    """Keep (token, consent id) of each claim whose consent was checked against its person.

    A store that cannot take the rows (locked, full) does not fail the claim check: the
    claimants are then not counted by a statistic, which errs on the side of counting
    fewer people, never more."""
    now = time.time()
    rows = [(insurer, domain_id, token, consent_id, now) for token, consent_id in claimants]
    with ctx.store.lock:
        conn = ctx.store.conn
        # On the claim check's path: wait briefly for a busy store, never the store's
        # usual 30 s, so a log outage (the log shares the store) does not stall the check.
        conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        try:
            with conn:
                conn.executemany(
                    "INSERT INTO checked_claimants VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE"
                    " SET checked_at = excluded.checked_at", rows)
        except sqlite3.OperationalError as exc:
            ctx.log.event("checked_claimants_not_kept", insurer=insurer, claims=len(rows),
                          error=type(exc).__name__)
        finally:
            conn.execute(f"PRAGMA busy_timeout={STORE_BUSY_MS}")


def consented_tokens(ctx: NodeContext, insurer: str, domain_id: str,
                     consents_in_force: Iterable[str]) -> set[bytes]:
    """The tokens of `insurer`'s checked claimants whose consent is still in force (the
    regulator's registry says which are: `consents_in_force`)."""
    in_force = set(consents_in_force)
    with ctx.store.lock:
        rows = ctx.store.conn.execute(
            "SELECT token, consent_id FROM checked_claimants WHERE insurer = ? AND domain_id = ?",
            (insurer, domain_id)).fetchall()
    return {bytes(token) for token, consent_id in rows if consent_id in in_force}
