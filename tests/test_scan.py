"""Asset scan: content-based detection finds every planted sensitive column, no decoy."""

import datetime as dt
import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from governance.scan import (
    ScanError,
    SourceNotFound,
    UnreadableText,
    is_address,
    is_icd10,
    is_mobile_phone,
    is_national_id,
    is_person_name,
    parse_date_value,
    render_report,
    scan_batches,
    scan_frame,
    scan_path,
    text_encoding,
)
from scenarios.claim_check.generator import generate

TWIN_ENCODINGS = ("utf-8", "utf-8-sig", "gb18030")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    generate(out, hospitals=4, patients=300, claims=24, seed=5, progress=False)
    return out


def test_finds_every_planted_sensitive_column_and_no_decoy(generated: Path) -> None:
    truth = json.loads((generated / "ground_truth" / "schema_truth.json").read_text())
    report = scan_path(generated / "raw")
    assert {t.table for t in report.tables} == set(truth)
    for table in report.tables:
        columns = truth[table.table]["columns"]
        found = {c.name: c.sensitive_type for c in table.columns if c.sensitive_type}
        planted = {name: c["sensitive_type"] for name, c in columns.items() if c["sensitive_type"]}
        assert found == planted, table.table
        for column in table.columns:
            embedded = columns[column.name].get("embedded_type")
            assert column.contains_sensitive == ([embedded] if embedded else []), column.name
    decoys = [(t, c) for t, h in truth.items() for c, v in h["columns"].items()
              if v["role"] == "decoy"]
    assert len(decoys) >= 10


def test_inventory_numbers(generated: Path) -> None:
    report = scan_path(generated / "raw" / "hospital-3.jsonl")
    [table] = report.tables
    raw = pd.read_json(generated / "raw" / "hospital-3.jsonl", lines=True, dtype=False)
    assert table.rows == len(raw)
    contact = table.column("contact")
    assert contact.nulls == raw["contact"].isna().sum()
    assert contact.null_share == pytest.approx(contact.nulls / len(raw), abs=1e-4)
    assert table.column("visitNo").distinct_estimate == len(raw)
    assert table.column("sex").distinct_estimate == 2
    assert table.column("id_card_checked").content_kind == "boolean"
    assert table.column("fee_total").content_kind == "decimal"
    assert table.column("inDate").content_kind == "date"
    json.loads(report.to_json())
    render_report(report)


@pytest.mark.parametrize("value", ["11010519491231002X", "11010519491231002x",
                                   "440524188001010014"])
def test_national_id_validator_accepts(value: str) -> None:
    assert is_national_id(value)


@pytest.mark.parametrize("value", [
    "110105194912310021",  # wrong check character
    "110105194902300026",  # 30 February
    "990105194912310023",  # no province 99
    "11010519491231002",  # 17 characters
    "320500202512228946",  # an invoice number shaped like an ID
])
def test_national_id_validator_rejects(value: str) -> None:
    assert not is_national_id(value)


def test_national_id_in_the_future_is_rejected() -> None:
    assert is_national_id("11010519491231002X", today=dt.date(2000, 1, 1))
    assert not is_national_id("11010519491231002X", today=dt.date(1949, 12, 30))


def test_value_validators() -> None:
    assert is_mobile_phone("13812345678") and is_mobile_phone("+86 138-1234-5678")
    assert not is_mobile_phone("10012345678") and not is_mobile_phone("12345678901")
    assert not is_mobile_phone("1381234567")
    assert is_person_name("王伟") and is_person_name("欧阳娜娜") and is_person_name("顾晓红")
    for not_a_name in ("呼吸内科", "康复医学科", "骨科", "王府井路", "Wang Wei", "王"):
        assert not is_person_name(not_a_name), not_a_name
    assert is_address("江苏省苏州市姑苏区人民路123号")
    assert is_address("苏州市工业园区星湖街88号3幢1202室")
    for not_an_address in ("住院部3号楼5层", "姑苏区", "人民路", "呼吸内科"):
        assert not is_address(not_an_address), not_an_address
    assert is_icd10("J18.9") and is_icd10("J189") and is_icd10("I10")
    assert not is_icd10("V00000001") and not is_icd10("18.9")
    assert parse_date_value("05/03/2026") == dt.date(2026, 3, 5)
    assert parse_date_value("20260305") == dt.date(2026, 3, 5)
    assert parse_date_value("2026-03-05") == dt.date(2026, 3, 5)
    assert parse_date_value("20261305") is None


def test_threshold_decides(tmp_path: Path) -> None:
    ids = ["11010519491231002X", "440524188001010014"] * 50
    mixed = pd.DataFrame({"ref": ids[:50] + [f"A{i:05d}" for i in range(50)]})
    assert scan_frame(mixed, "t").column("ref").sensitive_type is None
    assert scan_frame(mixed, "t").column("ref").matches["national_id"] == 0.5
    assert scan_frame(mixed, "t", threshold=0.4).column("ref").sensitive_type == "national_id"


def test_birth_dates_are_told_from_event_dates() -> None:
    rng = np.random.default_rng(0)
    born = [dt.date(1940, 1, 1) + dt.timedelta(days=int(d)) for d in rng.integers(0, 25000, 300)]
    visits = [dt.date(2025, 1, 1) + dt.timedelta(days=int(d)) for d in rng.integers(0, 400, 300)]
    profile = scan_frame(pd.DataFrame({"a": born, "b": visits}), "t")
    assert profile.column("a").sensitive_type == "birth_date"
    assert profile.column("b").sensitive_type is None
    assert profile.column("b").content_kind == "date"


def test_sqlite_tables_and_embedded_identifiers(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE tokens (token TEXT, payload TEXT, blob BLOB)")
        rows = [(f"{i:064x}", json.dumps({"n": i}), bytes([i % 256]) * 16) for i in range(999)]
        rows.append(("ff" * 32, json.dumps({"national_id": "11010519491231002X"}), b"\x00"))
        conn.executemany("INSERT INTO tokens VALUES (?, ?, ?)", rows)
        conn.execute("CREATE TABLE people (who TEXT, tel TEXT)")
        conn.executemany("INSERT INTO people VALUES (?, ?)",
                         [("王伟", "13812345678"), ("李娜", "13912345678")] * 20)
    report = scan_path(db, full=True)
    assert [t.table for t in report.tables] == ["store.sqlite:people", "store.sqlite:tokens"]
    people, tokens = report.tables
    assert people.column("who").sensitive_type == "name"
    assert people.column("tel").sensitive_type == "phone"
    assert all(c.sensitive_type is None for c in tokens.columns)
    # One identifier hidden in 1,000 JSON payloads is found when every value is checked.
    assert tokens.column("payload").embedded == {"national_id": 0.001}
    assert tokens.rows == 1000
    assert tokens.column("blob").content_kind in ("binary", "text")


def test_streaming_batches_give_a_uniform_sample_and_counts() -> None:
    values = [f"{i:06d}" for i in range(30_000)]
    batches = [pd.DataFrame({"v": values[i:i + 7000]}) for i in range(0, 30_000, 7000)]
    profile = scan_batches(batches, "t", sample_size=500)
    column = profile.column("v")
    assert profile.rows == 30_000 and column.sampled == 500
    assert column.distinct_estimate == pytest.approx(30_000, rel=0.06)


def test_bad_sources_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound):
        scan_path(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ScanError):
        scan_path(tmp_path / "notes.txt")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ScanError, match=r"bad\.jsonl:2"):
        scan_path(tmp_path / "bad.jsonl")
    (tmp_path / "fake.sqlite").write_bytes(b"not a database at all" * 10)
    with pytest.raises(ScanError):
        scan_path(tmp_path / "fake.sqlite")
    with pytest.raises(ScanError):
        scan_frame(pd.DataFrame({"a": [1]}), "t", threshold=0)


# --- text encodings -----------------------------------------------------------------------


def csv_twins(generated: Path, out: Path) -> dict[str, Path]:
    """hospital-2's export (Chinese column names and values) as a CSV file in UTF-8, in
    UTF-8 with a BOM and in GB18030, as Chinese hospital systems export it."""
    frame = pd.read_parquet(generated / "raw" / "hospital-2.parquet")
    twins = {}
    for encoding in TWIN_ENCODINGS:
        path = out / encoding / "hospital-2.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False, encoding=encoding)
        twins[encoding] = path
    return twins


def test_gb18030_and_bom_csv_scan_like_their_utf8_twin(generated: Path, tmp_path: Path) -> None:
    twins = csv_twins(generated, tmp_path)
    assert twins["gb18030"].read_bytes() != twins["utf-8"].read_bytes()
    assert {e: text_encoding(p) for e, p in twins.items()} == {
        "utf-8": "utf-8", "utf-8-sig": "utf-8-sig", "gb18030": "gb18030"}
    profiles = {e: scan_path(p).tables[0].model_dump(exclude={"source"})
                for e, p in twins.items()}
    assert profiles["gb18030"] == profiles["utf-8-sig"] == profiles["utf-8"]
    flagged = {c["name"]: c["sensitive_type"] for c in profiles["gb18030"]["columns"]}
    assert flagged["身份证号"] == "national_id" and flagged["姓名"] == "name"
    # Given explicitly, the encoding reads the same rows (a BOM is skipped either way).
    assert scan_path(twins["gb18030"], encoding="GB18030").tables[0].model_dump(
        exclude={"source"}) == profiles["utf-8"]
    assert scan_path(twins["utf-8-sig"], encoding="utf-8").tables[0].model_dump(
        exclude={"source"}) == profiles["utf-8"]


def test_gbk_text_is_read_as_gb18030(tmp_path: Path) -> None:
    text = "姓名,住址\n张三,江苏省苏州市姑苏区人民路1号\n"
    (tmp_path / "gbk.csv").write_bytes(text.encode("gbk"))
    (tmp_path / "gbk.jsonl").write_bytes('{"姓名": "李四"}\n'.encode("gbk"))
    assert text_encoding(tmp_path / "gbk.csv") == "gb18030"
    [table] = scan_path(tmp_path / "gbk.csv").tables
    assert [c.name for c in table.columns] == ["姓名", "住址"]
    assert scan_path(tmp_path / "gbk.jsonl").tables[0].columns[0].name == "姓名"


def test_a_wrong_or_unknown_encoding_is_a_clear_error(generated: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from scenarios.cli import app

    gb18030 = csv_twins(generated, tmp_path)["gb18030"]
    with pytest.raises(UnreadableText, match="not utf-8 text"):
        scan_path(gb18030, encoding="utf-8")
    with pytest.raises(UnreadableText, match="unknown encoding"):
        scan_path(gb18030, encoding="no-such-codec")
    (tmp_path / "noise.csv").write_bytes(b"a,b\n\xff\xfe\x80,1\n")
    with pytest.raises(UnreadableText, match="neither UTF-8 nor GB18030"):
        scan_path(tmp_path / "noise.csv")
    for args in (["scan", str(gb18030), "--encoding", "utf-8"],
                 ["standardize", f"hospital-2={gb18030}", "--out", str(tmp_path / "std"),
                  "--encoding", "utf-8"]):
        result = CliRunner().invoke(app, ["govern", *args])
        assert result.exit_code == 2, result.output
        said = " ".join(result.output.split())  # the console wraps at its width
        assert "UnreadableText" in said and "not utf-8 text" in said
        assert "codec can't decode" not in result.output
