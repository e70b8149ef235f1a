"""Desensitization: mask values per sensitive type, with rules from the grading policy.

Defaults (policies/grading.toml `[desensitize]`): national ID keeps its 6-digit region,
a name keeps its surname, a phone its first 3 and last 4 digits, an address is cut to
its district, a birth date to its year; amounts may be bucketed.
"""

import datetime as dt
import re
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
import pyarrow as pa

from governance.classify import GradingPolicy, MaskRule, load_policy
from governance.errors import GovernanceError
from governance.scan import TableProfile, parse_date_value, surname_sets

# Common-model field -> the policy's masking key.
VISIT_FIELD_TYPES: dict[str, str] = {
    "national_id": "national_id", "name": "name", "phone": "phone", "address": "address",
    "birth_date": "birth_date", "diagnosis_code": "diagnosis", "total_fen": "amount",
    "covered_fen": "amount", "self_pay_fen": "amount",
}
_DISTRICT = re.compile(
    r"^(?:[^省市]{2,8}?(?:省|自治区))?(?:[^省市区县]{2,8}?市)?"
    r"[^省市区县]{1,10}?(?:区|县|市|旗)"
)


class MaskingError(GovernanceError):
    """A masking rule does not apply to a value (wrong type or unknown column)."""

    http_status = 422


def mask_national_id(value: str, rule: MaskRule) -> str:
    """Keep the 6-digit region code, mask the birth date, sequence and check character."""
    return value[:6] + rule.mask_char * (len(value) - 6)


def mask_name(value: str, rule: MaskRule) -> str:
    """Keep the (possibly two-character) surname: 欧阳娜娜 -> 欧阳**, 王伟 -> 王*."""
    _, double = surname_sets()
    keep = 2 if value[:2] in double and len(value) > 2 else 1
    return value[:keep] + rule.mask_char * (len(value) - keep)


def mask_middle(value: str, rule: MaskRule) -> str:
    """138****5678: keep `keep_start` leading and `keep_end` trailing characters."""
    hidden = len(value) - rule.keep_start - rule.keep_end
    if hidden <= 0:
        return rule.mask_char * len(value)
    tail = value[len(value) - rule.keep_end:] if rule.keep_end else ""
    return value[: rule.keep_start] + rule.mask_char * hidden + tail


def cut_to_district(value: str, rule: MaskRule) -> str:
    """江苏省苏州市姑苏区人民路1号 -> 江苏省苏州市姑苏区; unparseable addresses are masked."""
    m = _DISTRICT.match(value)
    return m.group(0) if m else rule.mask_char * 3


def year_only(value: Any, rule: MaskRule) -> int:
    if isinstance(value, dt.date | pd.Timestamp):
        return value.year
    parsed = parse_date_value(str(value).strip())
    if parsed is not None:
        return parsed.year
    raise MaskingError(f"cannot take the year of {value!r}")


def icd10_category(value: str, rule: MaskRule) -> str:
    return str(value).strip().upper()[:3]


def bucket_amount(value: Any, rule: MaskRule) -> int:
    """The lower bound of the amount's bucket (fen), e.g. 123456 -> 100000."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MaskingError(f"amount buckets need integer fen, got {value!r}")
    return (value // rule.width_fen) * rule.width_fen


_RULES: dict[str, Callable[[Any, MaskRule], Any]] = {
    "keep_region": mask_national_id, "surname_stars": mask_name, "mask_middle": mask_middle,
    "district": cut_to_district, "year": year_only, "category": icd10_category,
    "bucket": bucket_amount,
}
_TEXT_RULES = {"keep_region", "surname_stars", "mask_middle", "district", "category"}


def mask_value(value: Any, rule: MaskRule) -> Any:
    """Apply one rule to one value; nulls stay null."""
    if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
        return None
    if rule.rule == "keep" or not rule.enabled:
        return value
    if rule.rule == "drop":
        return None
    if rule.rule in _TEXT_RULES:
        value = str(value)
    return _RULES[rule.rule](value, rule)


def desensitize_frame(
    frame: pd.DataFrame,
    column_types: Mapping[str, str],
    policy: GradingPolicy | None = None,
) -> pd.DataFrame:
    """A masked copy of `frame`; `column_types` maps columns to the policy's masking keys.

    Columns not named in `column_types` are copied unchanged; a type without a rule in
    the policy is an error (refusing is safer than passing a value through).
    """
    policy = policy or load_policy()
    unknown = [c for c in column_types if c not in frame.columns]
    if unknown:
        raise MaskingError(f"no such columns: {unknown}")
    missing = sorted({t for t in column_types.values() if t not in policy.desensitize})
    if missing:
        raise MaskingError(f"the policy has no [desensitize] rule for {missing}")
    out = frame.copy()
    for column, kind in column_types.items():
        rule = policy.desensitize[kind]
        if rule.rule == "keep" or not rule.enabled:
            continue
        out[column] = pd.Series(
            [mask_value(v, rule) for v in frame[column].tolist()], index=frame.index, dtype=object
        )
    return out


def desensitize_visits(
    visits: pa.Table | pd.DataFrame, policy: GradingPolicy | None = None
) -> pd.DataFrame:
    """Mask a common-model visit table by its field names."""
    frame = visits.to_pandas() if isinstance(visits, pa.Table) else visits
    types = {c: t for c, t in VISIT_FIELD_TYPES.items() if c in frame.columns}
    return desensitize_frame(frame, types, policy)


def desensitize_scanned(
    frame: pd.DataFrame, profile: TableProfile, policy: GradingPolicy | None = None
) -> pd.DataFrame:
    """Mask the columns a scan flagged, by their detected sensitive type."""
    types = {c.name: c.sensitive_type for c in profile.columns if c.sensitive_type}
    return desensitize_frame(frame, types, policy)
