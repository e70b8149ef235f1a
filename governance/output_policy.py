"""What an algorithm package's output may disclose.

Five rules, applied to every output before anyone sees it:
- the output has exactly the declared columns and types (a verdict, exactly its verdict
  columns), amounts rounded to their declared tolerance and, once rounded, within their
  declared range;
- its rows are released in a canonical order (a verdict by claim id, any other output by
  all its columns), so the order the package wrote them in carries nothing;
- a verdict has exactly one row per claim the room handed in, keyed by that claim's id,
  so it carries at most `PackageOutput.bits_per_claim` bits a claim;
- aggregates over groups smaller than k (10 by default, or the manifest's higher floor)
  are suppressed: their rows are dropped and counted; the group's size is the smaller
  of the package's count and the size the caller measured on the inputs;
- row-level output is refused unless the manifest declares it and the contract allows it,
  and capped at the smaller of the two row counts they declare; any other model output is
  capped at the caller's `model_max_rows` (the room: `MODEL_MAX_ROWS` on the authorized
  library unless the signed approval raises it); without row-level, no output
  cell may carry an identifier value of the inputs: equal to it, embedded in text,
  reversed, hex or base64, padded, full-width or with zero-width characters, or as
  eleven or more of its digits in a number.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import math
import re
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from decimal import Decimal

import pandas as pd
from pandas.api import types as ptypes

from governance.errors import GovernanceError
from governance.packages import (
    DEFAULT_MIN_GROUP_SIZE,
    VERDICT_KEY,
    OutputColumn,
    PackageOutput,
)

MODEL_MAX_ROWS = 10  # a model output's rows on the authorized library, unless approved more


class OutputRefused(GovernanceError):
    """The output breaks the disclosure policy and is not released."""

    http_status = 403


class OutputSchemaMismatch(OutputRefused):
    """The output's columns or types differ from the manifest's declaration."""

    http_status = 422


class VerdictColumnsMismatch(OutputSchemaMismatch):
    """A verdict output does not have exactly the declared verdict columns."""


class VerdictRowsMismatch(OutputSchemaMismatch):
    """A verdict's rows are not exactly one per input claim, keyed by its claim id."""


class RowLevelOutputRefused(OutputRefused):
    """Row-level output was not declared by the manifest or not allowed by the contract."""


class RowCapExceeded(RowLevelOutputRefused):
    """Row-level output has more rows than the manifest or the contract allows."""


class IdentifierInOutput(OutputRefused):
    """An output cell equals an identifier value of the inputs."""


class OutputUnreadable(OutputSchemaMismatch):
    """The output is missing, not a regular file, over its size or row cap, or unparsable.

    One refusal for all of these: which one it was would tell whether a path exists.
    """


@dataclass(frozen=True)
class PolicyResult:
    """The releasable output and what the policy removed from it."""

    table: pd.DataFrame
    disclosure: str
    k: int
    suppressed_groups: int


def _is_date(value: object) -> bool:
    return isinstance(value, dt.date) and not isinstance(value, dt.datetime)


def _rounded(series: pd.Series, column: OutputColumn) -> pd.Series:
    """Round to the tolerance (half to even); -0 becomes 0, one value, not two."""
    if column.type == "float64":
        if column.tolerance is not None:
            step = float(column.tolerance)
            series = (series / step).round() * step
        return series + 0.0
    if column.type != "decimal":
        return series
    quantum = Decimal(1).scaleb(-(column.scale or 0))
    step = column.tolerance
    if step is None:
        return series.map(lambda v: (v + 0).quantize(quantum))
    return series.map(lambda v: ((v / step).to_integral_value() * step + 0).quantize(quantum))


def _released(series: pd.Series, column: OutputColumn) -> pd.Series:
    """Round; refuse values that, rounded, fall outside the declared range."""
    series = _rounded(series, column)
    if column.maximum is not None:
        top = column.maximum if column.type == "decimal" else float(column.maximum)
        if not series.map(lambda v: 0 <= v <= top).all():
            raise OutputSchemaMismatch(f"column '{column.name}': values outside [0, {top}]")
    return series


def _conform_column(series: pd.Series, column: OutputColumn) -> pd.Series:
    return _released(_conform_type(series, column), column)


def _conform_type(series: pd.Series, column: OutputColumn) -> pd.Series:
    name, kind = column.name, column.type
    if series.isna().any():
        raise OutputSchemaMismatch(f"column '{name}': missing values are not allowed")
    if kind == "string":
        if not series.map(lambda v: isinstance(v, str)).all():
            raise OutputSchemaMismatch(f"column '{name}': expected strings")
        return series.astype(object)
    if kind == "int64":
        if not ptypes.is_integer_dtype(series) or ptypes.is_bool_dtype(series):
            raise OutputSchemaMismatch(f"column '{name}': expected integers, got {series.dtype}")
        return series.astype("int64")
    if kind == "float64":
        if not ptypes.is_numeric_dtype(series) or ptypes.is_bool_dtype(series):
            raise OutputSchemaMismatch(f"column '{name}': expected numbers, got {series.dtype}")
        return series.astype("float64")
    if kind == "bool":
        if not ptypes.is_bool_dtype(series):
            raise OutputSchemaMismatch(f"column '{name}': expected booleans, got {series.dtype}")
        return series.astype(bool)
    if kind == "date":
        if ptypes.is_datetime64_dtype(series):
            if not (series == series.dt.normalize()).all():
                raise OutputSchemaMismatch(f"column '{name}': timestamps are not whole dates")
            return series.dt.date.astype(object)
        if not series.map(_is_date).all():
            raise OutputSchemaMismatch(f"column '{name}': expected dates")
        return series.astype(object)
    # decimal: exact values with at most `scale` places, never floats.
    scale = column.scale or 0

    def fits(value: object) -> bool:
        if not isinstance(value, Decimal) or not value.is_finite():
            return False
        exponent = value.normalize().as_tuple().exponent
        return isinstance(exponent, int) and -exponent <= scale

    if not series.map(fits).all():
        raise OutputSchemaMismatch(
            f"column '{name}': expected Decimal values with at most {scale} places")
    quantum = Decimal(1).scaleb(-scale)
    return series.map(lambda v: v.quantize(quantum)).astype(object)


def conform_to_schema(table: pd.DataFrame, output: PackageOutput) -> pd.DataFrame:
    """Return `table` with exactly the declared columns, in order, with canonical types."""
    if not isinstance(table, pd.DataFrame):
        raise OutputSchemaMismatch(f"output must be a DataFrame, got {type(table).__name__}")
    declared = output.column_names
    actual = [str(c) for c in table.columns]
    if sorted(actual) != sorted(declared) or len(set(actual)) != len(actual):
        error = VerdictColumnsMismatch if output.disclosure == "verdict" else OutputSchemaMismatch
        missing = sorted(set(declared) - set(actual))
        extra = sorted(set(actual) - set(declared))
        raise error(f"output columns differ from the declaration: missing {missing}, "
                    f"undeclared {extra}")
    conformed = {c.name: _conform_column(table[c.name], c) for c in output.columns}
    return pd.DataFrame(conformed, columns=declared).reset_index(drop=True)


_IGNORED = dict.fromkeys(map(ord, "\u00ad\u180e\u200b\u200c\u200d\u2060\ufeff"), None)
_SEPARATORS = re.compile(r"[\s\-_.:/|,;'\"()\[\]{}]+")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_MIN_EMBEDDED = 6  # shorter identifiers (names) are refused only as whole cells
_MIN_DIGITS = 11  # a number is refused when this many of its digits are an id's
_DIGIT_RUN = re.compile(rf"[0-9]{{{_MIN_DIGITS},}}")


def _canonical(text: str) -> str:
    """Full-width to ASCII, no zero-width characters, no separators or padding, upper case."""
    return _SEPARATORS.sub("", unicodedata.normalize("NFKC", text).translate(_IGNORED)).upper()


def _decoded(text: str) -> list[str]:
    """`text` as it is, reversed, and hex- or base64-decoded where it parses as such."""
    views = [text, text[::-1]]
    raw = text.strip()
    if len(raw) >= 2 * _MIN_EMBEDDED and _HEX.fullmatch(raw):
        views.append(bytes.fromhex(raw).decode("utf-8", errors="ignore"))
    if len(raw) >= 8 and _BASE64.fullmatch(raw):
        padded = raw + "=" * (-len(raw) % 4)
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            with contextlib.suppress(ValueError, binascii.Error):
                views.append(decode(padded).decode("utf-8", errors="ignore"))
    return [_canonical(v) for v in views]


def _digit_windows(text: str) -> set[str]:
    """Every run of `_MIN_DIGITS` consecutive digits in `text`."""
    return {run[i:i + _MIN_DIGITS] for run in _DIGIT_RUN.findall(text)
            for i in range(len(run) - _MIN_DIGITS + 1)}


class _IdentifierIndex:
    """Input identifier values, as whole cells, embedded in text, or as digits of a number."""

    def __init__(self, identifiers: Collection[str]) -> None:
        self.exact = set(identifiers)
        canonical = {_canonical(v) for v in identifiers}
        self.embedded = {c for c in canonical if len(c) >= _MIN_EMBEDDED}
        self.lengths = sorted({len(c) for c in self.embedded})
        self.digit_windows = {w for c in canonical for w in _digit_windows(c)}

    def in_text(self, value: str) -> bool:
        if value in self.exact:
            return True
        for view in _decoded(value):
            for length in self.lengths:
                if any(view[i:i + length] in self.embedded
                       for i in range(len(view) - length + 1)):
                    return True
            if not self.digit_windows.isdisjoint(_digit_windows(view)):
                return True
        return False

    def in_number(self, value: object) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        digits = format(Decimal(str(value)), "f").replace(".", "").lstrip("-")
        return not self.digit_windows.isdisjoint(_digit_windows(digits))


def _refuse_identifiers(table: pd.DataFrame, identifiers: Collection[str]) -> None:
    """Refuse identifier values in any column: whole, embedded, transformed or as numbers.

    Booleans are not scanned: one bit a cell says nothing about a single value, and
    spreading an id over bits is what the verdict shape and the row cap must bound.
    """
    if not identifiers:
        return
    index = _IdentifierIndex(identifiers)
    for name in table.columns:
        column = table[name]
        if ptypes.is_bool_dtype(column):
            continue
        numeric = ptypes.is_numeric_dtype(column) or column.map(
            lambda v: isinstance(v, Decimal)).all()
        found = index.in_number if numeric else (
            lambda v: isinstance(v, str) and index.in_text(v))
        if column.map(found).any():
            raise IdentifierInOutput(f"column '{name}' carries identifier values of the inputs")


GROUP_SIZE = "__group_size__"


def _measured_sizes(table: pd.DataFrame, group_sizes: pd.DataFrame) -> pd.Series:
    """Each output row's group size as measured on the inputs (0 for an unknown group)."""
    keys = [c for c in group_sizes.columns if c != GROUP_SIZE]
    if not keys:
        return pd.Series(int(group_sizes[GROUP_SIZE].sum()), index=table.index)
    merged = table[keys].merge(group_sizes, on=keys, how="left")
    return pd.Series(merged[GROUP_SIZE].fillna(0).to_numpy(), index=table.index)


def _refuse_unkeyed_verdict(table: pd.DataFrame, claim_ids: Collection[str] | None) -> None:
    """One row per input claim, keyed by its id: nothing missing, extra or repeated."""
    if claim_ids is None:
        raise VerdictRowsMismatch("a verdict needs the claim ids the room handed in")
    keys = table[VERDICT_KEY]
    expected = set(claim_ids)
    if len(keys) != len(expected) or keys.duplicated().any() or set(keys) != expected:
        raise VerdictRowsMismatch("the verdict's rows are not one per input claim")


def _canonical_order(table: pd.DataFrame, output: PackageOutput) -> pd.DataFrame:
    """The rows sorted by the verdict key, or by every column: the package's order is lost.

    Rows that sort equal are equal in every released cell (-0 is already 0), so the
    stable sort leaves nothing of the package's order either.
    """
    keys = [VERDICT_KEY] if output.disclosure == "verdict" else list(table.columns)
    return table.sort_values(keys, kind="stable").reset_index(drop=True)


def apply_output_policy(
    table: pd.DataFrame,
    output: PackageOutput,
    *,
    row_level_max_rows: int | None,
    model_max_rows: int | None = None,
    k: int = DEFAULT_MIN_GROUP_SIZE,
    identifier_values: Collection[str] = (),
    group_sizes: pd.DataFrame | None = None,
    claim_ids: Collection[str] | None = None,
) -> PolicyResult:
    """Conform `table` to the declaration and apply the disclosure rules.

    `row_level_max_rows` is the contract's word: the most rows of row-level output it
    allows (None: none at all); `identifier_values` are the inputs' identifier values
    (national IDs, names, phones, tokens...) that a non-row-level output must never
    contain. `group_sizes`, for an aggregate, is the group sizes the caller computed
    from the inputs (key columns and `GROUP_SIZE`): a group is released only when both
    its own count and that size reach the floor. `claim_ids`, for a verdict, are the
    claim ids of the input the caller handed the package. `model_max_rows` caps a model
    output that is not row-level (None: no cap, for the synthetic libraries).
    """
    if output.row_level and row_level_max_rows is None:
        raise RowLevelOutputRefused("the manifest declares row-level output; the contract "
                                    "does not allow it")
    conformed = conform_to_schema(table, output)
    if output.row_level and len(conformed) > min(row_level_max_rows,
                                                  output.max_rows or row_level_max_rows):
        raise RowCapExceeded("the row-level output has more rows than its cap")
    if (output.disclosure == "model" and not output.row_level and model_max_rows is not None
            and len(conformed) > model_max_rows):
        raise RowCapExceeded("the model output has more rows than its cap")
    if output.disclosure == "verdict":
        _refuse_unkeyed_verdict(conformed, claim_ids)
    if not output.row_level:
        _refuse_identifiers(conformed, identifier_values)
    floor = k
    suppressed = 0
    if output.disclosure == "aggregate":
        floor = max(k, output.group_size_floor)
        keep = conformed[output.count_column] >= floor
        if group_sizes is not None:
            keep &= _measured_sizes(conformed, group_sizes) >= floor
        suppressed = int((~keep).sum())
        conformed = conformed[keep].reset_index(drop=True)
    return PolicyResult(table=_canonical_order(conformed, output),
                        disclosure=output.disclosure, k=floor, suppressed_groups=suppressed)
