"""Integer encoding of the claim-check fields, shared by the three engines.

Every engine compares integers: a date becomes its day number (days since
1970-01-01), money stays integer fen, an ICD-10 category (`J18`) becomes a base-36
number. The bounds below keep every difference the circuits form far inside the
engines' rings (2^64 for secret sharing, the 40-bit prime t of BFV, where the
comparison works on bits and prefixes, not on differences).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mpc.errors import MalformedInput

CLAIM_FIELDS = ("visit_day", "claimed_fen", "category")
ROW_FIELDS = ("admission_day", "self_pay_fen", "category")

MAX_DAY = 2**16  # day numbers in [0, 2^16): 1970-01-01 .. 2149-06-06
MAX_FEN = 2**31  # money in [0, 2^31) fen: up to 21,474,836.47 yuan per visit
MAX_CATEGORY = 36**3

_CATEGORY = re.compile(r"^[A-Z][0-9A-Z]{2}$")
_ISO_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_EPOCH = dt.date(1970, 1, 1)


def day_number(value: dt.date | str | np.datetime64) -> int:
    """Days since 1970-01-01 of a date: a `date` (a datetime counts by its day) or an ISO
    `YYYY-MM-DD` string. Any other spelling is refused, so a day is never read as a month."""
    if isinstance(value, str):
        if not _ISO_DATE.match(value):
            raise MalformedInput(f"not an ISO date (YYYY-MM-DD): {value!r}")
        try:
            day = dt.date.fromisoformat(value)
        except ValueError as exc:
            raise MalformedInput(f"not a date: {value!r}") from exc
    elif isinstance(value, dt.datetime | np.datetime64) and not pd.isna(value):
        day = pd.Timestamp(value).date()
    elif isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        day = value
    else:
        raise MalformedInput(f"not a date: {value!r}")
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
        raise MalformedInput(
            f"not a normalized ICD-10 code (dotted, e.g. E11.9 or I10): {diagnosis_code!r}")
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
    """Encode the model's claim columns; a bad field raises `MalformedInput` naming the claim
    (its claim_id, else its row) and the field."""
    needed = {"claim_id", "visit_date", "claimed_fen", "diagnosis_code"}
    missing = needed - set(claims.columns)
    if missing:
        raise MalformedInput(f"claims lack columns {sorted(missing)}")
    ids = tuple(str(c) for c in claims["claim_id"])
    seen: set[str] = set()
    for claim_id in ids:
        if claim_id in seen:
            raise MalformedInput(f"duplicate claim_id {claim_id!r}")
        seen.add(claim_id)
    values = np.empty((len(claims), 3), dtype=np.int64)
    for i, (raw_id, day, fen, code) in enumerate(zip(
        claims["claim_id"], claims["visit_date"], claims["claimed_fen"],
        claims["diagnosis_code"], strict=True,
    )):
        claim = f"row {i + 1}" if pd.isna(raw_id) else f"claim {ids[i]}"
        values[i] = (
            _field(claim, "visit_date", day_number, day),
            _field(claim, "claimed_fen", lambda v: check_fen(v, "value"), fen),
            _field(claim, "diagnosis_code", category_code, code),
        )
    return EncodedClaims(ids, values)


def _field(claim: str, name: str, encode: Callable[[Any], int], value: Any) -> int:
    try:
        return encode(value)
    except MalformedInput as exc:
        raise MalformedInput(f"{claim}: {name}: {exc}") from None


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
