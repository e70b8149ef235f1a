"""Versioned schema migrations for an embedded SQLite store.

Each component (ledger, consent, ...) owns an ordered tuple of SQL scripts.
Script i brings the component from version i to i + 1; applied versions are
recorded in `schema_migrations`, so running twice changes nothing.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite3  # annotations only: the caller opens the connection


def applied_version(conn: "sqlite3.Connection", component: str) -> int:
    """The number of migrations of `component` already applied."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " component TEXT NOT NULL, version INTEGER NOT NULL,"
        " applied_at TEXT NOT NULL DEFAULT (datetime('now')),"
        " PRIMARY KEY (component, version))"
    )
    row = conn.execute(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations WHERE component = ?",
        (component,),
    ).fetchone()
    return int(row[0])


def apply_migrations(
    conn: "sqlite3.Connection", component: str, migrations: Sequence[str]
) -> int:
    """Apply the migrations of `component` not yet applied; return the new version.

    Each migration runs in its own transaction together with its bookkeeping row,
    so a crash leaves the store at a whole version.
    """
    current = applied_version(conn, component)
    if current > len(migrations):
        raise RuntimeError(
            f"store has {component} schema v{current}, newer than this code's "
            f"v{len(migrations)}"
        )
    for version, script in enumerate(migrations[current:], start=current + 1):
        with conn:
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (component, version) VALUES (?, ?)",
                (component, version),
            )
    return len(migrations)


def _statements(script: str) -> list[str]:
    # executescript() would COMMIT on its own and break the one-transaction rule.
    return [s.strip() for s in script.split(";") if s.strip()]
