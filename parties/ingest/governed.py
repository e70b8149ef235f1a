"""The health authority's governed copy of the visits, read in place on its node.

Governing (`parties.ingest.authority`) writes it; the secure room builds its
libraries from it on the same node, with the requested fields opened.
"""

import datetime as dt

import pandas as pd

from governance.at_rest import Keyring, open_value
from governance.standardize import COMMON_FIELDS
from parties.runtime.context import NodeContext

VISITS_TABLE = "ha_visits"
ROW_KEY_FIELDS = ("visit_id", "hospital_id")  # identify the record, never sealed
DATA_FIELDS = tuple(f for f in COMMON_FIELDS if f not in ROW_KEY_FIELDS)


def open_column(keyring: Keyring, column: str, values: list, row_keys: list[str],
                 ciphers: dict) -> list:
    return [open_value(v, keyring, VISITS_TABLE, column, k, ciphers)
            if isinstance(v, bytes) else v for v, k in zip(values, row_keys, strict=True)]


def governed_visits(ctx: NodeContext, fields: tuple[str, ...] = DATA_FIELDS) -> pd.DataFrame:
    """The governed copy with `fields` opened (visit_id, hospital_id, visit_ref, p1 always)."""
    cols = ("visit_id", "hospital_id", "visit_ref", "p1", *fields)
    with ctx.store.lock:
        rows = ctx.store.conn.execute(
            f"SELECT {', '.join(cols)} FROM {VISITS_TABLE} ORDER BY visit_id").fetchall()
    frame = pd.DataFrame(rows, columns=list(cols))
    keyring, ciphers = ctx.secrets.keyring, {}
    keys = frame["visit_id"].tolist()
    for f in fields:
        values = open_column(keyring, f, frame[f].tolist(), keys, ciphers)
        if f in ("birth_date", "admission_date", "discharge_date"):
            values = [dt.date.fromisoformat(v) if isinstance(v, str) else v for v in values]
        frame[f] = values
    frame["visit_ref"] = frame["visit_ref"].map(bytes)
    frame["p1"] = frame["p1"].map(bytes)
    return frame
