"""The synthetic sample library: no real row or identifier in it; fidelity and DCR reported."""

import datetime as dt
import itertools

import numpy as np
import pandas as pd
import pytest

from governance.synthetic import (
    LibraryError,
    SynthesisError,
    SynthesisSpec,
    evaluate_sample,
    infer_spec,
    read_library_info,
    sample_test_rows,
    synthesize,
    write_library,
)
from scenarios.claim_check.generator import generate
from scenarios.claim_check.national_id import is_valid

IDENTIFIERS = ["visit_id", "national_id", "name", "phone", "address"]


@pytest.fixture(scope="module")
def real_visits(tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("gen") / "data"
    generate(out, patients=2500, claims=0, seed=11, progress=False)
    return pd.read_parquet(out / "ground_truth" / "visits.parquet")


@pytest.fixture(scope="module")
def sample(real_visits):
    return synthesize(real_visits, 800, seed=5)


def quasi_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in IDENTIFIERS]


def test_no_synthetic_row_equals_a_real_row(real_visits, sample):
    columns = quasi_columns(real_visits)
    # Independent of the library's hashing: a plain inner join on every non-identifier column.
    joined = sample.table[columns].merge(real_visits[columns].drop_duplicates(), on=columns)
    assert len(joined) == 0
    assert sample.report.exact_matches == 0
    assert len(sample.table) == 800


def test_identifiers_are_fresh_unique_and_format_valid(real_visits, sample):
    table = sample.table
    for column in IDENTIFIERS:
        assert not table[column].isin(set(real_visits[column])).any(), column
        assert table[column].is_unique, column
    assert table["national_id"].map(is_valid).all()
    births = table["birth_date"].map(lambda d: d.strftime("%Y%m%d"))
    assert (table["national_id"].str[6:14] == births).all()
    odd = table["national_id"].str[16].astype(int) % 2 == 1
    assert (odd == (table["sex"] == "M")).all()
    assert table["phone"].str.fullmatch(r"1\d{10}").all()
    assert (table["visit_id"].str.split(":").str[0] == table["hospital_id"]).all()


def test_schema_and_constraints_are_kept(real_visits, sample):
    table = sample.table
    assert list(table.columns) == list(real_visits.columns)
    assert (table["total_fen"] == table["covered_fen"] + table["self_pay_fen"]).all()
    assert (table["discharge_date"] >= table["admission_date"]).all()
    assert isinstance(table["admission_date"].iloc[0], dt.date)
    assert table["total_fen"].dtype == np.int64
    assert set(table["diagnosis_code"]) <= set(real_visits["diagnosis_code"])


def test_fidelity_and_privacy_are_reported(sample):
    report = sample.report
    assert set(report.fidelity) == {"hospital_id", "birth_date", "sex", "admission_date",
                                    "discharge_date", "diagnosis_code", "total_fen",
                                    "covered_fen", "self_pay_fen"}
    for name, item in report.fidelity.items():
        assert item.metric == ("tvd" if name in {"hospital_id", "sex", "diagnosis_code"}
                               else "ks")
        assert 0 <= item.value < 0.15, (name, item.value)
    assert report.correlation_max_abs_diff < 0.15
    assert report.correlation_mean_abs_diff < 0.05
    assert report.dcr_min >= report.dcr_threshold > 0
    assert report.dcr_p5 <= report.dcr_median
    assert report.rows_below_threshold == 0
    assert report.privacy_ok


def test_copula_keeps_the_strong_money_correlation(real_visits, sample):
    real = real_visits[["covered_fen", "self_pay_fen"]].corr(method="spearman").iloc[0, 1]
    syn = sample.table[["covered_fen", "self_pay_fen"]].corr(method="spearman").iloc[0, 1]
    assert real > 0.5
    assert abs(real - syn) < 0.1


def test_same_seed_same_sample(real_visits, sample):
    again = synthesize(real_visits, 800, seed=5)
    pd.testing.assert_frame_equal(again.table, sample.table)
    other = synthesize(real_visits, 800, seed=6)
    assert not other.table["total_fen"].equals(sample.table["total_fen"])


def test_metrics_can_fail_a_copy_of_the_real_table(real_visits):
    spec = infer_spec(real_visits)
    report = evaluate_sample(real_visits, real_visits.copy(), spec)
    assert report.exact_matches == len(real_visits)
    assert report.dcr_min == 0
    assert not report.privacy_ok
    assert all(item.value == 0 for item in report.fidelity.values())


def test_real_combinations_are_dropped_and_redrawn():
    # 6 of the 9 (a, b) combinations exist in the real table; a sample must use the other 3.
    present = [("p", "x"), ("p", "y"), ("q", "y"), ("q", "z"), ("r", "x"), ("r", "z")]
    rows = [combo for combo in present for _ in range(30)]
    real = pd.DataFrame(rows, columns=["a", "b"])
    result = synthesize(real, 60, seed=1, spec=SynthesisSpec())
    drawn = set(zip(result.table["a"], result.table["b"], strict=True))
    assert drawn <= set(itertools.product("pqr", "xyz")) - set(present)
    assert result.report.dropped_exact_matches > 0
    assert result.report.exact_matches == 0


def test_unreachable_privacy_floor_is_a_typed_error():
    real = pd.DataFrame({"a": ["p", "q"] * 20, "b": ["x", "y"] * 20})
    complete = pd.concat([real, pd.DataFrame({"a": ["p", "q"], "b": ["y", "x"]})])
    with pytest.raises(SynthesisError, match="rounds"):
        synthesize(complete, 10, seed=1, spec=SynthesisSpec())


def test_bad_spec_is_refused(real_visits):
    with pytest.raises(SynthesisError, match="lacks"):
        synthesize(real_visits, 10, seed=1, spec=SynthesisSpec(identifiers={"iban": "token"}))


def test_token_columns_get_format_preserving_fakes():
    rng = np.random.default_rng(0)
    real = pd.DataFrame({
        "person_token": ["".join(rng.choice(list("0123456789abcdef"), 64)) for _ in range(200)],
        "amount": rng.integers(100, 10_000, 200),
    })
    spec = infer_spec(real)
    assert spec.identifiers == {"person_token": "token"}
    table = synthesize(real, 50, seed=2, spec=spec).table
    assert table["person_token"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert not table["person_token"].isin(set(real["person_token"])).any()


def test_test_library_rows_are_sampled_then_masked(real_visits):
    def mask(frame: pd.DataFrame) -> pd.DataFrame:
        frame["national_id"] = frame["national_id"].str[:6] + "********" + "****"
        frame["name"] = frame["name"].str[0] + "*"
        return frame

    rows = sample_test_rows(real_visits, 50, seed=3, mask=mask)
    assert len(rows) == 50
    assert rows["national_id"].str.contains(r"\*{12}").all()
    assert rows["visit_id"].isin(set(real_visits["visit_id"])).all()
    with pytest.raises(SynthesisError):
        sample_test_rows(real_visits, 5, seed=3, mask=lambda f: f.iloc[:1])


def test_test_library_defaults_to_the_grading_policy_masks(real_visits):
    rows = sample_test_rows(real_visits, 40, seed=8)
    assert len(rows) == 40
    for column in ("national_id", "name", "phone"):
        assert not rows[column].isin(set(real_visits[column])).any(), column
    assert rows["national_id"].str[:6].isin(set(real_visits["national_id"].str[:6])).all()


def test_library_round_trip(tmp_path, real_visits, sample):
    info = write_library(tmp_path / "lib", "sample", {"visits": sample.table},
                         reports={"visits": sample.report})
    assert read_library_info(tmp_path / "lib") == info
    assert info.reports["visits"]["exact_matches"] == 0
    back = pd.read_parquet(tmp_path / "lib" / "visits.parquet")
    assert len(back) == len(sample.table)
    with pytest.raises(LibraryError):
        write_library(tmp_path / "lib", "sample", {"visits": sample.table})
    with pytest.raises(LibraryError):
        read_library_info(tmp_path / "missing")
