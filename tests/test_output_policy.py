"""Output policy: group suppression under k, exact verdict columns, row-level refusal."""

import datetime as dt
import math
from decimal import Decimal

import pandas as pd
import pytest

from governance.output_policy import (
    MODEL_MAX_ROWS,
    IdentifierInOutput,
    OutputSchemaMismatch,
    RowCapExceeded,
    RowLevelOutputRefused,
    VerdictColumnsMismatch,
    VerdictRowsMismatch,
    apply_output_policy,
    conform_to_schema,
)
from governance.packages import PackageOutput


def aggregate_output(min_group_size=None, row_level=False, max_rows=None) -> PackageOutput:
    return PackageOutput(
        disclosure="aggregate", count_column="n", min_group_size=min_group_size,
        row_level=row_level, max_rows=max_rows,
        columns=[{"name": "diagnosis", "type": "string"}, {"name": "n", "type": "int64"},
                 {"name": "mean_fen", "type": "float64"}],
    )


VERDICT = PackageOutput(
    disclosure="verdict",
    columns=[{"name": "claim_id", "type": "string"}, {"name": "visit_found", "type": "bool"},
             {"name": "payable", "type": "decimal", "scale": 2, "tolerance": "0.01",
              "maximum": "1000000000000000"}],
)
CLAIMS = {"C1", "C2"}


def groups(counts: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"diagnosis": [f"D{i:02d}" for i in range(len(counts))],
                         "n": counts, "mean_fen": [100.0] * len(counts)})


def test_groups_under_k_are_suppressed_and_counted():
    result = apply_output_policy(groups([3, 9, 10, 11, 250, 1]), aggregate_output(),
                                 row_level_max_rows=None)
    assert result.k == 10
    assert result.suppressed_groups == 3
    assert result.table["n"].tolist() == [10, 11, 250]
    assert result.table["diagnosis"].tolist() == ["D02", "D03", "D04"]


def test_manifest_floor_raises_k_and_contract_k_cannot_be_undercut():
    result = apply_output_policy(groups([10, 19, 20]), aggregate_output(min_group_size=20),
                                 row_level_max_rows=None)
    assert (result.k, result.suppressed_groups, result.table["n"].tolist()) == (20, 2, [20])
    stricter = apply_output_policy(groups([10, 19, 20]), aggregate_output(min_group_size=5),
                                   row_level_max_rows=None, k=10)
    assert (stricter.k, stricter.suppressed_groups) == (10, 0)


def verdicts(**extra) -> pd.DataFrame:
    frame = pd.DataFrame({"claim_id": ["C1", "C2"], "visit_found": [True, False],
                          "payable": [Decimal("49.09"), Decimal("0.00")]})
    for name, values in extra.items():
        frame[name] = values
    return frame


def test_verdict_with_exactly_the_declared_columns_passes_in_declared_order():
    shuffled = verdicts()[["payable", "claim_id", "visit_found"]]
    result = apply_output_policy(shuffled, VERDICT, row_level_max_rows=None, claim_ids=CLAIMS)
    assert list(result.table.columns) == ["claim_id", "visit_found", "payable"]
    assert result.table["payable"].tolist() == [Decimal("49.09"), Decimal("0.00")]


def test_verdict_with_an_extra_or_missing_column_is_refused():
    with pytest.raises(VerdictColumnsMismatch, match="undeclared"):
        apply_output_policy(verdicts(self_pay_fen=[1, 2]), VERDICT, row_level_max_rows=None)
    with pytest.raises(VerdictColumnsMismatch, match="missing"):
        apply_output_policy(verdicts().drop(columns=["payable"]), VERDICT,
                            row_level_max_rows=None)


@pytest.mark.parametrize(
    ("column", "values"),
    [
        ("payable", [49.09, 0.0]),  # money as float
        ("payable", [Decimal("49.091"), Decimal("0")]),  # more places than declared
        ("visit_found", [1, 0]),
        ("claim_id", [1, 2]),
        ("claim_id", ["C1", None]),
    ],
)
def test_wrong_types_are_refused(column, values):
    frame = verdicts()
    frame[column] = values
    with pytest.raises(OutputSchemaMismatch) as caught:
        conform_to_schema(frame, VERDICT)
    assert caught.value.http_status == 422


def test_dates_must_be_whole_days():
    output = PackageOutput(disclosure="model", columns=[{"name": "day", "type": "date"}])
    ok = conform_to_schema(pd.DataFrame({"day": pd.to_datetime(["2025-01-02"])}), output)
    assert ok["day"].tolist() == [dt.date(2025, 1, 2)]
    with pytest.raises(OutputSchemaMismatch):
        conform_to_schema(pd.DataFrame({"day": pd.to_datetime(["2025-01-02 10:00"])}), output)


def test_row_level_output_needs_manifest_and_contract_and_keeps_under_both_caps():
    output = aggregate_output(row_level=True)
    with pytest.raises(RowLevelOutputRefused) as caught:
        apply_output_policy(groups([50]), output, row_level_max_rows=None)
    assert caught.value.http_status == 403
    assert len(apply_output_policy(groups([50]), output, row_level_max_rows=1).table) == 1
    with pytest.raises(RowCapExceeded):  # the contract's cap
        apply_output_policy(groups([50, 60, 70]), output, row_level_max_rows=2)
    declared = aggregate_output(row_level=True, max_rows=2)
    assert len(apply_output_policy(groups([50, 60]), declared, row_level_max_rows=5).table) == 2
    with pytest.raises(RowCapExceeded):  # the manifest's, under a looser contract
        apply_output_policy(groups([50, 60, 70]), declared, row_level_max_rows=5)


@pytest.mark.parametrize("change", ["missing", "extra", "duplicated", "foreign", "no_ids"])
def test_a_verdict_is_exactly_one_row_per_input_claim(change):
    frame = {"missing": verdicts().iloc[:1],
             "extra": pd.concat([verdicts(), verdicts().iloc[:1].assign(claim_id="C3")]),
             "duplicated": pd.concat([verdicts(), verdicts().iloc[:1]]),
             "foreign": verdicts().assign(claim_id=["C1", "C9"]),
             "no_ids": verdicts()}[change]
    with pytest.raises(VerdictRowsMismatch) as caught:
        apply_output_policy(frame, VERDICT, row_level_max_rows=None,
                            claim_ids=None if change == "no_ids" else CLAIMS)
    assert caught.value.http_status == 422
    assert "C9" not in str(caught.value) and "C3" not in str(caught.value)


def test_amounts_are_released_at_the_declared_tolerance_and_range():
    coarse = PackageOutput(disclosure="verdict", columns=[
        {"name": "claim_id", "type": "string"},
        {"name": "payable", "type": "decimal", "scale": 2, "tolerance": "10", "maximum": "100"}])
    table = pd.DataFrame({"claim_id": ["C1", "C2", "C3"],
                          "payable": [Decimal("14.99"), Decimal("15.00"), Decimal("25.00")]})
    result = apply_output_policy(table, coarse, row_level_max_rows=None,
                                 claim_ids={"C1", "C2", "C3"})
    assert result.table["payable"].tolist() == [Decimal("10.00"), Decimal("20.00"),
                                                Decimal("20.00")]  # half to even
    assert coarse.bits_per_claim == pytest.approx(math.log2(11))
    for bad in (Decimal("105.01"), Decimal("-5.01")):  # rounded: 110 and -10
        with pytest.raises(OutputSchemaMismatch, match="outside"):
            apply_output_policy(table.assign(payable=[bad] * 3), coarse,
                                row_level_max_rows=None, claim_ids={"C1", "C2", "C3"})
    floats = PackageOutput(disclosure="model", columns=[
        {"name": "mean", "type": "float64", "tolerance": "0.5"}])
    rounded = apply_output_policy(pd.DataFrame({"mean": [1.26, 1.74, 2.2]}), floats,
                                  row_level_max_rows=None)
    assert rounded.table["mean"].tolist() == [1.5, 1.5, 2.0]


@pytest.mark.parametrize("columns", [
    [{"name": "visit_found", "type": "bool"}],  # no claim_id
    [{"name": "claim_id", "type": "string"}, {"name": "birth_date", "type": "date"}],
    [{"name": "claim_id", "type": "string"}, {"name": "sex", "type": "string"}],
    [{"name": "claim_id", "type": "string"}, {"name": "fee", "type": "int64"}],
    [{"name": "claim_id", "type": "string"}, {"name": "payable", "type": "decimal", "scale": 2}],
])
def test_row_level_fields_cannot_pass_as_a_verdict(columns):
    with pytest.raises(ValueError, match="verdict"):
        PackageOutput(disclosure="verdict", columns=columns)


def test_identifier_values_never_leave_without_row_level_permission():
    frame = verdicts()
    frame["claim_id"] = ["320505199001011234", "C2"]
    with pytest.raises(IdentifierInOutput):
        apply_output_policy(frame, VERDICT, row_level_max_rows=None,
                            identifier_values={"320505199001011234"},
                            claim_ids=set(frame["claim_id"]))
    clean = apply_output_policy(verdicts(), VERDICT, row_level_max_rows=None,
                                identifier_values={"320505199001011234"}, claim_ids=CLAIMS)
    assert len(clean.table) == 2


def test_output_must_be_a_dataframe():
    with pytest.raises(OutputSchemaMismatch):
        conform_to_schema([{"claim_id": "C1"}], VERDICT)


NATIONAL_ID = "32050519900101123X"
PHONE = "13812345678"
OTHER_IDS = [f"3205051990010{i:04d}X" for i in range(200)] + ["hospital-1:V00000042"]
TRANSFORMS = {
    "embedded_in_claim_id": f"C-{NATIONAL_ID}-01",
    "reversed": NATIONAL_ID[::-1],
    "hex": NATIONAL_ID.encode().hex(),
    "base64": "MzIwNTA1MTk5MDAxMDExMjNY",
    "padded": f"   {NATIONAL_ID}   ",
    "full_width": "".join(chr(ord(c) + 0xFEE0) for c in NATIONAL_ID),
    "zero_width": "\u200b".join(NATIONAL_ID),
    "lower_case_with_dashes": "3205-0519-9001-0112-3x",
    "visit_id_spaced": "hospital 1 V00000042",
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_identifiers_are_refused_embedded_or_transformed(name):
    value = TRANSFORMS[name]
    assert value not in {NATIONAL_ID, *OTHER_IDS}  # the exact-match rule alone let it pass
    table = pd.DataFrame({"claim_id": [value], "visit_found": [True],
                          "payable": [Decimal("1.00")]})
    with pytest.raises(IdentifierInOutput):
        apply_output_policy(table, VERDICT, row_level_max_rows=None,
                            identifier_values=[NATIONAL_ID, *OTHER_IDS], claim_ids={value})


@pytest.mark.parametrize("payable", [Decimal("320505199001011.23"), Decimal("13812345678.00")],
                         ids=["national_id_digits", "phone"])
def test_identifiers_as_numbers_are_refused(payable):
    table = pd.DataFrame({"claim_id": ["C1"], "visit_found": [True], "payable": [payable]})
    with pytest.raises(IdentifierInOutput):
        apply_output_policy(table, VERDICT, row_level_max_rows=None,
                            identifier_values=[NATIONAL_ID, PHONE], claim_ids={"C1"})
    numbers = pd.DataFrame({"diagnosis": ["D1"], "n": [int(str(payable).split(".")[0][:15])],
                            "mean_fen": [float(payable)]})
    with pytest.raises(IdentifierInOutput):
        apply_output_policy(numbers, aggregate_output(), row_level_max_rows=None, k=1,
                            identifier_values=[NATIONAL_ID, PHONE])


def test_ordinary_verdicts_and_aggregates_are_not_mistaken_for_identifiers():
    verdict = pd.DataFrame({"claim_id": [f"C{i:05d}" for i in range(50)],
                            "visit_found": [True] * 50,
                            "payable": [Decimal("1234567.89")] * 50})
    apply_output_policy(verdict, VERDICT, row_level_max_rows=None,
                        identifier_values=[NATIONAL_ID, PHONE, *OTHER_IDS],
                        claim_ids=set(verdict["claim_id"]))
    apply_output_policy(groups([12, 40]), aggregate_output(), row_level_max_rows=None,
                        identifier_values=[NATIONAL_ID, PHONE, *OTHER_IDS])


def test_a_rounded_amount_stays_within_the_maximum_and_the_declared_values():
    """rev19: rounding after the range check released 1200 under a maximum of 1000, a
    third value where bits_per_claim counts two."""
    out = PackageOutput(disclosure="verdict", columns=[
        {"name": "claim_id", "type": "string"},
        {"name": "payable", "type": "decimal", "scale": 2, "tolerance": "600",
         "maximum": "1000.00"}])
    assert out.bits_per_claim == 1.0
    ids = {"a", "b", "c"}
    table = pd.DataFrame({"claim_id": ["a", "b", "c"],
                          "payable": [Decimal("0"), Decimal("600"), Decimal("1000.00")]})
    with pytest.raises(OutputSchemaMismatch, match="outside"):
        apply_output_policy(table, out, row_level_max_rows=None, claim_ids=ids)
    for values in ([Decimal("-0.00"), Decimal("0.00"), Decimal("899.99")],
                   [Decimal("-299"), Decimal("299.99"), Decimal("600")]):
        released = apply_output_policy(table.assign(payable=values), out,
                                       row_level_max_rows=None, claim_ids=ids)
        assert {str(v) for v in released.table["payable"]} <= {"0.00", "600.00"}


def test_rows_are_released_in_a_canonical_order():
    """rev19: the package's row order would carry log2(n!) bits; every permutation of
    the same rows is released as one table (-0.0 and 0.0 are one value)."""
    ids = [f"C{i}" for i in range(8)]
    verdicts = pd.DataFrame({"claim_id": ids, "visit_found": [i % 2 == 0 for i in range(8)],
                             "payable": [Decimal(i) for i in range(8)]})
    model = PackageOutput(disclosure="model", columns=[
        {"name": "hospital", "type": "string"}, {"name": "beta", "type": "float64"},
        {"name": "day", "type": "date"}])
    rows = pd.DataFrame({"hospital": ["h2", "h1", "h1", "h2"], "beta": [0.0, 0.5, -0.0, 0.0],
                         "day": [dt.date(2025, 1, d) for d in (3, 1, 2, 3)]})
    released_verdicts, released_models = set(), set()
    for seed in range(6):
        shuffled = verdicts.sample(frac=1, random_state=seed)
        got = apply_output_policy(shuffled, VERDICT, row_level_max_rows=None,
                                  claim_ids=set(ids)).table
        assert got["claim_id"].tolist() == ids
        released_verdicts.add(got.to_json())
        released_models.add(apply_output_policy(rows.sample(frac=1, random_state=seed),
                                                model, row_level_max_rows=None).table.to_json())
    assert len(released_verdicts) == len(released_models) == 1
    assert '-0.0' not in released_models.pop()


def test_a_model_output_is_capped_unless_its_caller_raises_the_cap():
    """rev19: one row per visit passed as a "model"; the room caps it on the authorized
    library at MODEL_MAX_ROWS or the cap the owner signed."""
    model = PackageOutput(disclosure="model", columns=[{"name": "beta", "type": "float64"}])
    rows = pd.DataFrame({"beta": [float(i) for i in range(MODEL_MAX_ROWS + 1)]})
    with pytest.raises(RowCapExceeded):
        apply_output_policy(rows, model, row_level_max_rows=None, model_max_rows=MODEL_MAX_ROWS)
    assert len(apply_output_policy(rows[:MODEL_MAX_ROWS], model, row_level_max_rows=None,
                                   model_max_rows=MODEL_MAX_ROWS).table) == MODEL_MAX_ROWS
    assert len(apply_output_policy(rows, model, row_level_max_rows=None,
                                   model_max_rows=50).table) == MODEL_MAX_ROWS + 1
    # Aggregates keep their group floor, verdicts their one row per claim: not this cap.
    assert len(apply_output_policy(groups([50] * 12), aggregate_output(),
                                   row_level_max_rows=None, model_max_rows=1).table) == 12
