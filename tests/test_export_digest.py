"""The digest a hospital signs in its data asset registration, as both ends compute it."""

import datetime as dt

import pyarrow as pa

from parties.ingest.registration import export_digest

TABLE = pa.table({
    "visit_id": [f"v{i}" for i in range(1000)],
    "admitted": [dt.date(2026, 1, 1) + dt.timedelta(days=i % 300) for i in range(1000)],
    "fee": [i * 1.25 if i % 7 else None for i in range(1000)],
})


def test_the_digest_does_not_depend_on_how_the_rows_were_batched():
    batched = pa.Table.from_batches(TABLE.to_batches(max_chunksize=37))
    assert export_digest(batched) == export_digest(TABLE)
    assert export_digest(pa.concat_tables([TABLE.slice(0, 400), TABLE.slice(400)])) == (
        export_digest(TABLE))


def test_any_changed_dropped_reordered_or_renamed_value_changes_the_digest():
    base = export_digest(TABLE)
    fees = TABLE.column("fee").to_pylist()
    changed = TABLE.set_column(2, "fee", pa.array([fees[0], 999.0, *fees[2:]]))
    swapped = TABLE.take([1, 0, *range(2, 1000)])
    renamed = TABLE.rename_columns(["visit_id", "admission", "fee"])
    others = [changed, TABLE.slice(0, 999), swapped, renamed]
    assert len({base, *(export_digest(t) for t in others)}) == 1 + len(others)
