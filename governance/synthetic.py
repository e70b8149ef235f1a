"""Development libraries: the synthetic sample, the desensitized test sample, their files.

The sample library is drawn from a Gaussian copula fitted to the authorized table:
numeric columns and dates (as day numbers) keep their empirical marginals through
quantile mapping, categorical columns enter the copula through their cumulative
frequency intervals, and the copula's correlation matrix carries the pairwise structure.
Identifier columns are never sampled: each gets fresh, format-valid fakes that collide
with no real value. Any synthetic row whose non-identifier part equals a real row, or
lies closer to a real row than the DCR threshold, is dropped and drawn again.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import string
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pandas.api import types as ptypes
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from governance.errors import GovernanceError

# scipy and scikit-learn are imported where they are used: the CLI loads this module for
# its types, and they cost about half a second of every `cogov` start.

IdentifierKind = Literal["national_id", "person_name", "phone", "address", "visit_id", "token"]
LibraryKind = Literal["sample", "test", "authorized"]
LIBRARY_FILE = "library.json"
# With no explicit threshold, a synthetic row may be no closer to a real record than this
# fraction of the 5th percentile of real-to-real nearest-record distances.
AUTO_DCR_FRACTION = 0.5
KNOWN_IDENTIFIERS: dict[str, IdentifierKind] = {
    "national_id": "national_id", "name": "person_name", "phone": "phone",
    "address": "address", "visit_id": "visit_id",
}
_MAX_ROUNDS = 20
_SUZHOU_REGIONS = ("320505", "320506", "320507", "320508", "320509", "320571", "320581",
                   "320582", "320583", "320585")
_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"  # noqa: E501
_GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华建国文辉鹏飞玉兰红梅晓东海燕晨阳思远佳怡子涵浩然欣怡雨萱宇轩"  # noqa: E501
_DISTRICTS = ("姑苏区", "吴中区", "相城区", "虎丘区", "吴江区", "工业园区")
_ROADS = ("人民路", "干将路", "东吴北路", "金鸡湖大道", "苏州大道", "华元路", "石湖路", "长江路")
_PHONE_PREFIXES = ("130", "131", "132", "133", "135", "136", "137", "138", "139", "150", "151",
                   "152", "155", "157", "158", "159", "180", "181", "186", "187", "188", "189")
_ID_WEIGHTS = [pow(2, 17 - i, 11) for i in range(17)]
_ID_CHECK = "10X98765432"


class SynthesisError(GovernanceError):
    """The sample could not be produced as asked (bad spec, or privacy floor unreachable)."""

    http_status = 422


class LibraryError(GovernanceError):
    """A development library directory is missing, malformed or already present."""

    http_status = 422


class SynthesisSpec(BaseModel):
    """How to treat the columns of one table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    identifiers: dict[str, IdentifierKind] = Field(default_factory=dict)
    sums: dict[str, list[str]] = Field(default_factory=dict, description="target = sum(parts)")
    offsets: dict[str, str] = Field(default_factory=dict,
                                    description="column modelled as its difference to a base")
    birth_date_column: str | None = "birth_date"
    sex_column: str | None = "sex"
    group_column: str | None = "hospital_id"
    max_categories: int = Field(default=500, ge=2)


STANDARD_VISIT_SPEC = SynthesisSpec(
    identifiers=dict(KNOWN_IDENTIFIERS),
    sums={"total_fen": ["covered_fen", "self_pay_fen"]},
    offsets={"discharge_date": "admission_date"},
)


class ColumnFidelity(BaseModel):
    metric: Literal["ks", "tvd"]
    value: float


class SynthesisReport(BaseModel):
    """Fidelity and privacy of one synthetic sample."""

    rows: int
    seed: int
    fidelity: dict[str, ColumnFidelity]
    correlation_mean_abs_diff: float
    correlation_max_abs_diff: float
    correlation_max_pair: tuple[str, str] | None
    dcr_threshold: float = Field(description="rows closer than this were redrawn")
    dcr_min: float
    dcr_p5: float
    dcr_median: float
    real_dcr_p5: float = Field(description="same statistic between real rows, for scale")
    exact_matches: int
    rows_below_threshold: int
    dropped_exact_matches: int = 0
    dropped_too_close: int = 0
    rounds: int = 1
    identifier_columns: list[str] = Field(default_factory=list)

    @property
    def privacy_ok(self) -> bool:
        return self.exact_matches == 0 and self.rows_below_threshold == 0


@dataclass(frozen=True)
class SyntheticSample:
    table: pd.DataFrame
    report: SynthesisReport


# --- column analysis -------------------------------------------------------------------


def _is_object_date(series: pd.Series) -> bool:
    """Object column of `datetime.date` values (judged on its first 1000 non-null values)."""
    values = series.dropna().iloc[:1000]
    return len(values) > 0 and values.map(
        lambda v: isinstance(v, dt.date) and not isinstance(v, dt.datetime)).all()


def _is_date(series: pd.Series) -> bool:
    return ptypes.is_datetime64_any_dtype(series) or (
        series.dtype == object and _is_object_date(series))


def _days(series: pd.Series) -> np.ndarray:
    """Dates as float day numbers since 1970-01-01 (NaN for missing)."""
    stamps = pd.to_datetime(series)
    days = stamps.values.astype("datetime64[D]").astype("int64").astype(float)
    days[stamps.isna().to_numpy()] = np.nan
    return days


def _dates_like(days: np.ndarray, template: pd.Series) -> pd.Series:
    values = pd.Series(pd.to_datetime(np.rint(days), unit="D"))
    if ptypes.is_datetime64_any_dtype(template):
        return values.astype(template.dtype)
    return values.dt.date.astype(object).where(values.notna(), None)


def infer_spec(real: pd.DataFrame, base: SynthesisSpec = STANDARD_VISIT_SPEC) -> SynthesisSpec:
    """`base` restricted to the table's columns, plus token-like columns found by shape."""
    columns = set(real.columns)
    identifiers = {c: k for c, k in base.identifiers.items() if c in columns}
    for name in real.columns:
        series = real[name]
        if name in identifiers or _is_date(series) or not (
                series.dtype == object or ptypes.is_string_dtype(series)):
            continue
        lowered = name.lower()
        unique = series.nunique(dropna=True)
        if ("token" in lowered or lowered.endswith("xid") or lowered in KNOWN_IDENTIFIERS
                or (unique > base.max_categories and unique > 0.5 * len(series))):
            identifiers[name] = KNOWN_IDENTIFIERS.get(lowered, "token")
    sums = {t: p for t, p in base.sums.items() if t in columns and set(p) <= columns}
    offsets = {c: b for c, b in base.offsets.items() if c in columns and b in columns}
    return base.model_copy(update={"identifiers": identifiers, "sums": sums, "offsets": offsets})


@dataclass
class _Marginal:
    name: str
    kind: Literal["numeric", "date", "categorical"]
    integer: bool
    null_rate: float
    sorted_values: np.ndarray | None = None  # numeric / date (day numbers)
    categories: list | None = None
    upper: np.ndarray | None = None  # cumulative upper bounds of the categories


def _model_values(real: pd.DataFrame, name: str, spec: SynthesisSpec) -> np.ndarray | pd.Series:
    series = real[name]
    values = _days(series) if _is_date(series) else series
    base = spec.offsets.get(name)
    if base is not None:
        base_values = _days(real[base]) if _is_date(real[base]) else real[base].to_numpy(float)
        return np.asarray(values, dtype=float) - base_values
    return values


def _fit_marginal(name: str, values: np.ndarray | pd.Series, is_date: bool,
                  spec: SynthesisSpec) -> _Marginal:
    series = pd.Series(values)
    null_rate = float(series.isna().mean())
    present = series.dropna()
    numeric = (ptypes.is_numeric_dtype(series) and not ptypes.is_bool_dtype(series)) or is_date
    if numeric:
        array = present.to_numpy(dtype=float)
        integer = is_date or ptypes.is_integer_dtype(series) or bool(
            len(array) and np.all(array == np.rint(array)))
        return _Marginal(name, "date" if is_date else "numeric", integer, null_rate,
                         sorted_values=np.sort(array))
    counts = present.value_counts()
    if len(counts) > spec.max_categories:
        raise SynthesisError(f"column '{name}': {len(counts)} categories exceed "
                             f"max_categories={spec.max_categories}; declare it an identifier")
    probabilities = counts.to_numpy(dtype=float) / counts.sum()
    return _Marginal(name, "categorical", False, null_rate, categories=list(counts.index),
                     upper=np.cumsum(probabilities))


def _normal_scores(values: np.ndarray | pd.Series, marginal: _Marginal,
                   rng: np.random.Generator) -> np.ndarray:
    from scipy import stats

    series = pd.Series(values)
    scores = np.zeros(len(series))
    present = series.notna().to_numpy()
    if marginal.kind == "categorical":
        lookup = {c: i for i, c in enumerate(marginal.categories or [])}
        upper = marginal.upper
        codes = series[present].map(lookup).to_numpy(dtype=int)
        lower = np.concatenate([[0.0], upper[:-1]])
        u = lower[codes] + rng.uniform(size=len(codes)) * (upper[codes] - lower[codes])
    else:
        ranks = stats.rankdata(series[present].to_numpy(dtype=float))
        u = (ranks - 0.5) / len(ranks)
    scores[present] = stats.norm.ppf(np.clip(u, 1e-9, 1 - 1e-9))
    return scores


def _nearest_correlation(matrix: np.ndarray) -> np.ndarray:
    matrix = np.nan_to_num((matrix + matrix.T) / 2, nan=0.0)
    np.fill_diagonal(matrix, 1.0)
    eigenvalues, vectors = np.linalg.eigh(matrix)
    fixed = vectors @ np.diag(np.clip(eigenvalues, 1e-6, None)) @ vectors.T
    scale = np.sqrt(np.diag(fixed))
    return fixed / np.outer(scale, scale)


@dataclass
class _Copula:
    marginals: list[_Marginal]
    factor: np.ndarray  # correlation = factor @ factor.T

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        from scipy import stats

        z = rng.standard_normal((n, len(self.marginals))) @ self.factor.T
        u = stats.norm.cdf(z)
        drawn: dict[str, np.ndarray] = {}
        for j, m in enumerate(self.marginals):
            if m.kind == "categorical":
                index = np.minimum(np.searchsorted(m.upper, u[:, j], side="right"),
                                   len(m.categories) - 1)
                column = np.array(m.categories, dtype=object)[index]
            else:
                column = np.quantile(m.sorted_values, u[:, j], method="linear")
                if m.integer:
                    column = np.rint(column)
            if m.null_rate > 0:
                missing = rng.uniform(size=n) < m.null_rate
                column = column.astype(object if m.kind == "categorical" else float)
                column[missing] = None if m.kind == "categorical" else np.nan
            drawn[m.name] = column
        return drawn


def _fit_copula(real: pd.DataFrame, spec: SynthesisSpec, modelled: list[str],
                rng: np.random.Generator) -> _Copula:
    marginals: list[_Marginal] = []
    scores = []
    for name in modelled:
        values = _model_values(real, name, spec)
        marginal = _fit_marginal(name, values, _is_date(real[name]) and name not in spec.offsets,
                                 spec)
        marginals.append(marginal)
        scores.append(_normal_scores(values, marginal, rng))
    matrix = np.corrcoef(np.vstack(scores)) if len(scores) > 1 else np.ones((1, 1))
    correlation = _nearest_correlation(np.atleast_2d(matrix))
    eigenvalues, vectors = np.linalg.eigh(correlation)
    factor = vectors @ np.diag(np.sqrt(np.clip(eigenvalues, 0, None)))
    return _Copula(marginals, factor)


# --- fake identifiers ------------------------------------------------------------------


def _check_char(first17: str) -> str:
    return _ID_CHECK[sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS, strict=True)) % 11]


def _fake_national_ids(rng: np.random.Generator, frame: pd.DataFrame,
                       spec: SynthesisSpec) -> list[str]:
    n = len(frame)
    births = frame.get(spec.birth_date_column) if spec.birth_date_column else None
    sexes = frame.get(spec.sex_column) if spec.sex_column else None
    out = []
    for i in range(n):
        birth = births.iloc[i] if births is not None else None
        if birth is None or pd.isna(birth):
            birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 25_000)))
        stamp = pd.Timestamp(birth).strftime("%Y%m%d")
        seq = int(rng.integers(0, 500)) * 2
        sex = sexes.iloc[i] if sexes is not None else None
        if sex == "M" or (sex != "F" and rng.uniform() < 0.5):
            seq += 1
        first17 = f"{_SUZHOU_REGIONS[int(rng.integers(len(_SUZHOU_REGIONS)))]}{stamp}{seq:03d}"
        out.append(first17 + _check_char(first17))
    return out


def _fake_tokens(rng: np.random.Generator, real: pd.Series, n: int) -> list[str]:
    """Format-preserving fakes: each position keeps its character class, drawn afresh."""
    templates = real.dropna().astype(str).to_numpy()
    if len(templates) == 0:
        return [f"T{int(rng.integers(10**12)):012d}" for _ in range(n)]
    alphabet = set("".join(templates[: min(len(templates), 2000)]))
    classes = {cls: sorted(alphabet & set(chars)) for cls, chars in
               (("digit", string.digits), ("lower", string.ascii_lowercase),
                ("upper", string.ascii_uppercase))}

    def fake(template: str) -> str:
        chars = []
        for ch in template:
            cls = ("digit" if ch.isdigit() else "lower" if ch in string.ascii_lowercase
                   else "upper" if ch in string.ascii_uppercase else None)
            pool = classes.get(cls) if cls else None
            chars.append(pool[int(rng.integers(len(pool)))] if pool else ch)
        return "".join(chars)

    return [fake(templates[int(rng.integers(len(templates)))]) for _ in range(n)]


def _fake_identifiers(kind: IdentifierKind, rng: np.random.Generator, frame: pd.DataFrame,
                      real: pd.Series, spec: SynthesisSpec) -> list[str]:
    n = len(frame)
    if kind == "national_id":
        return _fake_national_ids(rng, frame, spec)
    if kind == "person_name":
        return [_SURNAMES[int(rng.integers(len(_SURNAMES)))]
                + "".join(_GIVEN[int(rng.integers(len(_GIVEN)))]
                          for _ in range(int(rng.integers(1, 3)))) for _ in range(n)]
    if kind == "phone":
        return [_PHONE_PREFIXES[int(rng.integers(len(_PHONE_PREFIXES)))]
                + f"{int(rng.integers(10**8)):08d}" for _ in range(n)]
    if kind == "address":
        return [f"江苏省苏州市{_DISTRICTS[int(rng.integers(len(_DISTRICTS)))]}"
                f"{_ROADS[int(rng.integers(len(_ROADS)))]}{int(rng.integers(1, 999))}号"
                for _ in range(n)]
    if kind == "visit_id":
        # `<hospital>:<local number>`: the hospital from the synthetic row, the local part
        # a format-preserving fake of the real local parts.
        groups = (frame[spec.group_column].astype(str).tolist()
                  if spec.group_column in frame else ["sample"] * n)
        parts = real.dropna().astype(str).str.split(":", n=1)
        by_group = pd.Series(parts.str[-1].to_numpy()).groupby(parts.str[0].to_numpy())
        out = [""] * n
        for group in sorted(set(groups)):
            rows = [i for i, g in enumerate(groups) if g == group]
            templates = by_group.get_group(group) if group in by_group.groups else parts.str[-1]
            for i, fake in zip(rows, _fake_tokens(rng, templates, len(rows)), strict=True):
                out[i] = f"{group}:{fake}"
        return out
    return _fake_tokens(rng, real, n)


def _assign_identifiers(frame: pd.DataFrame, real: pd.DataFrame, spec: SynthesisSpec,
                        rng: np.random.Generator) -> None:
    """Fill identifier columns with fakes that are unique and absent from the real table."""
    for name, kind in spec.identifiers.items():
        taken = set(real[name].dropna().astype(str))
        values = pd.Series(_fake_identifiers(kind, rng, frame, real[name], spec),
                           index=frame.index, dtype=object)
        for _ in range(_MAX_ROUNDS):
            bad = values.isin(taken) | values.duplicated()
            if not bad.any():
                break
            redo = _fake_identifiers(kind, rng, frame[bad], real[name], spec)
            values[bad] = redo
        else:
            raise SynthesisError(f"column '{name}': could not draw fresh identifiers")
        frame[name] = values.astype(real[name].dtype) if ptypes.is_string_dtype(
            real[name]) else values


# --- evaluation ------------------------------------------------------------------------


def _comparable_columns(real: pd.DataFrame, spec: SynthesisSpec) -> list[str]:
    return [c for c in real.columns if c not in spec.identifiers]


def _canonical(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: (_days(frame[c]) if _is_date(frame[c]) else frame[c].to_numpy())
                         for c in columns})


def _row_hashes(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    return pd.util.hash_pandas_object(_canonical(frame, columns), index=False).to_numpy()


class _Features:
    """Normalized feature space for distances: numbers in [0, 1], categories one-hot/√2."""

    def __init__(self, real: pd.DataFrame, columns: list[str]) -> None:
        self.columns = columns
        canon = _canonical(real, columns)
        self.numeric = [c for c in columns if ptypes.is_numeric_dtype(canon[c])
                        and not ptypes.is_bool_dtype(canon[c])]
        self.categorical = [c for c in columns if c not in self.numeric]
        self.low = {c: float(np.nanmin(canon[c])) for c in self.numeric}
        self.span = {c: float(np.nanmax(canon[c]) - self.low[c]) or 1.0 for c in self.numeric}
        self.levels = {c: sorted(map(str, canon[c].astype(str).unique()))
                       for c in self.categorical}

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        canon = _canonical(frame, self.columns)
        parts = [((canon[c].to_numpy(float) - self.low[c]) / self.span[c]) for c in self.numeric]
        blocks = [np.nan_to_num(np.column_stack(parts), nan=-1.0)] if parts else []
        for c in self.categorical:
            codes = pd.Categorical(canon[c].astype(str), categories=self.levels[c]).codes
            onehot = np.zeros((len(frame), len(self.levels[c])))
            known = codes >= 0
            onehot[np.flatnonzero(known), codes[known]] = 1.0
            blocks.append(onehot / math.sqrt(2))
        return np.hstack(blocks) if blocks else np.zeros((len(frame), 0))


def _distances_to_real(real_x: np.ndarray, synthetic_x: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    finder = NearestNeighbors(n_neighbors=1).fit(real_x)
    return finder.kneighbors(synthetic_x)[0][:, 0]


def _real_reference_dcr(real_x: np.ndarray, rng: np.random.Generator) -> float:
    """5th percentile of each (probed) real record's distance to its nearest other record."""
    from sklearn.neighbors import NearestNeighbors

    if len(real_x) < 3:
        return 0.0
    probe = rng.choice(len(real_x), size=min(len(real_x), 1000), replace=False)
    finder = NearestNeighbors(n_neighbors=2).fit(real_x)
    return float(np.percentile(finder.kneighbors(real_x[probe])[0][:, 1], 5))


def _correlation_codes(frame: pd.DataFrame, real: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    out = {}
    for c in columns:
        if _is_date(real[c]):
            out[c] = _days(frame[c])
        elif ptypes.is_numeric_dtype(real[c]) and not ptypes.is_bool_dtype(real[c]):
            out[c] = frame[c].to_numpy(float)
        else:
            order = {v: i for i, v in enumerate(real[c].value_counts().index)}
            out[c] = frame[c].map(order).to_numpy(float)
    return pd.DataFrame(out)


def evaluate_sample(real: pd.DataFrame, synthetic: pd.DataFrame, spec: SynthesisSpec,
                    dcr_threshold: float | None = None, seed: int = 0,
                    _real_p5: float | None = None) -> SynthesisReport:
    """Fidelity (KS / TVD per column, correlation gap) and privacy (DCR, exact copies).

    `dcr_threshold=None` uses AUTO_DCR_FRACTION of the real-to-real 5th percentile.
    """
    from scipy import stats

    rng = np.random.default_rng(seed)
    columns = _comparable_columns(real, spec)
    fidelity: dict[str, ColumnFidelity] = {}
    for c in columns:
        if _is_date(real[c]) or (ptypes.is_numeric_dtype(real[c])
                                 and not ptypes.is_bool_dtype(real[c])):
            a = _canonical(real, [c])[c].dropna().to_numpy(float)
            b = _canonical(synthetic, [c])[c].dropna().to_numpy(float)
            value = float(stats.ks_2samp(a, b).statistic) if len(a) and len(b) else 1.0
            fidelity[c] = ColumnFidelity(metric="ks", value=value)
        else:
            p = real[c].astype(str).value_counts(normalize=True)
            q = synthetic[c].astype(str).value_counts(normalize=True)
            tvd = 0.5 * float(p.subtract(q, fill_value=0).abs().sum())
            fidelity[c] = ColumnFidelity(metric="tvd", value=tvd)
    real_corr = _correlation_codes(real, real, columns).corr(method="spearman").to_numpy()
    syn_corr = _correlation_codes(synthetic, real, columns).corr(method="spearman").to_numpy()
    upper = np.triu_indices(len(columns), k=1)
    gaps = np.nan_to_num(np.abs(real_corr - syn_corr)[upper], nan=0.0)
    worst = int(np.argmax(gaps)) if len(gaps) else None
    features = _Features(real, columns)
    real_x = features.transform(real)
    real_p5 = _real_reference_dcr(real_x, rng) if _real_p5 is None else _real_p5
    if dcr_threshold is None:
        dcr_threshold = AUTO_DCR_FRACTION * real_p5
    dcr = _distances_to_real(real_x, features.transform(synthetic))
    real_hashes = set(_row_hashes(real, columns).tolist())
    exact = int(sum(h in real_hashes for h in _row_hashes(synthetic, columns).tolist()))
    return SynthesisReport(
        rows=len(synthetic), seed=seed, fidelity=fidelity,
        correlation_mean_abs_diff=float(gaps.mean()) if len(gaps) else 0.0,
        correlation_max_abs_diff=float(gaps.max()) if len(gaps) else 0.0,
        correlation_max_pair=(columns[upper[0][worst]], columns[upper[1][worst]])
        if worst is not None else None,
        dcr_threshold=dcr_threshold, dcr_min=float(dcr.min()),
        dcr_p5=float(np.percentile(dcr, 5)), dcr_median=float(np.median(dcr)),
        real_dcr_p5=real_p5, exact_matches=exact,
        rows_below_threshold=int((dcr < dcr_threshold).sum()),
        identifier_columns=sorted(spec.identifiers),
    )


# --- the sample ------------------------------------------------------------------------


def _frame_from_draw(drawn: dict[str, np.ndarray], real: pd.DataFrame,
                     spec: SynthesisSpec) -> pd.DataFrame:
    frame = pd.DataFrame(index=range(len(next(iter(drawn.values())))))
    for name in real.columns:
        if name in spec.identifiers or name in spec.sums:
            frame[name] = None
            continue
        values = drawn[name]
        base = spec.offsets.get(name)
        if base is not None:
            base_values = drawn[base]
            values = values + base_values
        if _is_date(real[name]):
            frame[name] = _dates_like(values, real[name])
        elif real[name].dtype.kind in "iu" and not np.isnan(values.astype(float)).any():
            frame[name] = values.astype(real[name].dtype)
        elif ptypes.is_bool_dtype(real[name]) and not pd.isna(values).any():
            frame[name] = values.astype(bool)
        else:
            frame[name] = values
    for target, parts in spec.sums.items():
        frame[target] = sum(frame[p] for p in parts)
        if real[target].dtype.kind in "iu":
            frame[target] = frame[target].astype(real[target].dtype)
    return frame


def synthesize(real: pd.DataFrame, n_rows: int, seed: int, spec: SynthesisSpec | None = None,
               dcr_threshold: float | None = None) -> SyntheticSample:
    """Draw `n_rows` synthetic rows shaped like `real`; no real row, no real identifier.

    Rows closer than `dcr_threshold` to a real record (normalized features; None means
    AUTO_DCR_FRACTION of the real-to-real 5th percentile) are dropped and redrawn.
    """
    from sklearn.neighbors import NearestNeighbors

    if n_rows < 1 or len(real) < 2:
        raise SynthesisError("need n_rows >= 1 and a real table of at least 2 rows")
    spec = spec or infer_spec(real)
    for name in [*spec.identifiers, *spec.sums, *spec.offsets]:
        if name not in real.columns:
            raise SynthesisError(f"spec names column '{name}' that the table lacks")
    rng = np.random.default_rng(seed)
    modelled = [c for c in real.columns if c not in spec.identifiers and c not in spec.sums]
    copula = _fit_copula(real, spec, modelled, rng)
    columns = _comparable_columns(real, spec)
    features = _Features(real, columns)
    real_x = features.transform(real)
    real_p5 = _real_reference_dcr(real_x, np.random.default_rng(seed))
    if dcr_threshold is None:
        dcr_threshold = AUTO_DCR_FRACTION * real_p5
    finder = NearestNeighbors(n_neighbors=1).fit(real_x)
    real_hashes = set(_row_hashes(real, columns).tolist())
    kept: list[pd.DataFrame] = []
    have = dropped_exact = dropped_close = rounds = 0
    while have < n_rows:
        rounds += 1
        if rounds > _MAX_ROUNDS:
            raise SynthesisError(f"could not reach {n_rows} rows above DCR threshold "
                                 f"{dcr_threshold} in {_MAX_ROUNDS} rounds")
        batch = _frame_from_draw(copula.sample(int((n_rows - have) * 1.1) + 8, rng), real, spec)
        exact = np.array([h in real_hashes for h in _row_hashes(batch, columns).tolist()])
        close = finder.kneighbors(features.transform(batch))[0][:, 0] < dcr_threshold
        dropped_exact += int(exact.sum())
        dropped_close += int((close & ~exact).sum())
        batch = batch[~(exact | close)]
        kept.append(batch)
        have += len(batch)
    table = pd.concat(kept, ignore_index=True).iloc[:n_rows].reset_index(drop=True)
    _assign_identifiers(table, real, spec, rng)
    table = table[list(real.columns)]
    report = evaluate_sample(real, table, spec, dcr_threshold, seed, real_p5).model_copy(
        update={"dropped_exact_matches": dropped_exact, "dropped_too_close": dropped_close,
                "rounds": rounds})
    return SyntheticSample(table=table, report=report)


# --- the test library ------------------------------------------------------------------


Masking = Callable[[pd.DataFrame], pd.DataFrame]


def sample_test_rows(authorized: pd.DataFrame, n_rows: int, seed: int,
                     mask: Masking | None = None) -> pd.DataFrame:
    """A small random sample of authorized rows, desensitized by the grade rules.

    `mask` defaults to `governance.desensitize.desensitize_visits` (the grading policy's
    masking of the common visit model); pass another callable for other tables. It must
    return a frame with the same rows.
    """
    if n_rows < 1:
        raise SynthesisError("n_rows must be >= 1")
    if mask is None:
        from governance.desensitize import desensitize_visits

        mask = desensitize_visits
    chosen = authorized.sample(n=min(n_rows, len(authorized)), random_state=seed)
    masked = mask(chosen.reset_index(drop=True).copy())
    if not isinstance(masked, pd.DataFrame) or len(masked) != len(chosen):
        raise SynthesisError("mask must return a DataFrame with the same number of rows")
    return masked


# --- library files ---------------------------------------------------------------------


class TableInfo(BaseModel):
    rows: int
    columns: list[str]


class LibraryInfo(BaseModel):
    """`library.json`: which tier a library directory is and what it holds."""

    model_config = ConfigDict(extra="forbid")

    kind: LibraryKind
    tables: dict[str, TableInfo]
    created_at: str
    reports: dict[str, dict] = Field(default_factory=dict)


def write_library(directory: Path | str, kind: LibraryKind, tables: Mapping[str, pd.DataFrame],
                  reports: Mapping[str, BaseModel | dict] | None = None) -> LibraryInfo:
    """Write `<table>.parquet` files and `library.json` atomically into a new directory."""
    target = Path(directory)
    if target.exists() and any(target.iterdir()):
        raise LibraryError(f"{target}: already exists and is not empty")
    if not tables or not all(n.isidentifier() and n.islower() for n in tables):
        raise LibraryError("table names must be non-empty lowercase identifiers")
    info = LibraryInfo(
        kind=kind,
        tables={n: TableInfo(rows=len(t), columns=[str(c) for c in t.columns])
                for n, t in tables.items()},
        created_at=dt.datetime.now(dt.UTC).isoformat(),
        reports={n: r.model_dump(mode="json") if isinstance(r, BaseModel) else dict(r)
                 for n, r in (reports or {}).items()},
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, table in tables.items():
            table.to_parquet(stage / f"{name}.parquet", index=False)
        (stage / LIBRARY_FILE).write_text(info.model_dump_json(indent=2), encoding="utf-8")
        if target.exists():
            target.rmdir()
        stage.rename(target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return info


def read_library_info(directory: Path | str) -> LibraryInfo:
    path = Path(directory) / LIBRARY_FILE
    try:
        return LibraryInfo.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise LibraryError(f"{directory}: no {LIBRARY_FILE}") from exc
    except (ValueError, ValidationError) as exc:
        raise LibraryError(f"{path}: {exc}") from exc
