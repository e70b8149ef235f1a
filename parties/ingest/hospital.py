"""A hospital exports its raw visit records to the health authority, in its own schema.

The export is a resumable, idempotent batch transfer (`parties.runtime.batches`) named
by the file's SHA-256: exporting the same file again sends nothing new, and an
interrupted export resumes where it stopped. When every batch has arrived the
hospital asks the authority to govern the export and returns what it reports.
The hospital's local operator starts it through the admin route (the file
path is on the hospital's own machine).
"""

import hashlib
from pathlib import Path as FilePath
from typing import Annotated

import pyarrow as pa
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from governance.errors import GovernanceError
from governance.scan import read_batches
from parties.runtime.access import Caller, CallerPolicy
from parties.runtime.batches import send_batches
from parties.runtime.client import NodeClient
from parties.runtime.context import NodeContext
from parties.runtime.service import Service
from parties.runtime.topology import Role
from parties.services.health_authority import LONG_CALL_S, GovernedExport

DEFAULT_BATCH_ROWS = 5000


class ExportFileMissing(GovernanceError):
    http_status = 404


class ExportRequest(BaseModel):
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    batch_rows: Annotated[int, Field(ge=10, le=200_000)] = DEFAULT_BATCH_ROWS


class ExportResult(BaseModel):
    hospital_id: str
    stream: str
    rows: int
    batches: int
    sent: int
    skipped: int
    governed: GovernedExport


def file_stream_name(path: FilePath) -> str:
    """The transfer name of an export: `x-` + the first 32 hex digits of the file's SHA-256."""
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return f"x-{sha.hexdigest()[:32]}"


def read_export(path: FilePath) -> pa.Table:
    """The raw export as one Arrow table, column types as the file gives them."""
    tables = [pa.Table.from_pandas(b, preserve_index=False) for b in read_batches(path)]
    if not tables:
        raise ExportFileMissing(f"{path.name}: no rows")
    return pa.concat_tables(tables, promote_options="permissive")


def export_file(ctx: NodeContext, path: FilePath, *,
                batch_rows: int = DEFAULT_BATCH_ROWS) -> ExportResult:
    """Send the raw export at `path` to the health authority and have it governed."""
    if not path.is_file():
        raise ExportFileMissing(f"no export file at {path}")
    stream = file_stream_name(path)
    table = read_export(path)
    authority = ctx.topology.nodes_with_role(Role.HEALTH_AUTHORITY)[0].name
    with NodeClient(ctx.state, ctx.topology, ctx.name, log=ctx.log, timeout=LONG_CALL_S) as client:
        summary = send_batches(client, authority, "/v1/exports", stream, table, kind="export",
                               batch_rows=batch_rows)
        governed = GovernedExport.model_validate(client.post(
            authority, f"/v1/exports/{stream}/complete", kind="export",
            json={"batches": summary.batches, "rows": table.num_rows},
        ).json())
    ctx.log.event("exported", stream=stream, rows=table.num_rows, sent=summary.sent,
                  skipped=summary.skipped)
    return ExportResult(hospital_id=ctx.name, stream=stream, rows=table.num_rows,
                        batches=summary.batches, sent=summary.sent, skipped=summary.skipped,
                        governed=governed)


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter(prefix="/v1/hospital", tags=["hospital"])

    @router.post("/export", response_model=ExportResult)
    def post_export(body: ExportRequest, caller: Caller = Depends(CallerPolicy("admin"))
                    ) -> ExportResult:
        """Export a raw file of this hospital to the health authority (its local operator only)."""
        return export_file(ctx, FilePath(body.path), batch_rows=body.batch_rows)

    return [router]


HOSPITAL_EXPORT_SERVICE = Service(
    name="hospital-export",
    roles=(Role.HOSPITAL,),
    routers=_routes,
)
