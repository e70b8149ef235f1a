"""Standardization reproduces the generator's ground truth exactly."""

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from governance.standardize import (
    COMMON_VISIT_SCHEMA,
    HospitalOverrides,
    InvalidValue,
    MappingIncomplete,
    StandardizationError,
    as_common_model,
    common_model_frame,
    infer_date_format,
    infer_mapping,
    load_overrides,
    name_similarity,
    normalize_icd10,
    standardize_source,
    standardize_sources,
    standardize_to_parquet,
    yuan_to_fen,
)
from parties.ingest.hospital import read_export
from scenarios.claim_check.generator import generate
from tests.test_scan import csv_twins


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    generate(out, hospitals=4, patients=2500, claims=12, seed=21, progress=False,
             chunk_patients=1000)
    return out


def _sources(root: Path) -> dict[str, Path]:
    truth = json.loads((root / "ground_truth" / "schema_truth.json").read_text())
    return {h: root / spec["file"] for h, spec in truth.items()}


def test_standardized_data_equals_ground_truth(generated: Path) -> None:
    table, mappings, _ = standardize_sources(_sources(generated))
    truth = pq.read_table(generated / "ground_truth" / "visits.parquet")
    assert table.schema == COMMON_VISIT_SCHEMA
    assert table.num_rows == truth.num_rows
    assert table.sort_by("visit_id").equals(truth.sort_by("visit_id"))
    assert len(mappings) == 4


def test_mapping_matches_schema_truth_and_skips_decoys(generated: Path) -> None:
    truth = json.loads((generated / "ground_truth" / "schema_truth.json").read_text())
    for hospital, path in _sources(generated).items():
        mapping = standardize_source(path, hospital).mapping
        columns = truth[hospital]["columns"]
        expected = {c: ("visit_id" if v["role"] == "visit_local_id" else v["field"])
                    for c, v in columns.items() if v["field"] or v["role"] == "visit_local_id"}
        assert mapping.columns() == expected, hospital
        assert set(mapping.unmapped) == {c for c, v in columns.items()
                                         if v["role"] in ("decoy", "free_text")}
        assert set(mapping.units.values()) == {truth[hospital]["amount_unit"]}


def test_alignment_reports_the_planted_conflicts(generated: Path) -> None:
    _, _, alignment = standardize_sources(_sources(generated))
    planted = pd.read_csv(generated / "ground_truth" / "conflicts.csv", dtype=str)
    found = {(c.national_id, c.field) for c in alignment.conflicts}
    assert found == set(zip(planted["national_id"], planted["field"], strict=True))
    assert len(found) > 0
    assert alignment.id_inconsistent == []
    assert alignment.persons_in_several_hospitals > 0
    some = alignment.conflicts[0]
    assert len(some.values) >= 2  # the differing values, per hospital


def test_streamed_parquet_equals_in_memory(generated: Path, tmp_path: Path) -> None:
    path = _sources(generated)["hospital-2"]
    out = tmp_path / "h2.parquet"
    standardize_to_parquet(path, "hospital-2", out)
    assert pq.read_table(out).equals(standardize_source(path, "hospital-2").table)
    assert not list(tmp_path.glob("*.partial"))


def test_bad_value_names_column_and_row_and_writes_nothing(generated: Path, tmp_path: Path):
    raw = pd.read_csv(_sources(generated)["hospital-1"], dtype=str)
    raw.loc[7, "admit_date"] = "2025-02-30"
    bad = tmp_path / "hospital-1.csv"
    raw.to_csv(bad, index=False)
    out = tmp_path / "out.parquet"
    with pytest.raises(InvalidValue, match=r"'admit_date' row 7"):
        standardize_to_parquet(bad, "hospital-1", out)
    assert list(tmp_path.iterdir()) == [bad]
    raw = pd.read_csv(_sources(generated)["hospital-1"], dtype=str)
    raw.loc[3, "self_paid"] = "12.345"
    raw.to_csv(bad, index=False)
    with pytest.raises(InvalidValue, match="finer than one fen"):
        standardize_source(bad, "hospital-1")


def test_overrides_map_what_names_cannot(generated: Path, tmp_path: Path) -> None:
    raw = pd.read_csv(_sources(generated)["hospital-1"], dtype=str)
    renamed = raw.rename(columns={"admit_date": "col_17", "self_paid": "amt_c"})
    path = tmp_path / "hospital-1.csv"
    renamed.to_csv(path, index=False)
    with pytest.raises(MappingIncomplete, match="admission_date"):
        standardize_source(path, "hospital-1")
    overrides_file = tmp_path / "overrides.toml"
    overrides_file.write_text(
        '[hospital-1.columns]\ncol_17 = "admission_date"\namt_c = "self_pay_fen"\n'
        '[hospital-1.units]\namt_c = "yuan"\n', encoding="utf-8")
    overrides = load_overrides(overrides_file)
    result = standardize_source(path, "hospital-1", overrides)
    assert result.mapping.fields["admission_date"].source == "override"
    expected = standardize_source(_sources(generated)["hospital-1"], "hospital-1").table
    assert result.table.equals(expected)


def test_override_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "o.toml"
    bad.write_text('[hospital-1.columns]\npid = "passport"\n')
    with pytest.raises(StandardizationError, match=r"hospital-1\.columns"):
        load_overrides(bad)
    bad.write_text('[hospital-1.units]\nx = "dollars"\n')
    with pytest.raises(StandardizationError, match=r"hospital-1\.units\.x"):
        load_overrides(bad)
    assert load_overrides().hospitals == {}
    frame = pd.DataFrame({"a": ["1"]})
    with pytest.raises(StandardizationError, match="unknown columns"):
        infer_mapping(frame, "h", HospitalOverrides(columns={"zzz": "name"}))


@pytest.mark.parametrize(("raw", "code"), [
    ("J189", "J18.9"), ("J18.9", "J18.9"), (" j18.9 ", "J18.9"), ("I10", "I10"),
    ("E119", "E11.9"), ("O80", "O80"), ("S72.00", "S72.00"),
])
def test_normalize_icd10(raw: str, code: str) -> None:
    assert normalize_icd10(raw) == code


def test_normalize_icd10_refuses_garbage() -> None:
    with pytest.raises(InvalidValue):
        normalize_icd10("18.9")


@pytest.mark.parametrize(("raw", "fen"), [
    ("12.5", 1250), ("0.07", 7), ("1234.56", 123456), ("12", 1200), ("12.340", 1234),
    ("-3.5", -350), (1234.56, 123456), (0.1, 10), (7, 700),
])
def test_yuan_to_fen_is_exact(raw: str | float, fen: int) -> None:
    assert yuan_to_fen(raw) == fen


@pytest.mark.parametrize("raw", ["12.345", "abc", "1,234.00", ""])
def test_yuan_to_fen_refuses(raw: str) -> None:
    with pytest.raises(InvalidValue):
        yuan_to_fen(raw)


@given(st.integers(min_value=0, max_value=10**13))
def test_yuan_strings_round_trip(fen: int) -> None:
    assert yuan_to_fen(f"{fen // 100}.{fen % 100:02d}") == fen
    assert yuan_to_fen(f"{fen // 100}.{fen % 100:02d}".rstrip("0").rstrip(".")) == fen


def test_date_format_inference() -> None:
    assert infer_date_format(pd.Series(["05/03/2026", "01/02/2025"])) == "%d/%m/%Y"
    assert infer_date_format(pd.Series(["05/03/2026", "25/02/2025"])) == "%d/%m/%Y"
    assert infer_date_format(pd.Series(["05/03/2026", "02/25/2025"])) == "%m/%d/%Y"
    assert infer_date_format(pd.Series(["20260305"])) == "%Y%m%d"
    assert infer_date_format(pd.Series([dt.date(2026, 3, 5)])) == "native"
    with pytest.raises(StandardizationError):
        infer_date_format(pd.Series(["2026-03-05", "20260305"]))


def test_name_similarity_uses_synonyms_and_fuzzy_names() -> None:
    assert name_similarity("入院日期", "admission_date") == 1.0
    assert name_similarity("admitDate", "admission_date") == 1.0
    assert name_similarity("ADMIT-DATE", "admission_date") == 1.0
    assert name_similarity("admission_dt", "admission_date") >= 0.75
    assert name_similarity("phone_ext", "admission_date") < 0.5


def test_pandas_round_trip_of_the_common_model(generated: Path) -> None:
    table = pq.read_table(generated / "ground_truth" / "visits.parquet")
    frame = common_model_frame(table)
    assert isinstance(frame["birth_date"].iloc[0], dt.date)
    assert as_common_model(frame).equals(table)
    with pytest.raises(StandardizationError):
        as_common_model(frame.drop(columns=["name"]))


def test_gb18030_and_bom_exports_standardize_and_ingest_like_their_utf8_twin(
        generated: Path, tmp_path: Path) -> None:
    twins = csv_twins(generated, tmp_path)
    done = {e: standardize_source(p, "hospital-2") for e, p in twins.items()}
    truth = pq.read_table(generated / "ground_truth" / "visits.parquet")
    expected = truth.filter(pc.equal(truth["hospital_id"], "hospital-2")).sort_by("visit_id")
    for encoding, source in done.items():
        assert source.table.sort_by("visit_id").equals(expected), encoding
        assert source.mapping == done["utf-8"].mapping, encoding
        assert "身份证号" in source.mapping.columns()
    assert standardize_source(twins["gb18030"], "hospital-2", encoding="gb18030").table.equals(
        done["utf-8"].table)
    # What the hospital reads and sends to the health authority (the ingest path).
    exported = {e: read_export(p) for e, p in twins.items()}
    assert exported["gb18030"].equals(exported["utf-8"])
    assert exported["utf-8-sig"].equals(exported["utf-8"])
    assert read_export(twins["gb18030"], "gb18030").equals(exported["utf-8"])
