"""The contract of a batch stream: its two routes, their models, its refusals, its encoding.

A capability declares each of its streams in its `api.py` with `batch_stream_routes`
(the path prefix written there); `parties.runtime.batches` mounts the pair on the
receiver and sends through it. This module loads no web framework, so an `api.py`
can import it.
"""

import hashlib
from dataclasses import dataclass

import pyarrow as pa
from pydantic import BaseModel

from parties.runtime.errors import NodeError
from parties.runtime.routes import Kind, Raw, Route
from parties.runtime.topology import Role

DIGEST_HEADER = "X-Batch-Digest"
ARROW_STREAM_TYPE = "application/vnd.apache.arrow.stream"
STREAM_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,95}$"


class MalformedBatch(NodeError):
    """The body is not an Arrow IPC stream, or its digest does not match."""

    http_status = 422


class BatchTooLarge(NodeError):
    http_status = 413


class BatchConflict(NodeError):
    """A batch with this number already arrived with different content."""

    http_status = 409


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


class BatchReceipt(BaseModel):
    stream: str
    idx: int
    rows: int
    duplicate: bool


class ReceivedBatches(BaseModel):
    stream: str
    received: list[int]


@dataclass(frozen=True)
class BatchStream:
    """The two routes of one stream: which batches of `{stream}` arrived, and batch `{idx}`."""

    received: Route[None, ReceivedBatches]
    batch: Route[Raw, BatchReceipt]


def batch_stream_routes(
    prefix: str, kind: Kind, roles: tuple[Role, ...] | None = None, *, tag: str = ""
) -> BatchStream:
    """`GET {prefix}/{stream}` and `PUT {prefix}/{stream}/{idx}` (an Arrow IPC body)."""
    return BatchStream(
        received=Route("GET", f"{prefix}/{{stream}}", kind, None, ReceivedBatches,
                       roles=roles, tag=tag),
        batch=Route("PUT", f"{prefix}/{{stream}}/{{idx}}", kind, Raw, BatchReceipt,
                    roles=roles, tag=tag),
    )
