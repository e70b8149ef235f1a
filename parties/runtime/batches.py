"""Bulk data between nodes: Arrow batches that resume after interruption and never duplicate.

A transfer is a named stream of numbered batches over the two routes of a
`BatchStream` (declared in the owning capability's `api.py`). The receiver applies
each batch and records it in the same SQLite transaction, so a crash leaves either
the whole batch or none of it; re-sending a batch it already holds adds
nothing. The sender asks which batches arrived and sends only the rest.
"""

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import pyarrow as pa
from fastapi import APIRouter, Path, Request

from parties.runtime.access import Caller
from parties.runtime.batch_routes import (
    ARROW_STREAM_TYPE,
    DIGEST_HEADER,
    STREAM_PATTERN,
    BatchConflict,
    BatchReceipt,
    BatchStream,
    BatchTooLarge,
    MalformedBatch,
    ReceivedBatches,
    digest,
    ipc_to_table,
    table_to_ipc,
)
from parties.runtime.client import NodeClient
from parties.runtime.mount import mount
from parties.runtime.store import NodeStore

MAX_BATCH_BYTES = 16 * 1024 * 1024
StreamName = Annotated[str, Path(pattern=STREAM_PATTERN)]
BatchIndex = Annotated[int, Path(ge=0, lt=10**7)]

COMPONENT = "batches"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE received_batches (
        stream TEXT NOT NULL, idx INTEGER NOT NULL, digest TEXT NOT NULL,
        rows INTEGER NOT NULL, received_at TEXT NOT NULL DEFAULT (datetime('now')),
        PRIMARY KEY (stream, idx)
    )
    """,
)


async def read_limited_body(request: Request, limit: int = MAX_BATCH_BYTES) -> bytes:
    """The request body, refused as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BatchTooLarge(f"body of {declared} bytes exceeds {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BatchTooLarge(f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


Apply = Callable[[sqlite3.Connection, pa.Table], int]


class BatchReceiver:
    """Applies incoming batches exactly once."""

    def __init__(self, store: NodeStore) -> None:
        self.store = store

    def received(self, stream: str) -> ReceivedBatches:
        with self.store.lock:
            rows = self.store.conn.execute(
                "SELECT idx FROM received_batches WHERE stream = ? ORDER BY idx", (stream,)
            ).fetchall()
        return ReceivedBatches(stream=stream, received=[r[0] for r in rows])

    def accept(
        self, stream: str, idx: int, claimed_digest: str | None, data: bytes, apply: Apply
    ) -> BatchReceipt:
        actual = digest(data)
        if claimed_digest is not None and claimed_digest != actual:
            raise MalformedBatch("batch digest does not match its content")
        table = ipc_to_table(data)
        conn = self.store.conn
        with self.store.lock, conn:
            seen = conn.execute(
                "SELECT digest, rows FROM received_batches WHERE stream = ? AND idx = ?",
                (stream, idx),
            ).fetchone()
            if seen is not None:
                if seen[0] != actual:
                    raise BatchConflict(f"batch {stream}/{idx} already arrived with other content")
                return BatchReceipt(stream=stream, idx=idx, rows=seen[1], duplicate=True)
            rows = apply(conn, table)
            conn.execute(
                "INSERT INTO received_batches (stream, idx, digest, rows) VALUES (?, ?, ?, ?)",
                (stream, idx, actual, rows),
            )
        return BatchReceipt(stream=stream, idx=idx, rows=rows, duplicate=False)


def mount_batch_stream(
    router: APIRouter,
    routes: BatchStream,
    receiver: BatchReceiver,
    stream_key: Callable[[Caller, str], str],
    applier: Callable[[Caller, str, int], Apply],
    what: str,
) -> None:
    """Mount the two routes of a batch stream on `router`.

    `routes.received` says which batches arrived; `routes.batch` takes one (Arrow
    IPC) and applies it exactly once with `applier(caller, stream, idx)`.
    `stream_key(caller, stream)` names the stream internally, so one caller's
    stream never mixes with another's.
    """

    @mount(router, routes.received, summary=f"Which batches of {what} arrived")
    def batches_received(stream: StreamName, caller: Caller) -> ReceivedBatches:
        got = receiver.received(stream_key(caller, stream))
        return ReceivedBatches(stream=stream, received=got.received)

    @mount(router, routes.batch, summary=f"One batch of {what}")
    async def put_batch(stream: StreamName, idx: BatchIndex, request: Request,
                        caller: Caller) -> BatchReceipt:
        data = await read_limited_body(request)
        return receiver.accept(stream_key(caller, stream), idx,
                               request.headers.get(DIGEST_HEADER), data,
                               applier(caller, stream, idx))


@dataclass(frozen=True)
class TransferSummary:
    stream: str
    batches: int
    sent: int
    skipped: int
    rows_sent: int


def send_built_batches(
    client: NodeClient,
    target: str,
    routes: BatchStream,
    stream: str,
    total: int,
    build: Callable[[int], pa.Table],
    *,
    on_batch: Callable[[int, int], None] | None = None,
) -> TransferSummary:
    """Send batches 0..total-1 of `stream`, each made by `build(idx)` when it is sent,
    skipping those `target` already holds.

    `build` must split deterministically, so a resumed transfer numbers batches the
    same way and sends only those the receiver lacks.
    """
    already = set(client.call(target, routes.received, params={"stream": stream}).received)
    sent = skipped = rows_sent = 0
    for idx in range(total):
        if idx in already:
            skipped += 1
        else:
            chunk = build(idx)
            data = table_to_ipc(chunk)
            client.call(target, routes.batch, params={"stream": stream, "idx": idx},
                        content=data,
                        headers={DIGEST_HEADER: digest(data), "Content-Type": ARROW_STREAM_TYPE})
            sent += 1
            rows_sent += chunk.num_rows
        if on_batch:
            on_batch(idx + 1, total)
    return TransferSummary(stream, total, sent, skipped, rows_sent)


def send_batches(
    client: NodeClient,
    target: str,
    routes: BatchStream,
    stream: str,
    table: pa.Table,
    *,
    batch_rows: int = 5000,
    on_batch: Callable[[int, int], None] | None = None,
) -> TransferSummary:
    """Send `table` to `target` as numbered batches, skipping those already received."""
    return send_built_batches(
        client, target, routes, stream, max(1, -(-table.num_rows // batch_rows)),
        lambda idx: table.slice(idx * batch_rows, batch_rows), on_batch=on_batch,
    )
