"""A hospital's data asset registration: the owner states, and signs, what it exports.

Before the health authority governs an export, the hospital signs a log entry
(`ASSET_REGISTERED`) with its own node key: owner, grade, rows, the digest of the
rows it sends and their lineage (the source file's SHA-256 and format). This is
the paper's data asset registration. The authority governs only an export whose
registration is signed by the hospital that sent it and states exactly the rows
that arrived (`check_registration`); it then relays the entry, still signed by the
hospital, to the log. Neither the authority nor the operator can make such an
entry in a hospital's name: they do not hold its key, and the log verifies every
entry against its actor's certified key.
"""

import hashlib
import json
from pathlib import Path

import pyarrow as pa

from governance.classify import load_policy
from governance.ledger import SignedEntry
from parties.ingest.api import (
    ASSET_REGISTERED,
    ExportRegistrationInvalid,
    ExportRegistrationMismatch,
)
from parties.ledger.client import signed_entry
from parties.runtime.context import NodeContext

DATASET = "hospital_export"


def export_digest(table: pa.Table) -> str:
    """SHA-256 (hex) over the export as sent: for each column in order, its name and the
    JSON of its values (dates and decimals as text).

    Computed column by column over the whole table, so the hospital and the authority get
    the same digest from the same rows however the transfer batched them.
    """
    sha = hashlib.sha256()
    for name in table.column_names:
        values = table.column(name).to_pylist()
        sha.update(json.dumps(name).encode() + b":")
        sha.update(json.dumps(values, default=str, ensure_ascii=False,
                              separators=(",", ":")).encode() + b"\n")
    return sha.hexdigest()


def top_grade() -> str:
    """The highest grade of the grading policy: what a hospital's visit records are."""
    return max(load_policy().levels, key=lambda level: int(level[1:]))


def sign_registration(ctx: NodeContext, stream: str, table: pa.Table, source: Path,
                      source_sha256: str, grade: str) -> SignedEntry:
    """The hospital's signed registration of the export `stream` (not yet in the log)."""
    return signed_entry(ctx, ASSET_REGISTERED, {
        "dataset": DATASET, "owner": ctx.name, "stream": stream, "grade": grade,
        "rows": table.num_rows, "digest": export_digest(table),
        "source_sha256": source_sha256, "source_format": source.suffix.lstrip(".").lower(),
    })


def check_registration(ctx: NodeContext, registration: SignedEntry, sender: str, stream: str,
                       table: pa.Table) -> None:
    """Refuse unless `registration` is `sender`'s signed registration of exactly `table`.

    Raises `ExportRegistrationInvalid` (not a registration, another owner, or a signature
    that is not the sender's) or `ExportRegistrationMismatch` (rows or digest differ).
    """
    event = registration.event
    payload = event.payload
    if event.kind != ASSET_REGISTERED or payload.get("dataset") != DATASET:
        raise ExportRegistrationInvalid(f"not a {ASSET_REGISTERED} entry of a hospital export")
    if event.actor != sender or payload.get("owner") != sender:
        raise ExportRegistrationInvalid(
            f"the registration is made out by {event.actor} for {payload.get('owner')}, "
            f"the export comes from {sender}")
    key = ctx.signing_public_keys().get(sender)
    if key is None or not registration.signature_valid(key):
        raise ExportRegistrationInvalid(f"the registration is not signed by {sender}")
    if payload.get("stream") != stream:
        raise ExportRegistrationMismatch(
            f"the registration names export {payload.get('stream')}, not {stream}")
    if payload.get("rows") != table.num_rows:
        raise ExportRegistrationMismatch(
            f"the registration states {payload.get('rows')} rows, {table.num_rows} arrived")
    if payload.get("digest") != export_digest(table):
        raise ExportRegistrationMismatch("the rows that arrived do not have the registered "
                                         "digest")
