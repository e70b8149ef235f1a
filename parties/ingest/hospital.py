"""A hospital exports its raw visit records to the health authority, in its own schema.

The export is a resumable, idempotent batch transfer (`parties.runtime.batches`) named
by the file's SHA-256: exporting the same file again sends nothing new, and an
interrupted export resumes where it stopped. When every batch has arrived the
hospital signs its data asset registration (`parties.ingest.registration`: owner,
grade, rows, digest, lineage) and asks the authority to govern the export under it;
it returns what the authority reports.
The hospital's local operator starts it through the admin route (the file
path is on the hospital's own machine).
"""

import hashlib
from pathlib import Path

import pyarrow as pa
from fastapi import APIRouter

from governance.scan import read_batches
from parties.ingest.api import (
    COMPLETE_EXPORT,
    DEFAULT_BATCH_ROWS,
    EXPORT_BATCHES,
    HOSPITAL_EXPORT,
    LONG_CALL_S,
    ExportComplete,
    ExportFileMissing,
    ExportRequest,
    ExportResult,
)
from parties.ingest.registration import sign_registration, top_grade
from parties.runtime.access import Caller
from parties.runtime.batches import send_batches
from parties.runtime.client import NodeClient
from parties.runtime.context import NodeContext
from parties.runtime.mount import mount
from parties.runtime.service import Service
from parties.runtime.topology import Role


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def file_stream_name(file_digest: str) -> str:
    """The transfer name of an export: `x-` + the first 32 hex digits of the file's SHA-256."""
    return f"x-{file_digest[:32]}"


def read_export(path: Path, encoding: str | None = None) -> pa.Table:
    """The raw export as one Arrow table, column types as the file gives them.

    `encoding` is that of a text file (CSV, JSON lines); None detects it.
    """
    tables = [pa.Table.from_pandas(b, preserve_index=False)
              for b in read_batches(path, encoding=encoding)]
    if not tables:
        raise ExportFileMissing(f"{path.name}: no rows")
    return pa.concat_tables(tables, promote_options="permissive")


def export_file(ctx: NodeContext, path: Path, *, batch_rows: int = DEFAULT_BATCH_ROWS,
                encoding: str | None = None, grade: str | None = None) -> ExportResult:
    """Send the raw export at `path` to the health authority and have it governed under
    this hospital's signed registration (at `grade`, by default the policy's top grade)."""
    if not path.is_file():
        raise ExportFileMissing(f"no export file at {path}")
    source_sha256 = file_sha256(path)
    stream = file_stream_name(source_sha256)
    table = read_export(path, encoding)
    registration = sign_registration(ctx, stream, table, path, source_sha256,
                                     grade or top_grade())
    authority = ctx.topology.node_of(Role.HEALTH_AUTHORITY)
    with NodeClient(ctx.state, ctx.topology, ctx.name, log=ctx.log, timeout=LONG_CALL_S) as client:
        summary = send_batches(client, authority, EXPORT_BATCHES, stream, table,
                               batch_rows=batch_rows)
        governed = client.call(authority, COMPLETE_EXPORT,
                               ExportComplete(batches=summary.batches, rows=table.num_rows,
                                              registration=registration),
                               params={"stream": stream})
    ctx.log.event("exported", stream=stream, rows=table.num_rows, sent=summary.sent,
                  skipped=summary.skipped)
    return ExportResult(hospital_id=ctx.name, stream=stream, rows=table.num_rows,
                        batches=summary.batches, sent=summary.sent, skipped=summary.skipped,
                        governed=governed)


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, HOSPITAL_EXPORT)
    def post_export(body: ExportRequest, caller: Caller) -> ExportResult:
        """Export a raw file of this hospital to the health authority (its local operator only)."""
        return export_file(ctx, Path(body.path), batch_rows=body.batch_rows,
                           encoding=body.encoding, grade=body.grade)

    return [router]


HOSPITAL_EXPORT_SERVICE = Service(
    name="hospital-export",
    roles=(Role.HOSPITAL,),
    routers=_routes,
)
