"""Asset scan: an inventory of tables and columns, with sensitive data found by content.

Column names are never trusted: a column is flagged with a sensitive type when at
least `threshold` of its sampled non-null values pass that type's validator (check
digits, calendar dates, real mobile segments, surname lists, address structure,
ICD-10 shape). Values that merely *contain* a national ID or a mobile number inside
longer text are counted separately (`embedded`), so free-text columns are caught too.

Text files (CSV, JSON lines) are read in their own encoding: the one given, else the
one detected (`text_encoding`): UTF-8 with or without BOM, then GB18030, a superset
of the GBK and GB2312 that Chinese hospital systems commonly export.
"""

import codecs
import datetime as dt
import json
import re
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from governance.errors import GovernanceError

SENSITIVE_TYPES = ("national_id", "name", "phone", "address", "birth_date", "diagnosis")
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
                  ".sqlite": "sqlite", ".sqlite3": "sqlite", ".db": "sqlite"}
TEXT_FORMATS = ("csv", "jsonl")
# Tried in order when a text file's encoding is not given; GB18030 contains GBK and GB2312.
DETECTED_ENCODINGS = ("utf-8", "gb18030")
BATCH_ROWS = 50_000
_KMV_K = 4096


class ScanError(GovernanceError):
    """A source cannot be scanned (missing, unreadable, unsupported format)."""

    http_status = 400


class SourceNotFound(ScanError):
    http_status = 404


class UnreadableText(ScanError):
    """A text file does not decode in its encoding (given or detected), or the encoding is
    unknown."""


# --- value validators ----------------------------------------------------------------

# GB/T 2260 province-level prefixes.
_PROVINCES = frozenset({
    "11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36", "37",
    "41", "42", "43", "44", "45", "46", "50", "51", "52", "53", "54", "61", "62", "63", "64",
    "65", "71", "81", "82",
})
_ID_WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))
_ID_SHAPE = re.compile(r"\d{17}[\dXx]")
_ID_EMBEDDED = re.compile(r"(?<!\d)\d{17}[\dXx](?![\dA-Za-z])")
_MOBILE = re.compile(r"1(?:3\d|4[5-9]|5[0-35-9]|6[2567]|7[0-8]|8\d|9[0-35-9])\d{8}")
_MOBILE_EMBEDDED = re.compile(
    r"(?<!\d)(?:\+?86[- ]?)?(1(?:3\d|4[5-9]|5[0-35-9]|6[2567]|7[0-8]|8\d|9[0-35-9])\d{8})(?!\d)"
)
_PHONE_NOISE = re.compile(r"[\s\-()]")
_CJK = re.compile(r"[\u4e00-\u9fff]+")
_NOT_A_NAME_SUFFIX = frozenset("科室部院局处所厅站组队班区县市省路街号楼层村镇乡店司行")
_ADMIN = re.compile(r"[省市区县旗州盟]|镇|乡|街道")
_STREET = re.compile(r"[路街巷弄村道]|\d+号|大道|胡同")
_ICD10 = re.compile(r"[A-Z]\d{2}(?:\.?\d{1,3})?(?:x\d{3})?")
_DATE_PATTERNS = (
    (re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})(?:[ T].*)?"), (1, 2, 3)),
    (re.compile(r"(\d{4})/(\d{1,2})/(\d{1,2})(?:[ T].*)?"), (1, 2, 3)),
    (re.compile(r"(\d{4})(\d{2})(\d{2})"), (1, 2, 3)),
    (re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})"), (3, 2, 1)),  # day first, as in China/Europe
    (re.compile(r"(\d{4})年(\d{1,2})月(\d{1,2})日"), (1, 2, 3)),
)
_BOOLEANS = frozenset({"true", "false", "yes", "no", "y", "n", "是", "否"})
_EARLIEST = dt.date(1870, 1, 1)  # GB 11643 example IDs are born in 1880


def national_id_check_character(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character of the first 17 digits of a PRC resident ID."""
    return "10X98765432"[sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS, strict=True)) % 11]


def is_national_id(value: str, today: dt.date | None = None) -> bool:
    """An 18-character resident ID: province prefix, real birth date, right check character."""
    if not _ID_SHAPE.fullmatch(value) or value[:2] not in _PROVINCES:
        return False
    born = _date_or_none(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    if born is None or not _EARLIEST <= born <= (today or dt.date.today()):
        return False
    return national_id_check_character(value[:17]) == value[17].upper()


def is_mobile_phone(value: str) -> bool:
    """A mainland mobile number of a real segment, optionally with +86 and separators."""
    digits = _PHONE_NOISE.sub("", value)
    if digits.startswith("+86"):
        digits = digits[3:]
    elif digits.startswith("86") and len(digits) == 13:
        digits = digits[2:]
    return _MOBILE.fullmatch(digits) is not None


@lru_cache(maxsize=1)
def surname_sets() -> tuple[frozenset[str], frozenset[str]]:
    text = (Path(__file__).parent / "policies" / "surnames.txt").read_text(encoding="utf-8")
    words = [w for line in text.splitlines() if not line.startswith("#") for w in line.split()]
    return frozenset(w for w in words if len(w) == 1), frozenset(w for w in words if len(w) == 2)


def is_person_name(value: str) -> bool:
    """2-4 Chinese characters starting with a known surname and not ending like a place."""
    if not 2 <= len(value) <= 4 or not _CJK.fullmatch(value):
        return False
    if value[-1] in _NOT_A_NAME_SUFFIX:
        return False
    single, double = surname_sets()
    if value[:2] in double and len(value) >= 3:
        return True
    return value[0] in single and len(value) <= 3


def is_address(value: str) -> bool:
    """Chinese text with an administrative level (省/市/区/县...) and a street or number."""
    if len(value) < 6 or not _CJK.search(value):
        return False
    admin = _ADMIN.search(value)
    return admin is not None and _STREET.search(value, admin.end()) is not None


def is_icd10(value: str) -> bool:
    """An ICD-10 code: a letter, two digits, optional (dotted) subcode."""
    return _ICD10.fullmatch(value) is not None


def parse_date_value(value: str) -> dt.date | None:
    """A calendar date in one of the common export formats, else None."""
    for pattern, (yi, mi, di) in _DATE_PATTERNS:
        m = pattern.fullmatch(value)
        if m:
            return _date_or_none(int(m.group(yi)), int(m.group(mi)), int(m.group(di)))
    return None


def _date_or_none(year: int, month: int, day: int) -> dt.date | None:
    try:
        return dt.date(year, month, day)
    except ValueError:
        return None


# --- report models -------------------------------------------------------------------


class ColumnProfile(BaseModel):
    name: str
    storage_type: str
    content_kind: str
    rows: int
    nulls: int
    null_share: float
    distinct_estimate: int
    sampled: int = Field(description="non-null values the validators looked at")
    matches: dict[str, float] = Field(default_factory=dict, description="share per type")
    embedded: dict[str, float] = Field(
        default_factory=dict, description="share of values containing the type inside text"
    )
    sensitive_type: str | None = None
    contains_sensitive: list[str] = Field(default_factory=list)


class TableProfile(BaseModel):
    source: str
    table: str
    format: str
    rows: int
    columns: list[ColumnProfile]

    def column(self, name: str) -> ColumnProfile:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


class ScanReport(BaseModel):
    threshold: float
    embedded_threshold: float
    sample_size: int
    full: bool
    tables: list[TableProfile]

    def flagged(self) -> list[tuple[str, str, str]]:
        """(table, column, sensitive type) of every flagged column."""
        return [
            (t.table, c.name, c.sensitive_type)
            for t in self.tables for c in t.columns if c.sensitive_type
        ]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


# --- streaming sources ---------------------------------------------------------------


def text_encoding(path: Path, encoding: str | None = None) -> str:
    """The codec to read text file `path` with.

    `encoding` if given (a UTF-8 file's BOM is skipped either way), else the first of
    `DETECTED_ENCODINGS` the whole file decodes in.
    """
    bom = _starts_with_utf8_bom(path)
    if encoding is not None:
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            raise UnreadableText(f"unknown encoding {encoding!r}") from None
        return "utf-8-sig" if name == "utf-8" and bom else name
    if bom:
        return "utf-8-sig"
    for candidate in DETECTED_ENCODINGS:
        if _decodes_as(path, candidate):
            return candidate
    raise UnreadableText(
        f"{path}: neither UTF-8 nor GB18030 text; give its encoding (--encoding)")


def _starts_with_utf8_bom(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8


def _decodes_as(path: Path, encoding: str) -> bool:
    decoder = codecs.getincrementaldecoder(encoding)()
    with path.open("rb") as fh:
        try:
            for block in iter(lambda: fh.read(1 << 20), b""):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


@contextmanager
def _decoding(path: Path, encoding: str) -> Iterator[None]:
    """Turn a decoding failure while reading `path` into `UnreadableText`."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise UnreadableText(
            f"{path}: not {encoding} text ({exc.reason} at byte {exc.object[exc.start:exc.end]!r});"
            " give the file's encoding (--encoding), e.g. gb18030"
        ) from None


def _batches(
    path: Path, fmt: str, encoding: str | None = None
) -> Iterator[tuple[str, Iterator[pd.DataFrame], dict[str, str]]]:
    """Yield (table name, batches, storage types) for every table of a source.

    `encoding` applies to text formats (CSV, JSON lines); None detects it.
    """
    if fmt in TEXT_FORMATS:
        encoding = text_encoding(path, encoding)
    if fmt == "csv":
        with _decoding(path, encoding):
            header = pd.read_csv(path, nrows=0, dtype=str, encoding=encoding)
        yield path.stem, _csv_batches(path, encoding), dict.fromkeys(header.columns, "text")
    elif fmt == "parquet":
        pf = pq.ParquetFile(path)
        types = {f.name: str(f.type) for f in pf.schema_arrow}
        yield path.stem, (b.to_pandas() for b in pf.iter_batches(BATCH_ROWS)), types
    elif fmt == "jsonl":
        yield path.stem, _jsonl_batches(path, encoding), {}
    elif fmt == "sqlite":
        yield from _sqlite_tables(path)
    else:
        raise ScanError(f"unsupported format {fmt!r} for {path}")


def _csv_batches(path: Path, encoding: str) -> Iterator[pd.DataFrame]:
    with _decoding(path, encoding):
        yield from pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""],
                               chunksize=BATCH_ROWS, encoding=encoding)


def _jsonl_batches(path: Path, encoding: str) -> Iterator[pd.DataFrame]:
    records: list[dict[str, Any]] = []
    with _decoding(path, encoding), path.open(encoding=encoding) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ScanError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from exc
            if len(records) >= BATCH_ROWS:
                yield pd.DataFrame.from_records(records).astype(object)
                records = []
    if records:
        yield pd.DataFrame.from_records(records).astype(object)


def _sqlite_tables(path: Path) -> Iterator[tuple[str, Iterator[pd.DataFrame], dict[str, str]]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name")]
        for name in names:
            quoted = '"' + name.replace('"', '""') + '"'
            types = {r[1]: (r[2] or "ANY") for r in conn.execute(f"PRAGMA table_info({quoted})")}
            yield name, _sqlite_batches(conn, quoted, list(types)), types
    except sqlite3.DatabaseError as exc:
        raise ScanError(f"{path}: not a readable SQLite database ({exc})") from exc
    finally:
        conn.close()


def _sqlite_batches(
    conn: sqlite3.Connection, quoted: str, cols: list[str]
) -> Iterator[pd.DataFrame]:
    cursor = conn.execute(f"SELECT * FROM {quoted}")
    while rows := cursor.fetchmany(BATCH_ROWS):
        yield pd.DataFrame.from_records(rows, columns=cols).astype(object)


def read_batches(path: Path | str, encoding: str | None = None) -> Iterator[pd.DataFrame]:
    """The rows of a single-table file (CSV, Parquet, JSON lines) in batches.

    `encoding` is that of a text file; None detects it (`text_encoding`).
    """
    path = Path(path)
    [(file, fmt)] = discover_tables(path) if path.is_file() else [(path, "?")]
    if fmt == "sqlite" or fmt == "?":
        raise ScanError(f"{path}: not a single-table file")
    for _name, batches, _types in _batches(file, fmt, encoding):
        yield from batches


def discover_tables(path: Path | str) -> list[tuple[Path, str]]:
    """Every scannable file under `path` (a file or a directory), with its format."""
    path = Path(path)
    if not path.exists():
        raise SourceNotFound(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    found = [(p, TABLE_SUFFIXES[p.suffix.lower()]) for p in files
             if p.suffix.lower() in TABLE_SUFFIXES]
    if path.is_file() and not found:
        raise ScanError(f"{path}: unsupported file type {path.suffix!r}")
    return found


# --- profiling -----------------------------------------------------------------------


class _ColumnAccumulator:
    """Streaming statistics of one column; validators run on the sample or on all values."""

    def __init__(self, name: str, storage_type: str, full: bool) -> None:
        self.name, self.storage_type, self.full = name, storage_type, full
        self.rows = self.nulls = 0
        self.hashes = np.array([], dtype=np.uint64)
        self.counts: dict[str, int] = {}
        self.checked = 0
        self.years: list[int] = []
        self.py_types: set[str] = set()

    def add(self, values: pd.Series) -> None:
        self.rows += len(values)
        text = _as_text(values)
        present = text.dropna()
        self.nulls += len(values) - len(present)
        if len(present):
            h = np.unique(pd.util.hash_array(present.to_numpy(dtype=object)))
            self.hashes = np.union1d(self.hashes, h)[:_KMV_K]
        if self.storage_type == "?":
            self.py_types |= {type(v).__name__ for v in values.dropna().head(100)}
        if self.full:
            self.observe(present.tolist())

    def observe(self, values: list[str]) -> None:
        self.checked += len(values)
        for key, n in _match_counts(values, self.years).items():
            self.counts[key] = self.counts.get(key, 0) + n

    def distinct_estimate(self) -> int:
        if len(self.hashes) < _KMV_K:
            return len(self.hashes)
        return int((_KMV_K - 1) * 2.0**64 / float(self.hashes[-1]))


def _as_text(values: pd.Series) -> pd.Series:
    """Values as strings (bytes decoded when they are UTF-8); nulls and '' as missing."""
    def one(v: Any) -> str | None:
        if v is None or (isinstance(v, float) and v != v):
            return None
        if isinstance(v, bytes | bytearray | memoryview):
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError:
                return "\x00binary"
        s = str(v).strip()
        return s or None

    return pd.Series([one(v) for v in values.tolist()], dtype=object)


def _match_counts(values: list[str], years: list[int]) -> dict[str, int]:
    today = dt.date.today()
    counts = dict.fromkeys(
        ["national_id", "phone", "name", "address", "date", "diagnosis", "boolean", "integer",
         "decimal", "binary", "embedded:national_id", "embedded:phone"], 0)
    for v in values:
        if v == "\x00binary":
            counts["binary"] += 1
            continue
        if is_national_id(v, today):
            counts["national_id"] += 1
        elif _ID_EMBEDDED.search(v) and any(
                is_national_id(m.group(0), today) for m in _ID_EMBEDDED.finditer(v)):
            counts["embedded:national_id"] += 1
        if is_mobile_phone(v):
            counts["phone"] += 1
        elif any(is_mobile_phone(m.group(1)) for m in _MOBILE_EMBEDDED.finditer(v)):
            counts["embedded:phone"] += 1
        if is_person_name(v):
            counts["name"] += 1
        if is_address(v):
            counts["address"] += 1
        if is_icd10(v):
            counts["diagnosis"] += 1
        if v.lower() in _BOOLEANS:
            counts["boolean"] += 1
        day = parse_date_value(v)
        if day is not None and _EARLIEST <= day <= dt.date(today.year + 5, 12, 31):
            counts["date"] += 1
            years.append(day.year + (day.timetuple().tm_yday - 1) / 366)
        if re.fullmatch(r"[-+]?\d+", v):
            counts["integer"] += 1
        elif re.fullmatch(r"[-+]?\d*\.\d+", v):
            counts["decimal"] += 1
    return counts


def _finish(acc: _ColumnAccumulator, threshold: float, embedded_threshold: float) -> ColumnProfile:
    n = acc.checked
    share = {k: acc.counts.get(k, 0) / n for k in acc.counts} if n else {}
    matches = {k: round(v, 4) for k, v in share.items()
               if v > 0 and not k.startswith("embedded:")}
    embedded = {k.split(":", 1)[1]: round(v, 4) for k, v in share.items()
                if v > 0 and k.startswith("embedded:")}
    kind = _content_kind(share, threshold)
    sensitive = None
    for t in ("national_id", "phone", "diagnosis", "name", "address"):
        if share.get(t, 0.0) >= threshold:
            sensitive = t
            break
    if sensitive is None and kind == "date" and _looks_like_birth_dates(acc.years):
        sensitive = "birth_date"
    if "date" in matches and sensitive == "birth_date":
        matches["birth_date"] = matches["date"]
    storage = acc.storage_type if acc.storage_type != "?" else "/".join(sorted(acc.py_types))
    if sensitive:
        kind = sensitive
    return ColumnProfile(
        name=acc.name, storage_type=storage or "null", content_kind=kind, rows=acc.rows,
        nulls=acc.nulls, null_share=round(acc.nulls / acc.rows, 4) if acc.rows else 0.0,
        distinct_estimate=acc.distinct_estimate(), sampled=n, matches=matches,
        embedded=embedded, sensitive_type=sensitive,
        contains_sensitive=sorted(k for k, v in embedded.items() if v >= embedded_threshold),
    )


def _content_kind(share: dict[str, float], threshold: float) -> str:
    for kind in ("binary", "boolean", "date", "integer", "decimal"):
        if share.get(kind, 0.0) >= threshold:
            return kind
    if share.get("integer", 0.0) + share.get("decimal", 0.0) >= threshold:
        return "decimal"
    return "text" if share else "empty"


def _looks_like_birth_dates(years: list[float]) -> bool:
    """Dates of birth are in the past and spread over decades; event dates cluster."""
    if len(years) < 2:
        return False
    arr = np.array(years)
    low, high = np.percentile(arr, [5, 95])
    return high - low >= 15 and arr.max() <= dt.date.today().year + 1


def scan_batches(
    batches: Iterable[pd.DataFrame],
    table: str,
    source: str = "<memory>",
    fmt: str = "dataframe",
    storage_types: dict[str, str] | None = None,
    threshold: float = 0.8,
    embedded_threshold: float = 0.01,
    sample_size: int = 2000,
    full: bool = False,
    seed: int = 0,
) -> TableProfile:
    """Profile a table given as a stream of DataFrames (bounded memory)."""
    if not 0 < threshold <= 1 or not 0 <= embedded_threshold <= 1:
        raise ScanError("threshold must be in (0, 1] and embedded_threshold in [0, 1]")
    rng = np.random.default_rng(seed)
    accs: dict[str, _ColumnAccumulator] = {}
    sample: pd.DataFrame | None = None
    rows = 0
    for batch in batches:
        batch = batch.reset_index(drop=True)
        rows += len(batch)
        for col in batch.columns:
            key = str(col)
            if key not in accs:
                accs[key] = _ColumnAccumulator(key, (storage_types or {}).get(key, "?"), full)
            accs[key].add(batch[col])
        if not full:
            # Bottom-k sampling by random priority: a uniform sample across all batches.
            batch = batch.astype(object).assign(_priority=rng.random(len(batch)))
            sample = batch if sample is None else pd.concat([sample, batch], ignore_index=True)
            sample = sample.nsmallest(sample_size, "_priority")
    if not full and sample is not None:
        for key, acc in accs.items():
            col = next(c for c in sample.columns if str(c) == key)
            acc.observe(_as_text(sample[col]).dropna().tolist())
    for key, declared in (storage_types or {}).items():
        accs.setdefault(key, _ColumnAccumulator(key, declared, full))
    return TableProfile(
        source=source, table=table, format=fmt, rows=rows,
        columns=[_finish(a, threshold, embedded_threshold) for a in accs.values()],
    )


def scan_frame(frame: pd.DataFrame, table: str, **options: Any) -> TableProfile:
    """Profile an in-memory DataFrame."""
    storage = {str(c): str(t) for c, t in frame.dtypes.items()}
    return scan_batches([frame], table, storage_types=storage, **options)


def scan_path(
    path: Path | str,
    threshold: float = 0.8,
    embedded_threshold: float = 0.01,
    sample_size: int = 2000,
    full: bool = False,
    seed: int = 0,
    encoding: str | None = None,
) -> ScanReport:
    """Scan a file, a SQLite database or a directory tree of them.

    `full=True` runs the validators on every value instead of a sample: slower, but
    it is what a proof that no identifier sits in the clear needs. `encoding` is that
    of the text files (CSV, JSON lines); None detects each file's.
    """
    tables = []
    for file, fmt in discover_tables(path):
        try:
            for name, batches, types in _batches(file, fmt, encoding):
                table = f"{file.name}:{name}" if fmt == "sqlite" else name
                tables.append(scan_batches(
                    batches, table, str(file), fmt, types, threshold, embedded_threshold,
                    sample_size, full, seed))
        except (OSError, ValueError, sqlite3.Error) as exc:
            if isinstance(exc, GovernanceError):
                raise
            raise ScanError(f"{file}: cannot read as {fmt} ({exc})") from exc
    return ScanReport(threshold=threshold, embedded_threshold=embedded_threshold,
                      sample_size=sample_size, full=full, tables=tables)


def render_report(report: ScanReport) -> Any:
    """A rich Table of every column, sensitive ones highlighted."""
    from rich.table import Table

    table = Table(title=f"asset scan (threshold {report.threshold:.0%})")
    for head in ("table", "column", "storage", "kind", "rows", "null %", "distinct",
                 "sensitive", "match", "embedded"):
        right = head in ("rows", "null %", "distinct")
        table.add_column(head, justify="right" if right else "left")
    for t in report.tables:
        for c in t.columns:
            top = max(c.matches.items(), key=lambda kv: kv[1], default=("", 0.0))
            table.add_row(
                t.table, c.name, c.storage_type, c.content_kind, f"{c.rows:,}",
                f"{100 * c.null_share:.1f}", f"{c.distinct_estimate:,}",
                f"[bold red]{c.sensitive_type}[/]" if c.sensitive_type else "",
                f"{top[0]} {top[1]:.0%}" if top[0] else "",
                ", ".join(f"{k} {v:.0%}" for k, v in c.embedded.items()),
            )
    return table
