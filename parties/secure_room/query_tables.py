"""Query tables: the requester's inputs to a production run (e.g. claims), sealed to the
data owner and bound to one package, so only that owner opens them, only for that run."""

import base64
from pathlib import Path

import nacl.exceptions
import pandas as pd
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from parties.runtime.batch_routes import ipc_to_table, table_to_ipc
from parties.runtime.errors import NodeError
from parties.runtime.sealing import (
    open_bytes,
    seal_bytes,
    sealing_private_key,
    sealing_public_key,
)
from parties.secure_room.api import QueryTablesInvalid

QUERY_SEAL_DOMAIN = b"cogov-package-query-v1\x00"


def read_query_table(path: Path) -> pa.Table:
    """A query table from Parquet, or CSV typed by convention.

    CSV: `*_fen` columns are integers, `*_date` columns ISO dates, and
    `covered_categories` a `;`-separated list.
    """
    if path.suffix == ".parquet":
        return pa.Table.from_pandas(pd.read_parquet(path), preserve_index=False)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in frame.columns:
        if column.endswith("_fen"):
            frame[column] = frame[column].astype("int64")
        elif column.endswith("_date"):
            frame[column] = pd.to_datetime(frame[column]).dt.date
        elif column == "covered_categories":
            frame[column] = frame[column].map(lambda text: [c for c in text.split(";") if c])
    return pa.Table.from_pandas(frame, preserve_index=False)


def seal_query_table(table: pa.Table, owner_signing_public: bytes, package_sha256: str) -> str:
    """A query table sealed to the data owner, bound to one package (base64 for JSON)."""
    framed = QUERY_SEAL_DOMAIN + package_sha256.encode("ascii") + table_to_ipc(table)
    return base64.b64encode(seal_bytes(sealing_public_key(owner_signing_public), framed)).decode(
        "ascii")


def open_query_table(signing_key: Ed25519PrivateKey, owner: str, name: str, sealed_b64: str,
                     package_sha256: str) -> pd.DataFrame:
    """The query table `name` as the data owner `owner` opens it for this package."""
    try:
        framed = open_bytes(sealing_private_key(signing_key),
                            base64.b64decode(sealed_b64, validate=True))
    except (nacl.exceptions.CryptoError, ValueError) as exc:
        raise QueryTablesInvalid(f"query table {name!r} is not sealed to {owner}") from exc
    prefix = QUERY_SEAL_DOMAIN + package_sha256.encode("ascii")
    if not framed.startswith(prefix):
        raise QueryTablesInvalid(f"query table {name!r} was sealed for another package")
    try:
        return ipc_to_table(framed[len(prefix):]).to_pandas()
    except NodeError as exc:
        raise QueryTablesInvalid(f"query table {name!r}: {exc}") from exc
