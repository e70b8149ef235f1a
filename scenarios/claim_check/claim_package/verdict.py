"""The claim-check verdict (the shared data model's definition), one row per claim.

A visit is "that visit" when it is the same person at the same hospital admitted within
one day of the claimed visit date; the generator guarantees there is at most one.
The diagnosis is covered only on a visit whose amount is also consistent (the nested
rule of `docs/verdict.md`), so `payable` always rests on one visit passing every test.
Money stays in integer fen until the payable amount is turned into yuan.
"""

from decimal import Decimal

import pandas as pd

DATE_TOLERANCE_DAYS = 1
_CENT = Decimal("0.01")


def _category(codes: pd.Series) -> pd.Series:
    """ICD-10 category: the three characters before the dot (`J18.9` -> `J18`)."""
    return codes.astype(str).str.split(".", n=1).str[0]


def _matching_visits(claims: pd.DataFrame, visits: pd.DataFrame) -> pd.DataFrame:
    """claim_id -> self-pay and diagnosis of the visit within the date tolerance, if any."""
    candidates = claims[["claim_id", "national_id", "hospital_id", "visit_date"]].merge(
        visits.rename(columns={"diagnosis_code": "visit_diagnosis"}),
        on=["national_id", "hospital_id"], how="inner")
    gap = (pd.to_datetime(candidates["admission_date"])
           - pd.to_datetime(candidates["visit_date"])).dt.days.abs()
    candidates["gap"] = gap
    near = candidates[candidates["gap"] <= DATE_TOLERANCE_DAYS]
    near = near.sort_values(["claim_id", "gap"]).drop_duplicates(subset=["claim_id"])
    return near[["claim_id", "self_pay_fen", "visit_diagnosis"]]


def _policy_terms(policies: pd.DataFrame) -> dict:
    """(insurer, national_id) -> (covered categories, deductible fen)."""
    return {
        (insurer, person): (frozenset(str(c) for c in categories), int(deductible))
        for insurer, person, categories, deductible in zip(
            policies["insurer"], policies["national_id"], policies["covered_categories"],
            policies["deductible_fen"], strict=True)
    }


def claim_verdicts(tables: dict) -> pd.DataFrame:
    claims = tables["claims"]
    matched = claims.merge(_matching_visits(claims, tables["visits"]), on="claim_id", how="left")
    terms = _policy_terms(tables["policies"])
    found = matched["self_pay_fen"].notna()
    self_pay = matched["self_pay_fen"].fillna(0).astype("int64")
    claimed = matched["claimed_fen"].astype("int64")
    amount_ok = found & (claimed <= self_pay)
    same_category = _category(matched["diagnosis_code"]) == _category(
        matched["visit_diagnosis"].fillna(""))
    in_policy = pd.Series(
        [cat in terms.get((ins, pid), (frozenset(), 0))[0]
         for ins, pid, cat in zip(matched["insurer"], matched["national_id"],
                                  _category(matched["diagnosis_code"]), strict=True)],
        index=matched.index, dtype=bool)
    covered = amount_ok & same_category & in_policy  # nested, as in docs/verdict.md
    deductible = pd.Series(
        [terms.get((ins, pid), (frozenset(), 0))[1]
         for ins, pid in zip(matched["insurer"], matched["national_id"], strict=True)],
        index=matched.index, dtype="int64")
    payable_fen = (claimed.where(claimed < self_pay, self_pay) - deductible).clip(lower=0)
    payable_fen = payable_fen.where(amount_ok & covered, 0)
    return pd.DataFrame({
        "claim_id": matched["claim_id"].astype(str),
        "visit_found": found.astype(bool),
        "amount_consistent": amount_ok.astype(bool),
        "diagnosis_covered": covered.astype(bool),
        "payable": [(Decimal(int(f)) / 100).quantize(_CENT) for f in payable_fen],
    })
