"""One write transaction per batch on a shared SQLite connection."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite3  # annotations only: the caller opens the connection


@contextmanager
def write_transaction(conn: "sqlite3.Connection") -> "Iterator[sqlite3.Connection]":
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception.

    IMMEDIATE takes the write lock up front, so a check-then-write inside the
    block (a quota count, the log's size) cannot race another writer.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.rollback()
        raise
    conn.commit()
