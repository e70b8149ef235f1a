"""Standardization: map each hospital's schema onto the common visit model.

Schema matching combines name similarity (a synonym table with Chinese names) with
content detection from `governance.scan`: sensitive fields are matched by what the
column holds, generic ones (dates, amounts, sex, visit number) by name among the
columns whose content fits. An overrides file wins over both. Values are then
normalized: ICD-10 codes get their dot, dates in any of the export formats become
dates, yuan decimal strings become integer fen exactly (no floats on the way).
Entity alignment groups visits by national ID and reports conflicting attributes.
"""

import difflib
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from governance.errors import GovernanceError
from governance.scan import TableProfile, read_batches, scan_frame

# The health authority's common model, one row per hospital visit (see docs/raw-formats.md).
COMMON_VISIT_SCHEMA = pa.schema(
    [
        ("visit_id", pa.string()),
        ("hospital_id", pa.string()),
        ("national_id", pa.string()),
        ("name", pa.string()),
        ("phone", pa.string()),
        ("address", pa.string()),
        ("birth_date", pa.date32()),
        ("sex", pa.string()),
        ("admission_date", pa.date32()),
        ("discharge_date", pa.date32()),
        ("diagnosis_code", pa.string()),
        ("total_fen", pa.int64()),
        ("covered_fen", pa.int64()),
        ("self_pay_fen", pa.int64()),
    ]
)
COMMON_FIELDS: tuple[str, ...] = tuple(COMMON_VISIT_SCHEMA.names)
# Fields read from a raw column (hospital_id comes from the source, not a column).
SOURCE_FIELDS = tuple(f for f in COMMON_FIELDS if f != "hospital_id")
AMOUNT_FIELDS = ("total_fen", "covered_fen", "self_pay_fen")
DATE_FIELDS = ("birth_date", "admission_date", "discharge_date")
OPTIONAL_FIELDS = frozenset({"phone", "address"})
# Content that identifies a field on its own (from the scan's sensitive types).
_CONTENT_FIELDS = {
    "national_id": "national_id", "name": "name", "phone": "phone", "address": "address",
    "birth_date": "birth_date", "diagnosis_code": "diagnosis",
}
SEX_CODES: dict[str, str] = {
    "m": "M", "male": "M", "男": "M", "1": "M", "f": "F", "female": "F", "女": "F", "2": "F",
}
DATE_FORMATS = ("%Y-%m-%d", "%Y%m%d", "%d/%m/%Y", "%m/%d/%Y", "%Y/%m/%d")
_POLICIES = Path(__file__).parent / "policies"
_NAME_MIN_SIMILARITY = 0.75
_SAMPLE_ROWS = 2000


class StandardizationError(GovernanceError):
    """A source cannot be mapped or a value cannot be normalized."""

    http_status = 422


class MappingIncomplete(StandardizationError):
    """Some required common-model field has no column; add it to the overrides file."""


class InvalidValue(StandardizationError):
    """A value does not parse as its field's type (the message names column and row)."""


# --- configuration -------------------------------------------------------------------


class HospitalOverrides(BaseModel):
    model_config = ConfigDict(extra="forbid")

    columns: dict[str, str] = Field(default_factory=dict)
    units: dict[str, Literal["yuan", "fen"]] = Field(default_factory=dict)
    date_formats: dict[str, str] = Field(default_factory=dict)
    sex_codes: dict[str, Literal["M", "F"]] = Field(default_factory=dict)

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, columns: dict[str, str]) -> dict[str, str]:
        bad = {c: f for c, f in columns.items() if f and f not in SOURCE_FIELDS}
        if bad:
            raise ValueError(f"unknown common-model fields {bad}; known: {list(SOURCE_FIELDS)}")
        return columns


class SchemaOverrides(BaseModel):
    hospitals: dict[str, HospitalOverrides] = Field(default_factory=dict)

    def for_hospital(self, hospital_id: str) -> HospitalOverrides:
        return self.hospitals.get(hospital_id, HospitalOverrides())


def load_overrides(path: Path | str | None = None) -> SchemaOverrides:
    """Load the per-hospital overrides TOML (the default, empty one when `path` is None)."""
    path = Path(path) if path is not None else _POLICIES / "schema_overrides.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StandardizationError(f"{path}: cannot read overrides ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise StandardizationError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return SchemaOverrides(hospitals=data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:])
        raise StandardizationError(f"{path}: {where}: {first['msg']}") from exc


@lru_cache(maxsize=1)
def synonyms() -> dict[str, tuple[str, ...]]:
    """Common field -> its known column names (from policies/schema_synonyms.toml)."""
    data = tomllib.loads((_POLICIES / "schema_synonyms.toml").read_text(encoding="utf-8"))
    return {f: tuple(names) for f, names in data["fields"].items()}


# --- schema matching -----------------------------------------------------------------


class FieldMatch(BaseModel):
    column: str
    score: float
    name_similarity: float
    content: str
    source: Literal["override", "content", "name"]


class SchemaMapping(BaseModel):
    hospital_id: str
    fields: dict[str, FieldMatch]  # common field -> chosen raw column
    units: dict[str, Literal["yuan", "fen"]]  # amount column -> unit
    date_formats: dict[str, str]  # date column -> strptime format, or "native"
    sex_codes: dict[str, Literal["M", "F"]]
    unmapped: list[str]

    def columns(self) -> dict[str, str]:
        """Raw column -> common field."""
        return {m.column: f for f, m in self.fields.items()}


def _normalize_name(name: str) -> str:
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(name))
    return re.sub(r"[\W_]+", "", spaced.lower())


def name_similarity(column: str, field: str) -> float:
    """Best similarity between a column name and the field's synonyms, in [0, 1]."""
    col = _normalize_name(column)
    best = 0.0
    for syn in (field, *synonyms().get(field, ())):
        s = _normalize_name(syn)
        if col == s:
            return 1.0
        ratio = difflib.SequenceMatcher(None, col, s).ratio()
        if len(s) >= 3 and (col.startswith(s) or col.endswith(s)):
            ratio = max(ratio, 0.85)
        best = max(best, ratio)
    return best


def _content_fits(field: str, profile_kind: str, values: pd.Series) -> bool:
    if field in _CONTENT_FIELDS:
        return profile_kind == _CONTENT_FIELDS[field]
    present = values.dropna()
    if field in ("admission_date", "discharge_date"):
        return profile_kind in ("date", "birth_date") or _is_native_date(present)
    if field in AMOUNT_FIELDS:
        return profile_kind in ("integer", "decimal") or pd.api.types.is_numeric_dtype(values)
    if field == "sex":
        codes = {str(v).strip().lower() for v in present.unique()}
        return bool(codes) and codes <= set(SEX_CODES)
    if field == "visit_id":
        return len(present) == len(values) and present.astype(str).is_unique
    return False


def _is_native_date(values: pd.Series) -> bool:
    return pd.api.types.is_datetime64_any_dtype(values) or (
        len(values) > 0 and all(hasattr(v, "year") and hasattr(v, "day") for v in values.head(20))
    )


def infer_mapping(
    sample: pd.DataFrame,
    hospital_id: str,
    overrides: HospitalOverrides | None = None,
    profile: TableProfile | None = None,
) -> SchemaMapping:
    """Match a hospital's columns to the common model from a sample of its rows."""
    overrides = overrides or HospitalOverrides()
    profile = profile or scan_frame(sample, hospital_id, sample_size=_SAMPLE_ROWS)
    kinds = {c.name: c.content_kind for c in profile.columns}
    missing_cols = [c for c in overrides.columns if c not in sample.columns]
    if missing_cols:
        raise StandardizationError(f"{hospital_id}: override names unknown columns {missing_cols}")
    chosen: dict[str, FieldMatch] = {}
    for col, fld in overrides.columns.items():
        if fld:
            chosen[fld] = FieldMatch(column=col, score=1.0, name_similarity=1.0,
                                     content=kinds.get(col, "?"), source="override")
    taken = set(overrides.columns)
    candidates = []
    for col in sample.columns:
        if col in taken:
            continue
        for fld in SOURCE_FIELDS:
            if fld in chosen or not _content_fits(fld, kinds.get(str(col), ""), sample[col]):
                continue
            sim = name_similarity(str(col), fld)
            if fld in _CONTENT_FIELDS:
                score, source = 0.6 + 0.4 * sim, "content"
            elif sim >= _NAME_MIN_SIMILARITY:
                score, source = sim, "name"
            else:
                continue
            candidates.append((score, sim, str(col), fld, source))
    for score, sim, col, fld, source in sorted(candidates, reverse=True):
        if fld in chosen or col in taken:
            continue
        chosen[fld] = FieldMatch(column=col, score=round(score, 3), name_similarity=round(sim, 3),
                                 content=kinds.get(col, "?"), source=source)
        taken.add(col)
    missing = [f for f in SOURCE_FIELDS if f not in chosen and f not in OPTIONAL_FIELDS]
    if missing:
        raise MappingIncomplete(
            f"{hospital_id}: no column found for {missing}; map them in the overrides file"
        )
    return SchemaMapping(
        hospital_id=hospital_id,
        fields={f: chosen[f] for f in SOURCE_FIELDS if f in chosen},
        units={chosen[f].column: overrides.units.get(chosen[f].column)
               or _amount_unit(sample[chosen[f].column], chosen[f].column)
               for f in AMOUNT_FIELDS},
        date_formats={chosen[f].column: overrides.date_formats.get(chosen[f].column)
                      or infer_date_format(sample[chosen[f].column])
                      for f in DATE_FIELDS},
        sex_codes=dict(overrides.sex_codes),
        unmapped=[str(c) for c in sample.columns if str(c) not in taken],
    )


def _amount_unit(values: pd.Series, column: str) -> Literal["yuan", "fen"]:
    """Integers are fen, decimals are yuan; a unit in the column name decides first."""
    if "元" in column or "yuan" in column.lower():
        return "yuan"
    if column.endswith("分") or "fen" in column.lower():
        return "fen"
    if pd.api.types.is_integer_dtype(values):
        return "fen"
    if pd.api.types.is_float_dtype(values):
        return "yuan"
    return "yuan" if values.dropna().astype(str).str.contains(".", regex=False).any() else "fen"


def infer_date_format(values: pd.Series) -> str:
    """The format most sampled values parse with; day-first wins when ambiguous.

    A few bad values do not change the format; they fail later, named by row.
    """
    present = values.dropna()
    if _is_native_date(present):
        return "native"
    text = present.astype(str).str.strip()
    shares = [(pd.to_datetime(text, format=f, errors="coerce").notna().mean(), -i, f)
              for i, f in enumerate(DATE_FORMATS)]
    share, _, best = max(shares)
    if len(text) and share >= 0.95:
        return best
    raise StandardizationError(
        f"column {values.name!r}: no single date format fits values like {text.head(3).tolist()}"
    )


# --- value normalization -------------------------------------------------------------

_ICD_PARTS = re.compile(r"^([A-Z]\d{2})\.?(\d{1,4})?$")
_YUAN = re.compile(r"^(-?)(\d+)(?:\.(\d*))?$")


def normalize_icd10(code: str) -> str:
    """`J189`, `j18.9`, ` J18.9 ` -> `J18.9`; three-character codes stay (`I10`)."""
    m = _ICD_PARTS.match(str(code).strip().upper().replace(" ", ""))
    if not m:
        raise InvalidValue(f"not an ICD-10 code: {code!r}")
    return m.group(1) + (f".{m.group(2)}" if m.group(2) else "")


def yuan_to_fen(value: str | int | float) -> int:
    """Exact conversion of a yuan amount to integer fen; refuses sub-fen precision."""
    text = repr(value) if isinstance(value, float) else str(value).strip()
    m = _YUAN.match(text)
    if not m:
        raise InvalidValue(f"not a yuan amount: {value!r}")
    sign, whole, frac = m.group(1), m.group(2), (m.group(3) or "")
    if frac[2:].strip("0"):
        raise InvalidValue(f"yuan amount finer than one fen: {value!r}")
    fen = int(whole) * 100 + int((frac[:2] or "0").ljust(2, "0"))
    return -fen if sign else fen


def _fail(hospital: str, column: str, frame: pd.DataFrame, bad: pd.Series, what: str) -> None:
    if bad.any():
        row = bad.to_numpy().nonzero()[0][0]
        raise InvalidValue(
            f"{hospital}: column {column!r} row {frame.index[row]}: {what}: "
            f"{frame[column].iloc[row]!r}"
        )


def _to_dates(frame: pd.DataFrame, column: str, fmt: str, hospital: str) -> pa.Array:
    values = frame[column]
    if fmt == "native":
        parsed = pd.to_datetime(values, errors="coerce")
    else:
        parsed = pd.to_datetime(values.astype(str).str.strip(), format=fmt, errors="coerce")
    _fail(hospital, column, frame, parsed.isna() & values.notna(), f"not a {fmt} date")
    _fail(hospital, column, frame, values.isna(), "missing date")
    return pa.array(parsed.to_numpy().astype("datetime64[D]"), type=pa.date32())


def _to_fen(frame: pd.DataFrame, column: str, unit: str, hospital: str) -> pa.Array:
    values = frame[column]
    _fail(hospital, column, frame, values.isna(), "missing amount")
    if unit == "fen":
        if pd.api.types.is_integer_dtype(values):
            return pa.array(values.to_numpy(dtype=np.int64), type=pa.int64())
        text = values.astype(str).str.strip()
        _fail(hospital, column, frame, ~text.str.fullmatch(r"-?\d+"), "not an integer fen amount")
        return pa.array(text.astype(np.int64).to_numpy(), type=pa.int64())
    if pd.api.types.is_float_dtype(values):
        text = pd.Series([repr(float(v)) for v in values], index=values.index)
    else:
        text = values.astype(str).str.strip()
    parts = text.str.extract(r"^(-?)(\d+)(?:\.(\d*))?$")
    _fail(hospital, column, frame, parts[1].isna(), "not a yuan amount")
    frac = parts[2].fillna("")
    _fail(hospital, column, frame, frac.str[2:].str.strip("0") != "", "finer than one fen")
    fen = parts[1].astype(np.int64) * 100 + frac.str[:2].str.ljust(2, "0").astype(np.int64)
    fen = fen.where(parts[0] != "-", -fen)
    return pa.array(fen.to_numpy(dtype=np.int64), type=pa.int64())


def _to_codes(frame: pd.DataFrame, column: str, hospital: str) -> pa.Array:
    text = frame[column].astype(str).str.strip().str.upper().str.replace(" ", "", regex=False)
    parts = text.str.extract(r"^([A-Z]\d{2})\.?(\d{1,4})?$")
    _fail(hospital, column, frame, parts[0].isna(), "not an ICD-10 code")
    code = parts[0] + ("." + parts[1]).fillna("")
    return pa.array(code.tolist(), type=pa.string())


def _to_sex(frame: pd.DataFrame, column: str, extra: Mapping[str, str], hospital: str) -> pa.Array:
    codes = {**SEX_CODES, **{k.lower(): v for k, v in extra.items()}}
    mapped = [None if _missing(v) else codes.get(str(v).strip().lower())
              for v in frame[column].tolist()]
    _fail(hospital, column, frame, pd.Series([m is None for m in mapped]), "unknown sex code")
    return pa.array(mapped, type=pa.string())


def _to_text(frame: pd.DataFrame, column: str | None, kind: str, hospital: str) -> pa.Array:
    if column is None:
        return pa.nulls(len(frame), type=pa.string())
    text = [None if _missing(v) else (str(v).strip() or None) for v in frame[column].tolist()]
    if kind == "phone":
        text = [_clean_phone(v) if v is not None else None for v in text]
    elif kind == "national_id":
        text = [v.upper() if v is not None else None for v in text]
        bad = [v is None or _ID_SHAPE.fullmatch(v) is None for v in text]
        _fail(hospital, column, frame, pd.Series(bad), "not an 18-character national ID")
    elif kind == "name":
        _fail(hospital, column, frame, pd.Series([v is None for v in text]), "missing name")
    return pa.array(text, type=pa.string())


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or value is pd.NA


_ID_SHAPE = re.compile(r"\d{17}[\dX]")


def _clean_phone(value: str) -> str:
    digits = re.sub(r"[\s\-()]", "", value)
    return digits[3:] if digits.startswith("+86") else digits


def apply_mapping(frame: pd.DataFrame, mapping: SchemaMapping) -> pa.Table:
    """Convert raw rows to the common model (an Arrow table in COMMON_VISIT_SCHEMA)."""
    h = mapping.hospital_id
    col = {f: m.column for f, m in mapping.fields.items()}
    local = frame[col["visit_id"]].astype(str).str.strip()
    arrays = {
        "visit_id": pa.array((h + ":" + local).tolist(), type=pa.string()),
        "hospital_id": pa.array([h] * len(frame), type=pa.string()),
        "national_id": _to_text(frame, col["national_id"], "national_id", h),
        "name": _to_text(frame, col["name"], "name", h),
        "phone": _to_text(frame, col.get("phone"), "phone", h),
        "address": _to_text(frame, col.get("address"), "address", h),
        "sex": _to_sex(frame, col["sex"], mapping.sex_codes, h),
        "diagnosis_code": _to_codes(frame, col["diagnosis_code"], h),
    }
    for f in DATE_FIELDS:
        arrays[f] = _to_dates(frame, col[f], mapping.date_formats[col[f]], h)
    for f in AMOUNT_FIELDS:
        arrays[f] = _to_fen(frame, col[f], mapping.units[col[f]], h)
    table = pa.table({f: arrays[f] for f in COMMON_FIELDS}, schema=COMMON_VISIT_SCHEMA)
    total = table["total_fen"].to_numpy()
    parts = table["covered_fen"].to_numpy() + table["self_pay_fen"].to_numpy()
    bad = np.flatnonzero(total != parts)
    if len(bad):
        raise InvalidValue(f"{h}: row {frame.index[bad[0]]}: total != covered + self-pay")
    return table


# --- sources ---------------------------------------------------------------------------


@dataclass
class StandardizedSource:
    hospital_id: str
    path: Path
    mapping: SchemaMapping
    table: pa.Table


def _sample(path: Path, encoding: str | None) -> tuple[pd.DataFrame, Iterator[pd.DataFrame]]:
    batches = read_batches(path, encoding)
    first = next(batches, None)
    if first is None:
        raise StandardizationError(f"{path}: no rows")
    return first, batches


def standardize_source(
    path: Path | str,
    hospital_id: str,
    overrides: HospitalOverrides | SchemaOverrides | None = None,
    encoding: str | None = None,
) -> StandardizedSource:
    """Map and convert one hospital export (CSV, Parquet or JSON lines) in memory.

    `encoding` is that of a text export; None detects it.
    """
    path = Path(path)
    if isinstance(overrides, SchemaOverrides):
        overrides = overrides.for_hospital(hospital_id)
    first, rest = _sample(path, encoding)
    mapping = infer_mapping(first.head(_SAMPLE_ROWS), hospital_id, overrides)
    tables = [apply_mapping(first, mapping)] + [apply_mapping(b, mapping) for b in rest]
    return StandardizedSource(hospital_id, path, mapping, pa.concat_tables(tables))


def standardize_to_parquet(
    path: Path | str,
    hospital_id: str,
    out_path: Path | str,
    overrides: HospitalOverrides | SchemaOverrides | None = None,
    encoding: str | None = None,
) -> SchemaMapping:
    """Stream one export into a common-model Parquet file (written whole or not at all).

    `encoding` is that of a text export; None detects it.
    """
    path, out_path = Path(path), Path(out_path)
    if isinstance(overrides, SchemaOverrides):
        overrides = overrides.for_hospital(hospital_id)
    first, rest = _sample(path, encoding)
    mapping = infer_mapping(first.head(_SAMPLE_ROWS), hospital_id, overrides)
    partial = out_path.with_name(out_path.name + ".partial")
    try:
        with pq.ParquetWriter(partial, COMMON_VISIT_SCHEMA) as writer:
            writer.write_table(apply_mapping(first, mapping))
            for batch in rest:
                writer.write_table(apply_mapping(batch, mapping))
        partial.replace(out_path)
    finally:
        partial.unlink(missing_ok=True)
    return mapping


def standardize_sources(
    sources: Mapping[str, Path | str],
    overrides: SchemaOverrides | None = None,
    encoding: str | None = None,
) -> tuple[pa.Table, list[SchemaMapping], "AlignmentReport"]:
    """Standardize several hospitals' exports into one table and align their patients."""
    overrides = overrides or load_overrides()
    done = [standardize_source(p, h, overrides, encoding) for h, p in sources.items()]
    table = pa.concat_tables([d.table for d in done])
    return table, [d.mapping for d in done], align_patients(table)


# --- entity alignment ------------------------------------------------------------------


class AttributeConflict(BaseModel):
    national_id: str
    field: str
    values: dict[str, list[str]]  # hospital -> distinct values it recorded


class AlignmentReport(BaseModel):
    persons: int
    persons_in_several_hospitals: int
    conflicts: list[AttributeConflict]
    id_inconsistent: list[str] = Field(
        description="visit ids whose birth date or sex disagrees with the national ID"
    )


def align_patients(
    table: pa.Table, fields: tuple[str, ...] = ("name", "phone", "sex", "birth_date", "address")
) -> AlignmentReport:
    """Group visits by national ID; report attributes recorded differently across visits."""
    df = table.select(["visit_id", "hospital_id", "national_id", *fields]).to_pandas()
    hospitals = df.groupby("national_id")["hospital_id"].nunique()
    conflicts = []
    for fld in fields:
        present = df.dropna(subset=[fld])
        present = present.assign(_v=present[fld].astype(str))
        counts = present.groupby("national_id")["_v"].nunique()
        differing = present[present["national_id"].isin(counts[counts > 1].index)]
        for nid, rows in differing.groupby("national_id"):
            values = {h: sorted(set(g.tolist())) for h, g in rows.groupby("hospital_id")["_v"]}
            conflicts.append(AttributeConflict(national_id=str(nid), field=fld, values=values))
    inconsistent: list[str] = []
    if "birth_date" in fields and "sex" in fields:
        nid = df["national_id"].astype(str)
        born = pd.to_datetime(df["birth_date"]).dt.strftime("%Y%m%d")
        parity = nid.str[16].astype(int) % 2
        sex_ok = np.where(parity == 1, "M", "F") == df["sex"].to_numpy()
        bad = (nid.str[6:14] != born) | ~sex_ok
        inconsistent = df.loc[bad, "visit_id"].tolist()
    return AlignmentReport(
        persons=len(hospitals),
        persons_in_several_hospitals=int((hospitals > 1).sum()),
        conflicts=conflicts,
        id_inconsistent=inconsistent,
    )


def common_model_frame(table: pa.Table) -> pd.DataFrame:
    """The common-model table as pandas: str columns, `datetime.date` dates, int64 fen."""
    return table.to_pandas()


def as_common_model(frame: pd.DataFrame) -> pa.Table:
    """A pandas frame with the common-model columns back to the typed Arrow table."""
    missing = [f for f in COMMON_FIELDS if f not in frame.columns]
    if missing:
        raise StandardizationError(f"frame lacks common-model columns {missing}")
    try:
        return pa.Table.from_pandas(frame[list(COMMON_FIELDS)], schema=COMMON_VISIT_SCHEMA,
                                    preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise StandardizationError(f"frame does not fit the common model: {exc}") from exc

