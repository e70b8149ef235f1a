"""What the operator keeps in circulation, read in place by the capabilities on its node.

The operator's visits arrive through `parties.ingest.circulation` (its routes);
the claim check and the statistics read them here, on the same
node, with the top-grade fields opened under the node's keys.
"""

import datetime as dt
from collections.abc import Sequence

import pandas as pd

from governance.at_rest import open_value
from parties.runtime.context import NodeContext

VISITS_TABLE = "circ_visits"
PERSONS_TABLE = "circ_persons"
#: the fields of a published visit, in order (visit_ref and p1 are 32-byte binaries)
CIRCULATION_FIELDS: tuple[str, ...] = (
    "visit_ref", "p1", "hospital_id", "admission_date", "discharge_date", "diagnosis_code",
    "total_fen", "covered_fen", "self_pay_fen",
)
DATE_FIELDS = ("admission_date", "discharge_date")
INT_FIELDS = ("total_fen", "covered_fen", "self_pay_fen")


def read_visits(ctx: NodeContext, visit_refs: Sequence[bytes] | None = None) -> pd.DataFrame:
    """The operator's circulation rows (top-grade fields opened), all or those of `visit_refs`.

    Raises `governance.at_rest.CiphertextInvalid` if a stored ciphertext was altered.
    """
    cols = ", ".join(CIRCULATION_FIELDS)
    with ctx.store.lock:
        if visit_refs is None:
            rows = ctx.store.conn.execute(f"SELECT {cols} FROM {VISITS_TABLE}").fetchall()
        else:
            rows = []
            refs = list(visit_refs)
            for start in range(0, len(refs), 500):
                part = refs[start:start + 500]
                rows += ctx.store.conn.execute(
                    f"SELECT {cols} FROM {VISITS_TABLE} WHERE visit_ref IN "
                    f"({', '.join('?' * len(part))})", part,
                ).fetchall()
    frame = pd.DataFrame(rows, columns=list(CIRCULATION_FIELDS))
    if frame.empty:
        return frame
    keyring = ctx.secrets.keyring
    ciphers: dict = {}
    for name in CIRCULATION_FIELDS[2:]:
        values = frame[name].tolist()
        if any(isinstance(v, bytes) for v in values):
            values = [open_value(v, keyring, VISITS_TABLE, name, bytes(r).hex(), ciphers)
                      if isinstance(v, bytes) else v
                      for v, r in zip(values, frame["visit_ref"], strict=True)]
        if name in DATE_FIELDS:
            values = [dt.date.fromisoformat(v) if isinstance(v, str) else v for v in values]
        frame[name] = values
    frame["visit_ref"] = frame["visit_ref"].map(bytes)
    frame["p1"] = frame["p1"].map(bytes)
    return frame
