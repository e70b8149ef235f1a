"""The plaintext reference: the claim verdict of `docs/verdict.md`, readable by anyone.

`plain_verdicts` is the oracle the private engines are tested against. It is split
the way the private engines split the work:

- three private bits per claim need the hospital's record (`visit_found`,
  `amount_consistent`, `diagnosis_match`: the found visit's category equals the
  claim's);
- the rest follows at the insurer from what it already knows (claimed amount, claimed
  category, its policy's covered categories and deductible): `finish_verdicts`.

Because `amount_consistent` means claimed <= self-pay, min(claimed, self-pay) is the
claimed amount whenever the claim is payable, so the insurer needs no self-pay value.
If several visits matched a claim (the generator rules this out) every bit means "some
matching visit satisfies it"; the private engines compute exactly that.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import pandas as pd

from mpc.claim.constants import VERDICT_COLUMNS
from mpc.claim.encoding import category_of, day_number
from mpc.claim.errors import MalformedInput

PRIVATE_BITS = ("visit_found", "amount_consistent", "diagnosis_match")


def plain_verdicts(
    claims: pd.DataFrame, visits: pd.DataFrame, policies: pd.DataFrame
) -> pd.DataFrame:
    """Verdicts of every claim from plaintext claims, visit records and policies."""
    return finish_verdicts(claims, policies, plain_private_bits(claims, visits))


def plain_private_bits(claims: pd.DataFrame, visits: pd.DataFrame) -> pd.DataFrame:
    """[claim_id, visit_found, amount_consistent, diagnosis_match] by a pandas join."""
    left = pd.DataFrame(
        {
            "claim_id": claims["claim_id"].astype(str),
            "national_id": claims["national_id"].astype(str),
            "hospital_id": claims["hospital_id"].astype(str),
            "claim_day": [day_number(d) for d in claims["visit_date"]],
            "claimed_fen": claims["claimed_fen"].astype("int64"),
            "claim_category": [category_of(c) for c in claims["diagnosis_code"]],
        }
    )
    right = pd.DataFrame(
        {
            "national_id": visits["national_id"].astype(str),
            "hospital_id": visits["hospital_id"].astype(str),
            "visit_day": [day_number(d) for d in visits["admission_date"]],
            "self_pay_fen": visits["self_pay_fen"].astype("int64"),
            "visit_category": [category_of(c) for c in visits["diagnosis_code"]],
        }
    )
    joined = left.merge(right, on=["national_id", "hospital_id"], how="inner")
    near = joined[(joined["visit_day"] - joined["claim_day"]).abs() <= 1].copy()
    near["amount_consistent"] = near["claimed_fen"] <= near["self_pay_fen"]
    near["diagnosis_match"] = near["claim_category"] == near["visit_category"]
    per_claim = near.groupby("claim_id")[["amount_consistent", "diagnosis_match"]].any()
    out = pd.DataFrame({"claim_id": left["claim_id"]})
    out["visit_found"] = out["claim_id"].isin(per_claim.index)
    for col in ("amount_consistent", "diagnosis_match"):
        out[col] = out["claim_id"].map(per_claim[col]).fillna(False).astype(bool)
    return out


def plain_engine_bits(claims: np.ndarray, rows: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The engines' circuit in numpy, no privacy: int64 [n, 3] counts per private bit.

    `claims` int64 [n, 3] (day, claimed fen, category); `rows` int64 [n, k, 3]
    (admission day, self-pay fen, category); `valid` bool [n, k].
    """
    day, claimed, category = (claims[:, None, j] for j in range(3))
    found = valid & (np.abs(rows[..., 0] - day) <= 1)
    amount = found & (claimed <= rows[..., 1])
    diagnosis = found & (rows[..., 2] == category)
    return np.stack([found.sum(1), amount.sum(1), diagnosis.sum(1)], axis=1).astype(np.int64)


def finish_verdicts(
    claims: pd.DataFrame, policies: pd.DataFrame, private_bits: pd.DataFrame
) -> pd.DataFrame:
    """The full verdict from the private bits and what the insurer knows itself."""
    bits = private_bits.set_index("claim_id")
    coverage = _policy_index(policies)
    rows = []
    for claim in claims.itertuples(index=False):
        claim_id = str(claim.claim_id)
        if claim_id not in bits.index:
            raise MalformedInput(f"no private verdict bits for claim {claim_id}")
        found, amount_ok, diag_ok = (bool(bits.at[claim_id, c]) for c in PRIVATE_BITS)
        covered_categories, deductible = coverage.get(
            (str(claim.insurer), str(claim.national_id)), (frozenset(), 0)
        )
        covered = found and diag_ok and category_of(claim.diagnosis_code) in covered_categories
        amount_ok = found and amount_ok
        payable = max(0, int(claim.claimed_fen) - deductible) if amount_ok and covered else 0
        rows.append((claim_id, found, amount_ok, covered, format_yuan(payable)))
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def format_yuan(fen: int) -> str:
    """Integer fen as yuan with two decimals, e.g. 12345 -> '123.45'."""
    return f"{fen // 100}.{fen % 100:02d}"


def _policy_index(policies: pd.DataFrame) -> dict[tuple[str, str], tuple[frozenset[str], int]]:
    index = {}
    for p in policies.itertuples(index=False):
        index[(str(p.insurer), str(p.national_id))] = (
            frozenset(_categories(p.covered_categories)),
            int(p.deductible_fen),
        )
    return index


def _categories(value: object) -> Iterable[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return [category_of(c) for c in json.loads(text)]
        parts = text.replace(",", ";").replace("|", ";").split(";")
        return [category_of(c) for c in parts if c.strip()]
    if isinstance(value, Iterable):
        return [category_of(str(c)) for c in value]
    raise MalformedInput(f"covered_categories not a list: {value!r}")
