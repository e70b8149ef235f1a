"""The plaintext reference: the claim verdict of `docs/verdict.md`, readable by anyone.

`plain_verdicts` is the oracle the private engines are tested against. It is split
the way the private engines split the work:

- three private bits per claim need the hospital's record. Per candidate visit j, with
  f_j = "a valid slot admitted within one day of the claimed date", a_j = "claimed <=
  self-pay" and g_j = "same diagnosis category":

      visit_found       = OR_j f_j
      amount_consistent = OR_j (f_j and a_j)
      diagnosis_match   = OR_j (f_j and a_j and g_j)

  The third bit is nested under the second, so "all three hold" always means one visit
  passes every test, and the three bits are the unary code of the best visit's level
  (0: no visit, 1: a visit, 2: ... whose amount fits, 3: ... that also has the claimed
  category): a monotone chain that says nothing about how many visits matched or
  which test failed on which visit;
- the rest follows at the insurer from what it already knows (claimed amount, claimed
  category, its policy's covered categories and deductible): `finish_verdicts`.

Because `amount_consistent` means claimed <= self-pay on the visit that is also the
diagnosis match, min(claimed, self-pay) is the claimed amount whenever the claim is
payable, so the insurer needs no self-pay value.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import pandas as pd

from mpc.claim.constants import VERDICT_COLUMNS
from mpc.claim.encoding import MAX_FEN, category_of, day_number
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
    # nested: the diagnosis bit counts only on a visit whose amount test also holds
    near["diagnosis_match"] = near["amount_consistent"] & (
        near["claim_category"] == near["visit_category"])
    per_claim = near.groupby("claim_id")[["amount_consistent", "diagnosis_match"]].any()
    out = pd.DataFrame({"claim_id": left["claim_id"]})
    out["visit_found"] = out["claim_id"].isin(per_claim.index)
    for col in ("amount_consistent", "diagnosis_match"):
        out[col] = out["claim_id"].map(per_claim[col]).fillna(False).astype(bool)
    return out


def plain_engine_bits(claims: np.ndarray, rows: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The engines' circuit in numpy, no privacy: int64 [n, 3] bits (0/1) per claim.

    `claims` int64 [n, 3] (day, claimed fen, category); `rows` int64 [n, k, 3]
    (admission day, self-pay fen, category); `valid` bool [n, k]. The columns are
    (visit_found, amount_consistent, diagnosis_match) = OR over slots of f, f*a, f*a*g.
    """
    return nested_or(*slot_tests(claims, rows, valid))


def slot_tests(
    claims: np.ndarray, rows: np.ndarray, valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-slot bool [n, k] (found, amount, diagnosis), each test on its own slot.

    The differences wrap in int64 exactly as in the `ss` ring, so an insurer's value out
    of range gets the same answer here as there (in range: |day gap| <= 1, claimed in
    [0, MAX_FEN) and <= self-pay, same category).
    """
    day, claimed, category = (claims[:, None, j] for j in range(3))
    with np.errstate(over="ignore"):
        gap = rows[..., 0] - day
        room = rows[..., 1] - claimed
    found = valid & (gap >= -1) & (gap <= 1)
    # A claimed amount outside [0, MAX_FEN) fails, as in `ss`: inside, `room` cannot wrap.
    amount = (room >= 0) & (claimed >= 0) & (claimed < MAX_FEN)
    return found, amount, rows[..., 2] == category


def nested_or(found: np.ndarray, amount: np.ndarray, diagnosis: np.ndarray) -> np.ndarray:
    """int64 [n, 3] bits OR_j f_j, OR_j (f_j a_j), OR_j (f_j a_j g_j) from bool [n, k] tests."""
    fa = found & amount
    fag = fa & diagnosis
    return np.stack([found.any(1), fa.any(1), fag.any(1)], axis=1).astype(np.int64)


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
        found, amount_ok, diag_ok = (_bit(bits.at[claim_id, c], claim_id) for c in PRIVATE_BITS)
        covered_categories, deductible = coverage.get(
            (str(claim.insurer), str(claim.national_id)), (frozenset(), 0)
        )
        # the engines' bits are nested (diag_ok implies amount_ok implies found); the ANDs
        # keep the verdict right for a hand-made frame of bits too
        amount_ok = found and amount_ok
        covered = amount_ok and diag_ok and category_of(claim.diagnosis_code) in covered_categories
        payable = max(0, int(claim.claimed_fen) - deductible) if amount_ok and covered else 0
        rows.append((claim_id, found, amount_ok, covered, format_yuan(payable)))
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def _bit(value: object, claim_id: str) -> bool:
    """A private verdict value as a bool; a count or anything else is refused."""
    if isinstance(value, (bool, np.bool_)) or (
            isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise MalformedInput(f"private verdict of claim {claim_id} is not a bit: {value!r}")


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
