"""A node's embedded store: one SQLite database in WAL mode with versioned migrations.

Components (the ledger, consent registry, ...) bring their own migration lists;
the runtime's own tables are the component `node`.
"""

import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from governance.migrations import apply_migrations

NODE_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE node_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE refusals (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL DEFAULT (datetime('now')),
        request_id TEXT, caller TEXT, route TEXT, error TEXT NOT NULL, detail TEXT
    )
    """,
)

Component = tuple[str, Sequence[str]]

#: how long a write waits for another writer before "database is locked"
STORE_BUSY_MS = 30_000


def connect(path: Path, *, explicit_transactions: bool = False) -> sqlite3.Connection:
    """Open the store with the settings every connection must share.

    With `explicit_transactions` the caller issues BEGIN/COMMIT itself (the
    ledger's `BEGIN IMMEDIATE`); otherwise `with conn:` wraps a transaction.
    """
    conn = sqlite3.connect(path, timeout=STORE_BUSY_MS / 1000, check_same_thread=False,
                           isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    # Overwrite deleted content, so destroyed keys and shredded rows do not linger.
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute(f"PRAGMA busy_timeout={STORE_BUSY_MS}")
    if not explicit_transactions:
        conn.isolation_level = ""
    return conn


class NodeStore:
    """The node's database, migrated on open; one shared connection guarded by a lock."""

    def __init__(self, path: Path, components: Iterable[Component] = ()) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():  # private from its first byte; SQLite gives its journals its mode
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.path = path
        self.conn = connect(path)
        self.lock = threading.RLock()
        self.versions = {"node": apply_migrations(self.conn, "node", NODE_MIGRATIONS)}
        for name, migrations in components:
            self.versions[name] = apply_migrations(self.conn, name, migrations)

    def record_refusal(
        self, request_id: str | None, caller: str | None, route: str, error: str, detail: str
    ) -> None:
        with self.lock, self.conn:
            self.conn.execute(
                "INSERT INTO refusals (request_id, caller, route, error, detail)"
                " VALUES (?, ?, ?, ?, ?)",
                (request_id, caller, route, error, detail),
            )

    def close(self) -> None:
        self.conn.close()
