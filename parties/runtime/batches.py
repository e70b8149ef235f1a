"""Bulk data between nodes: Arrow batches that resume after interruption and never duplicate.

A transfer is a named stream of numbered batches. The receiver applies each
batch and records it in the same SQLite transaction, so a crash leaves either
the whole batch or none of it; re-sending a batch it already holds adds
nothing. The sender asks which batches arrived and sends only the rest.
"""

import hashlib
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import pyarrow as pa
from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel

from parties.runtime.access import Caller, CallerPolicy
from parties.runtime.client import NodeClient
from parties.runtime.errors import NodeError
from parties.runtime.store import NodeStore

MAX_BATCH_BYTES = 16 * 1024 * 1024
DIGEST_HEADER = "X-Batch-Digest"
STREAM_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,95}$"
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


class MalformedBatch(NodeError):
    """The body is not an Arrow IPC stream, or its digest does not match."""

    http_status = 422


class BatchTooLarge(NodeError):
    http_status = 413


class BatchConflict(NodeError):
    """A batch with this number already arrived with different content."""

    http_status = 409


class BatchReceipt(BaseModel):
    stream: str
    idx: int
    rows: int
    duplicate: bool


class ReceivedBatches(BaseModel):
    stream: str
    received: list[int]


def table_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def ipc_to_table(data: bytes) -> pa.Table:
    try:
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise MalformedBatch(f"not an Arrow IPC stream: {exc}") from exc


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    path: str,
    policy: CallerPolicy,
    receiver: BatchReceiver,
    stream_key: Callable[[Caller, str], str],
    applier: Callable[[Caller, str, int], Apply],
    what: str,
) -> None:
    """Mount the two routes of a batch stream on `router`.

    `GET {path}/{stream}` says which batches arrived; `PUT {path}/{stream}/{idx}`
    takes one (Arrow IPC) and applies it exactly once with `applier(caller,
    stream, idx)`. `stream_key(caller, stream)` names the stream internally, so
    one caller's stream never mixes with another's.
    """

    @router.get(f"{path}/{{stream}}", response_model=ReceivedBatches,
                summary=f"Which batches of {what} arrived")
    def batches_received(stream: StreamName,
                         caller: Caller = Depends(policy)) -> ReceivedBatches:
        got = receiver.received(stream_key(caller, stream))
        return ReceivedBatches(stream=stream, received=got.received)

    @router.put(f"{path}/{{stream}}/{{idx}}", response_model=BatchReceipt,
                summary=f"One batch of {what}")
    async def put_batch(stream: StreamName, idx: BatchIndex, request: Request,
                        caller: Caller = Depends(policy)) -> BatchReceipt:
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


def send_batches(
    client: NodeClient,
    target: str,
    base_path: str,
    stream: str,
    table: pa.Table,
    *,
    kind: str,
    batch_rows: int = 5000,
    on_batch: Callable[[int, int], None] | None = None,
) -> TransferSummary:
    """Send `table` to `target` as numbered batches, skipping those already received.

    The split is deterministic, so a resumed transfer numbers batches the same way.
    """
    already = set(
        client.get(target, f"{base_path}/{stream}", kind=kind).json()["received"]
    )
    total = max(1, -(-table.num_rows // batch_rows))
    sent = skipped = rows_sent = 0
    for idx in range(total):
        chunk = table.slice(idx * batch_rows, batch_rows)
        if idx in already:
            skipped += 1
        else:
            data = table_to_ipc(chunk)
            client.request(
                target, "PUT", f"{base_path}/{stream}/{idx}", kind=kind, content=data,
                headers={DIGEST_HEADER: digest(data),
                         "Content-Type": "application/vnd.apache.arrow.stream"},
            )
            sent += 1
            rows_sent += chunk.num_rows
        if on_batch:
            on_batch(idx + 1, total)
    return TransferSummary(stream, total, sent, skipped, rows_sent)
