"""Integer encoding of the claim-check fields, shared by the three engines.

Every engine compares integers: a date becomes its day number (days since
1970-01-01), money stays integer fen, an ICD-10 category (`J18`) becomes a base-36
number. The bounds below keep every difference the circuits form far inside the
engines' rings (2^64 for secret sharing, a 60-bit prime for BFV).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mpc.errors import MalformedInput

CLAIM_FIELDS = ("visit_day", "claimed_fen", "category")
ROW_FIELDS = ("admission_day", "self_pay_fen", "category")

MAX_DAY = 2**16  # day numbers in [0, 2^16): 1970-01-01 .. 2149-06-06
MAX_FEN = 2**31  # money in [0, 2^31) fen: up to 21,474,836.47 yuan per visit
MAX_CATEGORY = 36**3

_CATEGORY = re.compile(r"^[A-Z][0-9A-Z]{2}$")
_EPOCH = dt.date(1970, 1, 1)


def day_number(value: dt.date | str | pd.Timestamp) -> int:
    """Days since 1970-01-01 of a date (ISO string, date or timestamp)."""
    try:
        day = pd.Timestamp(value).date()
    except (ValueError, TypeError) as exc:
        raise MalformedInput(f"not a date: {value!r}") from exc
    number = (day - _EPOCH).days
    if not 0 <= number < MAX_DAY:
        raise MalformedInput(f"date out of range: {value!r}")
    return number


def category_of(diagnosis_code: str) -> str:
    """The ICD-10 category of a normalized code: the characters before the dot."""
    if not isinstance(diagnosis_code, str):
        raise MalformedInput(f"not a diagnosis code: {diagnosis_code!r}")
    category = diagnosis_code.split(".")[0].strip().upper()
    if not _CATEGORY.match(category):
        raise MalformedInput(f"not an ICD-10 category: {diagnosis_code!r}")
    return category


def category_code(diagnosis_code: str) -> int:
    """Base-36 number of the code's category; equal categories give equal numbers."""
    return int(category_of(diagnosis_code), 36) % MAX_CATEGORY


def check_fen(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MalformedInput(f"{what} must be integer fen, got {value!r}")
    value = int(value)
    if not 0 <= value < MAX_FEN:
        raise MalformedInput(f"{what} out of range [0, 2^31) fen: {value}")
    return value


@dataclass(frozen=True)
class EncodedClaims:
    """Claims as integers: `values[i] = (visit_day, claimed_fen, category)`."""

    claim_ids: tuple[str, ...]
    values: np.ndarray  # int64 [n, 3]

    def __len__(self) -> int:
        return len(self.claim_ids)


def encode_claims(claims: pd.DataFrame) -> EncodedClaims:
    """Encode the model's claim columns; any bad field raises `MalformedInput`."""
    needed = {"claim_id", "visit_date", "claimed_fen", "diagnosis_code"}
    missing = needed - set(claims.columns)
    if missing:
        raise MalformedInput(f"claims lack columns {sorted(missing)}")
    ids = tuple(str(c) for c in claims["claim_id"])
    if len(set(ids)) != len(ids):
        raise MalformedInput("duplicate claim_id")
    values = np.empty((len(claims), 3), dtype=np.int64)
    for i, (day, fen, code) in enumerate(
        zip(claims["visit_date"], claims["claimed_fen"], claims["diagnosis_code"], strict=True)
    ):
        values[i] = (day_number(day), check_fen(fen, "claimed_fen"), category_code(code))
    return EncodedClaims(ids, values)


def encode_visit_rows(visits: pd.DataFrame) -> np.ndarray:
    """Encode visit rows as int64 [n, 3] = (admission_day, self_pay_fen, category)."""
    needed = {"admission_date", "self_pay_fen", "diagnosis_code"}
    missing = needed - set(visits.columns)
    if missing:
        raise MalformedInput(f"visits lack columns {sorted(missing)}")
    values = np.empty((len(visits), 3), dtype=np.int64)
    for i, (day, fen, code) in enumerate(
        zip(visits["admission_date"], visits["self_pay_fen"], visits["diagnosis_code"],
            strict=True)
    ):
        values[i] = (day_number(day), check_fen(fen, "self_pay_fen"), category_code(code))
    return values
