"""Output policy: group suppression under k, exact verdict columns, row-level refusal."""

import datetime as dt
from decimal import Decimal

import pandas as pd
import pytest

from governance.output_policy import (
    IdentifierInOutput,
    OutputSchemaMismatch,
    RowLevelOutputRefused,
    VerdictColumnsMismatch,
    apply_output_policy,
    conform_to_schema,
)
from governance.packages import PackageOutput


def aggregate_output(min_group_size=None, row_level=False) -> PackageOutput:
    return PackageOutput(
        disclosure="aggregate", count_column="n", min_group_size=min_group_size,
        row_level=row_level,
        columns=[{"name": "diagnosis", "type": "string"}, {"name": "n", "type": "int64"},
                 {"name": "mean_fen", "type": "float64"}],
    )


VERDICT = PackageOutput(
    disclosure="verdict",
    columns=[{"name": "claim_id", "type": "string"}, {"name": "visit_found", "type": "bool"},
             {"name": "payable", "type": "decimal", "scale": 2}],
)


def groups(counts: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"diagnosis": [f"D{i:02d}" for i in range(len(counts))],
                         "n": counts, "mean_fen": [100.0] * len(counts)})


def test_groups_under_k_are_suppressed_and_counted():
    result = apply_output_policy(groups([3, 9, 10, 11, 250, 1]), aggregate_output(),
                                 row_level_allowed=False)
    assert result.k == 10
    assert result.suppressed_groups == 3
    assert result.table["n"].tolist() == [10, 11, 250]
    assert result.table["diagnosis"].tolist() == ["D02", "D03", "D04"]


def test_manifest_floor_raises_k_and_contract_k_cannot_be_undercut():
    result = apply_output_policy(groups([10, 19, 20]), aggregate_output(min_group_size=20),
                                 row_level_allowed=False)
    assert (result.k, result.suppressed_groups, result.table["n"].tolist()) == (20, 2, [20])
    stricter = apply_output_policy(groups([10, 19, 20]), aggregate_output(min_group_size=5),
                                   row_level_allowed=False, k=10)
    assert (stricter.k, stricter.suppressed_groups) == (10, 0)


def verdicts(**extra) -> pd.DataFrame:
    frame = pd.DataFrame({"claim_id": ["C1", "C2"], "visit_found": [True, False],
                          "payable": [Decimal("49.09"), Decimal("0.00")]})
    for name, values in extra.items():
        frame[name] = values
    return frame


def test_verdict_with_exactly_the_declared_columns_passes_in_declared_order():
    shuffled = verdicts()[["payable", "claim_id", "visit_found"]]
    result = apply_output_policy(shuffled, VERDICT, row_level_allowed=False)
    assert list(result.table.columns) == ["claim_id", "visit_found", "payable"]
    assert result.table["payable"].tolist() == [Decimal("49.09"), Decimal("0.00")]


def test_verdict_with_an_extra_or_missing_column_is_refused():
    with pytest.raises(VerdictColumnsMismatch, match="undeclared"):
        apply_output_policy(verdicts(self_pay_fen=[1, 2]), VERDICT, row_level_allowed=False)
    with pytest.raises(VerdictColumnsMismatch, match="missing"):
        apply_output_policy(verdicts().drop(columns=["payable"]), VERDICT,
                            row_level_allowed=False)


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


def test_row_level_output_needs_manifest_and_contract():
    output = aggregate_output(row_level=True)
    with pytest.raises(RowLevelOutputRefused) as caught:
        apply_output_policy(groups([50]), output, row_level_allowed=False)
    assert caught.value.http_status == 403
    assert len(apply_output_policy(groups([50]), output, row_level_allowed=True).table) == 1


def test_identifier_values_never_leave_without_row_level_permission():
    frame = verdicts()
    frame["claim_id"] = ["320505199001011234", "C2"]
    with pytest.raises(IdentifierInOutput):
        apply_output_policy(frame, VERDICT, row_level_allowed=False,
                            identifier_values={"320505199001011234"})
    clean = apply_output_policy(verdicts(), VERDICT, row_level_allowed=False,
                                identifier_values={"320505199001011234"})
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
        apply_output_policy(table, VERDICT, row_level_allowed=False,
                            identifier_values=[NATIONAL_ID, *OTHER_IDS])


@pytest.mark.parametrize("payable", [Decimal("320505199001011.23"), Decimal("13812345678.00")],
                         ids=["national_id_digits", "phone"])
def test_identifiers_as_numbers_are_refused(payable):
    table = pd.DataFrame({"claim_id": ["C1"], "visit_found": [True], "payable": [payable]})
    with pytest.raises(IdentifierInOutput):
        apply_output_policy(table, VERDICT, row_level_allowed=False,
                            identifier_values=[NATIONAL_ID, PHONE])
    numbers = pd.DataFrame({"diagnosis": ["D1"], "n": [int(str(payable).split(".")[0][:15])],
                            "mean_fen": [float(payable)]})
    with pytest.raises(IdentifierInOutput):
        apply_output_policy(numbers, aggregate_output(), row_level_allowed=False, k=1,
                            identifier_values=[NATIONAL_ID, PHONE])


def test_ordinary_verdicts_and_aggregates_are_not_mistaken_for_identifiers():
    verdict = pd.DataFrame({"claim_id": [f"C{i:05d}" for i in range(50)],
                            "visit_found": [True] * 50,
                            "payable": [Decimal("1234567.89")] * 50})
    apply_output_policy(verdict, VERDICT, row_level_allowed=False,
                        identifier_values=[NATIONAL_ID, PHONE, *OTHER_IDS])
    apply_output_policy(groups([12, 40]), aggregate_output(), row_level_allowed=False,
                        identifier_values=[NATIONAL_ID, PHONE, *OTHER_IDS])
