"""Seeded generator of the claim-check scenario's source data and its ground truth.

Hospitals export visits in their own schemas (CSV, Parquet, JSON lines); the insurers
hold policies and claims; consumers hold a master seed from which their apps derive one
Ed25519 consent key per insurer. Everything is written
in chunks of patients, so a million patients run in bounded memory, into a staging
directory that is renamed into place only when the whole generation succeeded.
"""

import hashlib
import hmac
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from governance.consent import consent_signing_key
from governance.standardize import COMMON_VISIT_SCHEMA
from scenarios.claim_check import reference_data as ref
from scenarios.claim_check.national_id import check_characters

CLAIM_KINDS = (
    "true", "inflated", "fabricated", "uncovered", "date_off_by_one", "date_off_by_several",
)
INSURERS = ("insurer-a", "insurer-b")
WINDOW_START = np.datetime64("2024-07-01", "D")
WINDOW_DAYS = 640  # visits are admitted between 2024-07-01 and 2026-03-31
MIN_SAME_HOSPITAL_GAP = 4  # days between two admissions of one person at one hospital
CHUNK_PATIENTS = 50_000
INSURED_SHARE = 0.7
DEDUCTIBLES_FEN = (0, 10_000, 20_000, 50_000)
_KEY_SALT = b"cogov/claim_check/consumer-key/v1"


class GenerationError(ValueError):
    """The generation request cannot be satisfied (bad sizes, too few candidates)."""

    http_status = 400


@dataclass
class GenerationSummary:
    out_dir: Path
    seed: int
    hospitals: int
    patients: int
    visits: int
    policies: int
    claims: int
    visits_by_hospital: dict[str, int]
    claims_by_kind: dict[str, int]
    files: list[str]
    seconds: float
    patients_per_second: float = field(init=False)

    def __post_init__(self) -> None:
        self.patients_per_second = self.patients / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Layout:
    """How one family of hospital information systems exports its visits."""

    file_format: str  # csv | parquet | jsonl
    columns: dict[str, str]  # common field (or local visit number) -> raw column
    date_format: str  # strftime-style description, documented in docs/raw-formats.md
    code_format: str  # dotted | undotted
    amount_unit: str  # yuan | fen
    sex_codes: tuple[str, str]  # (male, female)
    decoys: tuple[str, ...]
    hidden: dict[str, str]  # raw column -> sensitive type embedded in free text


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        file_format="csv",
        columns={
            "local_visit_no": "record_no", "national_id": "pid", "name": "patient_name",
            "sex": "gender", "birth_date": "dob", "phone": "mobile", "address": "home_addr",
            "admission_date": "admit_date", "discharge_date": "discharge_date",
            "diagnosis_code": "dx_code", "total_fen": "total_amount",
            "covered_fen": "insurance_paid", "self_pay_fen": "self_paid",
        },
        date_format="%Y-%m-%d", code_format="dotted", amount_unit="yuan",
        sex_codes=("1", "2"),
        decoys=("id_card_checked", "phone_ext", "name", "mrn"),
        hidden={"remark": "phone"},
    ),
    Layout(
        file_format="parquet",
        columns={
            "local_visit_no": "就诊流水号", "national_id": "身份证号", "name": "姓名",
            "sex": "性别", "birth_date": "出生日期", "phone": "联系电话", "address": "家庭住址",
            "admission_date": "入院日期", "discharge_date": "出院日期",
            "diagnosis_code": "诊断编码", "total_fen": "总费用", "covered_fen": "统筹支付",
            "self_pay_fen": "个人自付",
        },
        date_format="%Y%m%d", code_format="undotted", amount_unit="fen",
        sex_codes=("男", "女"),
        decoys=("身份证已核验", "电话分机", "病区位置", "发票号"),
        hidden={},
    ),
    Layout(
        file_format="jsonl",
        columns={
            "local_visit_no": "visitNo", "national_id": "cust_ref", "name": "holder",
            "sex": "sex", "birth_date": "born", "phone": "contact", "address": "loc",
            "admission_date": "inDate", "discharge_date": "outDate",
            "diagnosis_code": "icd", "total_fen": "fee_total", "covered_fen": "fund_paid",
            "self_pay_fen": "own_paid",
        },
        date_format="%d/%m/%Y", code_format="dotted", amount_unit="yuan",
        sex_codes=("M", "F"),
        decoys=("id_card_checked", "phone_ext", "name"),
        hidden={},
    ),
)
_LOCAL_PREFIX = ("V", "ZY", "OP-")
_SENSITIVE_FIELDS = {
    "national_id": "national_id", "name": "name", "phone": "phone", "address": "address",
    "birth_date": "birth_date", "diagnosis_code": "diagnosis",
}
_EXTENSIONS = {"csv": "csv", "parquet": "parquet", "jsonl": "jsonl"}


def hospital_ids(hospitals: int) -> list[str]:
    return [f"hospital-{i + 1}" for i in range(hospitals)]


def layout_of(hospital_index: int) -> Layout:
    """Hospital i (0-based) uses layout i mod 3: CSV, Parquet, JSON lines, CSV, ..."""
    return LAYOUTS[hospital_index % len(LAYOUTS)]


def raw_file_name(hospital_index: int) -> str:
    return f"hospital-{hospital_index + 1}.{_EXTENSIONS[layout_of(hospital_index).file_format]}"


# --- consumer keys -------------------------------------------------------------------


def consumer_master_seed(seed: int, national_id: str) -> bytes:
    """The 32-byte master seed of a consumer's app, derived from the seed (HKDF-SHA256)."""
    prk = hmac.new(_KEY_SALT, seed.to_bytes(16, "big", signed=True), hashlib.sha256).digest()
    return HKDFExpand(SHA256(), 32, national_id.encode("ascii")).derive(prk)


def consumer_consent_key(seed: int, national_id: str, insurer: str) -> Ed25519PrivateKey:
    """The consumer's consent key for `insurer` (`governance.consent.consent_signing_key`)."""
    return consent_signing_key(consumer_master_seed(seed, national_id), insurer)


def _consumer_key_lines(seed: int, national_ids: list[str]) -> str:
    """One JSON line per consumer: the app's master seed and the public consent key it
    registers with the health authority for each insurer."""
    prk = hmac.new(_KEY_SALT, seed.to_bytes(16, "big", signed=True), hashlib.sha256).digest()
    lines = []
    for nid in national_ids:
        master = HKDFExpand(SHA256(), 32, nid.encode("ascii")).derive(prk)
        public = {insurer: consent_signing_key(master, insurer).public_key().public_bytes_raw()
                  .hex() for insurer in INSURERS}
        lines.append(json.dumps({"national_id": nid, "master_seed": master.hex(),
                                 "public_keys": public}) + "\n")
    return "".join(lines)


# --- patients ------------------------------------------------------------------------


def _weights(pairs: tuple[tuple[str, float], ...]) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([p[0] for p in pairs], dtype=object)
    w = np.array([p[1] for p in pairs], dtype=float)
    return values, w / w.sum()


_REGIONS, _REGION_P = _weights(ref.REGION_CODES)
_SURNAMES, _SURNAME_P = _weights(ref.SURNAMES)
_GIVEN = np.array(list(ref.GIVEN_NAME_CHARS), dtype=object)
_PREFIXES = np.array(ref.MOBILE_PREFIXES, dtype=object)
_STREETS = [(d, s) for d, streets in ref.SUZHOU_STREETS.items() for s in streets]
_DX = ref.DIAGNOSES
_DX_CODES = np.array([d.code for d in _DX], dtype=object)
_CATEGORIES = sorted({d.category for d in _DX})
_DX_CAT = np.array([_CATEGORIES.index(d.category) for d in _DX])
_DX_LOS_LO = np.array([d.los_days[0] for d in _DX])
_DX_LOS_HI = np.array([d.los_days[1] for d in _DX])
_DX_MEDIAN_FEN = np.array([d.median_yuan * 100 for d in _DX])
_O80 = next(i for i, d in enumerate(_DX) if d.code == "O80")


def _dx_probabilities(sex: str) -> np.ndarray:
    w = np.array([d.weight if d.sex in ("", sex) else 0.0 for d in _DX])
    return w / w.sum()


_DX_P = {"M": _dx_probabilities("M"), "F": _dx_probabilities("F")}


def _days(column: pd.Series) -> np.ndarray:
    return column.to_numpy().astype("datetime64[D]")


def _digits(rng: np.random.Generator, n: int, width: int) -> list[str]:
    return [f"{v:0{width}d}" for v in rng.integers(0, 10**width, size=n).tolist()]


def _phones(rng: np.random.Generator, n: int) -> list[str]:
    prefixes = rng.choice(_PREFIXES, size=n).tolist()
    return [p + s for p, s in zip(prefixes, _digits(rng, n, 8), strict=True)]


def _national_ids(
    rng: np.random.Generator, regions: np.ndarray, birth: np.ndarray, male: np.ndarray,
    used: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Unique IDs for this chunk, avoiding the sorted `used` keys; returns (ids, keys)."""
    n = len(regions)
    ymd = np.char.replace(np.datetime_as_string(birth, unit="D"), "-", "")
    region_int = regions.astype(np.int64)
    ymd_int = ymd.astype(np.int64)
    seq = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while len(todo):
        seq[todo] = rng.integers(1, 500, size=len(todo)) * 2 - 1 + (~male[todo]).astype(np.int64)
        keys = region_int * 10**11 + ymd_int * 1000 + seq
        clash = np.zeros(n, dtype=bool)
        if len(used):
            pos = np.minimum(np.searchsorted(used, keys), len(used) - 1)
            clash = used[pos] == keys
        _, first = np.unique(keys, return_index=True)
        dup = np.ones(n, dtype=bool)
        dup[first] = False
        todo = np.flatnonzero(clash | dup)
    first17 = np.char.add(np.char.add(regions.astype(str), ymd), np.char.zfill(seq.astype(str), 3))
    ids = np.char.add(first17, check_characters(first17))
    return ids.astype(object), keys


def _patients(
    rng: np.random.Generator, n: int, used: np.ndarray
) -> tuple[pd.DataFrame, np.ndarray]:
    male = rng.random(n) < 0.49
    regions = rng.choice(_REGIONS, size=n, p=_REGION_P).astype(str)
    ages_days = rng.integers(1, 92 * 365, size=n)
    birth = WINDOW_START - ages_days.astype("timedelta64[D]")
    ids, keys = _national_ids(rng, regions, birth, male, used)
    surnames = rng.choice(_SURNAMES, size=n, p=_SURNAME_P).tolist()
    given_len = np.where(rng.random(n) < 0.25, 1, 2)
    g1 = rng.choice(_GIVEN, size=n).tolist()
    g2 = rng.choice(_GIVEN, size=n).tolist()
    names = [
        s + a + (b if k == 2 else "")
        for s, a, b, k in zip(surnames, g1, g2, given_len.tolist(), strict=True)
    ]
    streets = rng.integers(0, len(_STREETS), size=n).tolist()
    numbers = rng.integers(1, 600, size=n).tolist()
    buildings = rng.integers(1, 30, size=n).tolist()
    rooms = (rng.integers(1, 28, size=n) * 100 + rng.integers(1, 6, size=n)).tolist()
    has_flat = (rng.random(n) < 0.6).tolist()
    addresses = []
    for st, no, bd, rm, flat in zip(streets, numbers, buildings, rooms, has_flat, strict=True):
        district, street = _STREETS[st]
        tail = f"{bd}幢{rm}室" if flat else ""
        addresses.append(f"江苏省苏州市{district}{street}{no}号{tail}")
    typo_draw = rng.random(n).tolist()
    typo_names = [_typo(nm) if r < 0.01 else None for nm, r in zip(names, typo_draw, strict=True)]
    old_phones = _phones(rng, n)
    changed_phone = rng.random(n) < 0.02
    frame = pd.DataFrame(
        {
            "national_id": ids,
            "name": names,
            "phone": _phones(rng, n),
            "address": addresses,
            "birth_day": birth,
            "sex": np.where(male, "M", "F"),
            "typo_name": typo_names,
            "old_phone": np.where(changed_phone, np.array(old_phones, dtype=object), None),
        }
    )
    return frame, keys


def _typo(name: str) -> str | None:
    for i in range(len(name) - 1, 0, -1):
        if name[i] in ref.NAME_TYPO:
            return name[:i] + ref.NAME_TYPO[name[i]] + name[i + 1 :]
    return None


# --- visits --------------------------------------------------------------------------


def _visits(rng: np.random.Generator, patients: pd.DataFrame, hospitals: int) -> pd.DataFrame:
    n = len(patients)
    counts = rng.choice(6, size=n, p=[0.2, 0.35, 0.25, 0.12, 0.05, 0.03])
    person = np.repeat(np.arange(n), counts)
    v = len(person)
    hosp = rng.integers(0, hospitals, size=v)
    adm = rng.integers(0, WINDOW_DAYS, size=v)
    sex = patients["sex"].to_numpy()[person]
    dx = np.empty(v, dtype=np.int64)
    for s in ("M", "F"):
        mask = sex == s
        dx[mask] = rng.choice(len(_DX), size=int(mask.sum()), p=_DX_P[s])
    adm = _spread_admissions(person, hosp, adm)
    birth = _days(patients["birth_day"])[person]
    adm_day = WINDOW_START + adm.astype("timedelta64[D]")
    age_years = (adm_day - birth).astype(np.int64) / 365.25
    dx[(dx == _O80) & ((age_years < 18) | (age_years > 45))] = 0  # J06.9
    los = rng.integers(_DX_LOS_LO[dx], _DX_LOS_HI[dx] + 1)
    total = np.maximum(
        500, np.rint(_DX_MEDIAN_FEN[dx] * np.exp(rng.normal(0.0, 0.45, size=v)))
    ).astype(np.int64)
    covered = np.floor(total * rng.uniform(0.45, 0.85, size=v)).astype(np.int64)
    return pd.DataFrame(
        {
            "person": person,
            "hosp": hosp,
            "admission_day": adm_day,
            "discharge_day": adm_day + los.astype("timedelta64[D]"),
            "dx": dx,
            "total_fen": total,
            "covered_fen": covered,
            "self_pay_fen": total - covered,
        }
    )


def _spread_admissions(person: np.ndarray, hosp: np.ndarray, adm: np.ndarray) -> np.ndarray:
    """Push admissions so one person's visits at one hospital are >= 4 days apart."""
    order = np.lexsort((adm, hosp, person))
    out = adm.copy()
    p_s, h_s, a_s = person[order].tolist(), hosp[order].tolist(), adm[order].tolist()
    prev_key, prev_adm = None, 0
    for k, (p, h, a) in enumerate(zip(p_s, h_s, a_s, strict=True)):
        if (p, h) == prev_key and a < prev_adm + MIN_SAME_HOSPITAL_GAP:
            a = prev_adm + MIN_SAME_HOSPITAL_GAP
        out[order[k]] = a
        prev_key, prev_adm = (p, h), a
    return out


# --- policies and claims -------------------------------------------------------------


_Policy = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _policies(rng: np.random.Generator, n: int) -> _Policy:
    """(insured mask, insurer index, covered matrix [n, categories], deductible fen)."""
    insured = rng.random(n) < INSURED_SHARE
    insurer = rng.integers(0, len(INSURERS), size=n)
    excluded = rng.integers(6, 14, size=n)
    ranks = rng.random((n, len(_CATEGORIES))).argsort(axis=1).argsort(axis=1)
    covered = ranks >= excluded[:, None]
    deductible = rng.choice(np.array(DEDUCTIBLES_FEN), size=n)
    return insured, insurer, covered, deductible


def claim_verdict(
    visit_date: np.datetime64,
    claimed_fen: int,
    diagnosis_code: str,
    visits: list[tuple[np.datetime64, int, str]],
    covered_categories: set[str],
    deductible_fen: int,
) -> tuple[bool, bool, bool, int]:
    """The plaintext oracle of `docs/verdict.md`: (found, amount ok, covered, payable fen).

    `visits` are (admission date, self-pay fen, diagnosis code) of that person at that
    hospital. Each bit asks for ONE visit in the window: found = some visit; amount =
    some visit with claimed <= its self-pay; covered = some visit with claimed <= its
    self-pay AND the claim's category (the nested rule), which the policy covers.
    """
    near = [v for v in visits if abs(int((v[0] - visit_date).astype(np.int64))) <= 1]
    category = diagnosis_code.split(".")[0]
    fits = [v for v in near if claimed_fen <= v[1]]
    same = [v for v in fits if v[2].split(".")[0] == category]
    covered = bool(same) and category in covered_categories
    payable = max(0, claimed_fen - deductible_fen) if covered else 0
    return bool(near), bool(fits), covered, payable


def _claims(
    rng: np.random.Generator,
    kinds: list[str],
    first_claim_no: int,
    patients: pd.DataFrame,
    visits: pd.DataFrame,
    policy: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    hospital_names: list[str],
) -> list[dict[str, Any]]:
    insured, insurer, covered, deductible = policy
    person = visits["person"].to_numpy()
    hosp = visits["hosp"].to_numpy()
    adm = _days(visits["admission_day"])
    dx = visits["dx"].to_numpy()
    self_pay = visits["self_pay_fen"].to_numpy()
    by_key: dict[tuple[int, int], list[tuple[np.datetime64, int, str]]] = {}
    for p, h, a, d, s in zip(person, hosp, adm, dx, self_pay, strict=True):
        by_key.setdefault((int(p), int(h)), []).append((a, int(s), _DX_CODES[d]))
    visit_insured = insured[person]
    visit_covered = covered[person, _DX_CAT[dx]]
    pools = {
        "covered": np.flatnonzero(visit_insured & visit_covered),
        "uncovered": np.flatnonzero(visit_insured & ~visit_covered),
        "insured": np.flatnonzero(insured),
    }
    nids = patients["national_id"].tolist()
    out = []
    for offset, kind in enumerate(kinds):
        pool = pools["uncovered" if kind == "uncovered" else
                     "insured" if kind == "fabricated" else "covered"]
        if len(pool) == 0:
            raise GenerationError(f"too few insured patients with visits to plant {kind!r} claims")
        for _attempt in range(1000):
            claim = _plant(rng, kind, pool, person, hosp, adm, dx, self_pay, covered, by_key,
                           len(hospital_names))
            if claim is not None:
                break
        else:
            raise GenerationError(f"could not plant a {kind!r} claim")
        p, h, date, claimed, code = claim
        verdict = claim_verdict(
            date, claimed, code, by_key.get((p, h), []),
            {c for c, ok in zip(_CATEGORIES, covered[p], strict=True) if ok}, int(deductible[p]),
        )
        _check_kind(kind, verdict)
        out.append(
            {
                "claim_id": f"C{first_claim_no + offset:07d}",
                "insurer": INSURERS[insurer[p]],
                "national_id": nids[p],
                "hospital_id": hospital_names[h],
                "visit_date": str(date),
                "claimed_fen": claimed,
                "diagnosis_code": code,
                "kind": kind,
                "visit_found": verdict[0],
                "amount_consistent": verdict[1],
                "diagnosis_covered": verdict[2],
                "payable": f"{verdict[3] // 100}.{verdict[3] % 100:02d}",
            }
        )
    return out


def _plant(rng, kind, pool, person, hosp, adm, dx, self_pay, covered, by_key, hospitals):
    pick = int(pool[rng.integers(0, len(pool))])
    if kind == "fabricated":
        p, h = pick, int(rng.integers(0, hospitals))
        date = WINDOW_START + np.timedelta64(int(rng.integers(0, WINDOW_DAYS)), "D")
        if _visit_near(by_key.get((p, h), []), date):
            return None
        cov = np.flatnonzero(covered[p, _DX_CAT])
        code = _DX_CODES[int(rng.choice(cov))] if len(cov) else _DX_CODES[0]
        claimed = int(rng.integers(5_000, 2_000_000))
        return p, h, date, claimed, code
    p, h, date, s = int(person[pick]), int(hosp[pick]), adm[pick], int(self_pay[pick])
    code = _DX_CODES[dx[pick]]
    claimed = int(rng.integers(max(1, s // 2), s + 1))
    if kind == "inflated":
        claimed = s + int(rng.integers(1, max(2, s // 2)))
    elif kind == "date_off_by_one":
        date = date + np.timedelta64(int(rng.choice([-1, 1])), "D")
    elif kind == "date_off_by_several":
        date = date + np.timedelta64(int(rng.integers(2, 11) * rng.choice([-1, 1])), "D")
        if _visit_near(by_key[(p, h)], date):
            return None
    return p, h, date, claimed, code


def _visit_near(visits: list[tuple[np.datetime64, int, str]], date: np.datetime64) -> bool:
    return any(abs(int((v[0] - date).astype(np.int64))) <= 1 for v in visits)


_EXPECTED = {
    "true": (True, True, True),
    "inflated": (True, False, False),  # nested: no visit passes amount AND diagnosis
    "fabricated": (False, False, False),
    "uncovered": (True, True, False),
    "date_off_by_one": (True, True, True),
    "date_off_by_several": (False, False, False),
}


def _check_kind(kind: str, verdict: tuple[bool, bool, bool, int]) -> None:
    if verdict[:3] != _EXPECTED[kind]:  # a generator bug, never bad user input
        raise AssertionError(f"planted {kind} claim has verdict {verdict}")


# --- raw exports ---------------------------------------------------------------------


def _yuan(fen: np.ndarray, trim: bool) -> list[str]:
    out = [f"{f // 100}.{f % 100:02d}" for f in fen.tolist()]
    if trim:  # this system drops trailing zeros: 12.50 -> 12.5, 12.00 -> 12
        out = [s.rstrip("0").rstrip(".") for s in out]
    return out


def _dates(days: np.ndarray, fmt: str) -> list[str]:
    if len(days) == 0:
        return []
    iso = np.datetime_as_string(days, unit="D")
    if fmt == "%Y-%m-%d":
        return iso.tolist()
    if fmt == "%Y%m%d":
        return np.char.replace(iso, "-", "").tolist()
    return [f"{s[8:10]}/{s[5:7]}/{s[0:4]}" for s in iso.tolist()]


def _hospital_rows(
    rng: np.random.Generator,
    h: int,
    layout: Layout,
    rows: pd.DataFrame,
    local_no: np.ndarray,
) -> pd.DataFrame:
    """The raw export of one hospital's visits (rows carry patient and visit fields)."""
    c = layout.columns
    n = len(rows)
    codes = _DX_CODES[rows["dx"].to_numpy()]
    if layout.code_format == "undotted":
        codes = np.array([x.replace(".", "") for x in codes], dtype=object)
    male, female = layout.sex_codes
    raw: dict[str, Any] = {
        c["local_visit_no"]: [f"{_LOCAL_PREFIX[h % 3]}{x:08d}" for x in local_no.tolist()],
        c["national_id"]: rows["national_id"].tolist(),
        c["name"]: rows["recorded_name"].tolist(),
        c["sex"]: np.where(rows["sex"].to_numpy() == "M", male, female).tolist(),
        c["birth_date"]: _dates(rows["birth_day"].to_numpy(), layout.date_format),
        c["phone"]: rows["recorded_phone"].tolist(),
        c["address"]: rows["address"].tolist(),
        c["admission_date"]: _dates(rows["admission_day"].to_numpy(), layout.date_format),
        c["discharge_date"]: _dates(rows["discharge_day"].to_numpy(), layout.date_format),
        c["diagnosis_code"]: codes.tolist(),
    }
    for f in ("total_fen", "covered_fen", "self_pay_fen"):
        amounts = rows[f].to_numpy()
        raw[c[f]] = amounts if layout.amount_unit == "fen" else _yuan(amounts, h % 3 == 0)
    departments = rng.choice(np.array(ref.DEPARTMENTS, dtype=object), size=n).tolist()
    for decoy in layout.decoys:
        raw[decoy] = _decoy(rng, decoy, n, departments, rows["admission_day"].to_numpy())
    for col in layout.hidden:
        with_phone = rng.random(n) < 0.4
        phones = _phones(rng, n)
        raw[col] = [
            f"家属联系电话{p}，需复诊" if w else "无"
            for p, w in zip(phones, with_phone, strict=True)
        ]
    return pd.DataFrame(raw)


def _decoy(rng, name: str, n: int, departments: list[str], adm: np.ndarray) -> list[Any]:
    if name == "id_card_checked":
        return (rng.random(n) < 0.97).tolist()
    if name == "身份证已核验":
        return np.where(rng.random(n) < 0.97, "是", "否").tolist()
    if name == "phone_ext":
        return rng.integers(100, 10_000, size=n).tolist()
    if name == "电话分机":
        return ["8" + s for s in _digits(rng, n, 3)]
    if name == "name":
        return departments
    if name == "mrn":  # 11 digits like a phone number, but no mobile segment starts with 10
        return ["10" + s for s in _digits(rng, n, 9)]
    if name == "病区位置":
        floors = rng.integers(1, 20, size=n).tolist()
        blocks = rng.integers(1, 6, size=n).tolist()
        return [f"住院部{b}号楼{f}层" for b, f in zip(blocks, floors, strict=True)]
    if name == "发票号":  # 18 digits with a real region code and a real date: ID-shaped
        ymd = _dates(adm, "%Y%m%d")
        return ["320500" + d + s for d, s in zip(ymd, _digits(rng, n, 4), strict=True)]
    raise KeyError(name)


# --- orchestration -------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _parquet_schema(layout: Layout, columns: list[str]) -> pa.Schema:
    amounts = {layout.columns[f] for f in ("total_fen", "covered_fen", "self_pay_fen")}
    return pa.schema([(c, pa.int64() if c in amounts else pa.string()) for c in columns])


class _Writers:
    """Append-only writers of every output file inside the staging directory."""

    def __init__(self, stage: Path, hospital_names: list[str]) -> None:
        self.stage = stage
        (stage / "raw").mkdir(parents=True)
        (stage / "ground_truth").mkdir()
        self.hospital_names = hospital_names
        self.raw_paths = [stage / "raw" / raw_file_name(h) for h in range(len(hospital_names))]
        self.parquet: dict[int, pq.ParquetWriter] = {}
        self.truth: pq.ParquetWriter | None = None
        self.started: set[str] = set()

    def append_raw(self, h: int, frame: pd.DataFrame) -> None:
        layout = layout_of(h)
        path = self.raw_paths[h]
        if layout.file_format == "parquet":
            schema = _parquet_schema(layout, list(frame.columns))
            if h not in self.parquet:
                self.parquet[h] = pq.ParquetWriter(path, schema)
            self.parquet[h].write_table(
                pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
            )
        elif layout.file_format == "csv":
            self.append_csv(path, frame)
        else:
            with path.open("a", encoding="utf-8") as fh:
                for record in frame.astype(object).to_dict("records"):
                    clean = {k: None if _is_missing(v) else v for k, v in record.items()}
                    fh.write(json.dumps(clean, ensure_ascii=False) + "\n")

    def append_csv(self, path: Path, frame: pd.DataFrame) -> None:
        header = str(path) not in self.started
        self.started.add(str(path))
        frame.to_csv(path, mode="a", header=header, index=False)

    def append_truth(self, table: pa.Table) -> None:
        if self.truth is None:
            self.truth = pq.ParquetWriter(self.stage / "ground_truth" / "visits.parquet",
                                          COMMON_VISIT_SCHEMA)
        self.truth.write_table(table)

    def append_text(self, rel: str, text: str) -> None:
        with (self.stage / rel).open("a", encoding="utf-8") as fh:
            fh.write(text)

    def close(self) -> None:
        for w in self.parquet.values():
            w.close()
        if self.truth is not None:
            self.truth.close()
        for path in self.raw_paths:
            path.touch()


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = out_dir / f".generating-{time.time_ns()}"
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _publish(stage: Path, out_dir: Path) -> list[str]:
    files = sorted(p.relative_to(stage) for p in stage.rglob("*") if p.is_file())
    for rel in files:
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        (stage / rel).replace(target)
    shutil.rmtree(stage)
    return [str(f) for f in files]


def generate(
    out_dir: Path | str = "data",
    hospitals: int = 3,
    patients: int = 20_000,
    claims: int = 600,
    seed: int = 7,
    progress: bool = True,
    chunk_patients: int = CHUNK_PATIENTS,
) -> GenerationSummary:
    """Generate the scenario's source data and ground truth under `out_dir`.

    Deterministic for (seed, hospitals, patients, claims, chunk_patients).
    """
    if hospitals < 1 or patients < 1 or claims < 0 or chunk_patients < 1:
        raise GenerationError("hospitals, patients and chunk_patients must be >= 1, claims >= 0")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    names = hospital_ids(hospitals)
    root = np.random.default_rng(seed)
    kinds = [CLAIM_KINDS[i % len(CLAIM_KINDS)] for i in range(claims)]
    root.shuffle(kinds)
    bounds = [*range(0, patients, chunk_patients), patients]
    claim_cuts = [round(claims * b / patients) for b in bounds]
    used = np.array([], dtype=np.int64)
    local_counter = [0] * hospitals
    totals = {"visits": 0, "policies": 0}
    by_hospital = dict.fromkeys(names, 0)
    all_claims: list[dict[str, Any]] = []
    with _staging(out_dir) as stage, _progress(progress, patients) as bar:
        writers = _Writers(stage, names)
        for ci in range(len(bounds) - 1):
            rng = np.random.default_rng([seed, ci])
            n = bounds[ci + 1] - bounds[ci]
            people, keys = _patients(rng, n, used)
            used = np.union1d(used, keys)
            visits = _visits(rng, people, hospitals)
            policy = _policies(rng, n)
            rows = _visit_rows(rng, people, visits)
            truth_parts = []
            for h in range(hospitals):
                sel = rows[rows["hosp"] == h]
                local_no = np.arange(local_counter[h] + 1, local_counter[h] + len(sel) + 1)
                local_counter[h] += len(sel)
                by_hospital[names[h]] += len(sel)
                raw = _hospital_rows(rng, h, layout_of(h), sel, local_no)
                writers.append_raw(h, raw)
                local_ids = raw[layout_of(h).columns["local_visit_no"]]
                truth_parts.append(_truth(sel, names[h], local_ids))
            writers.append_truth(pa.concat_tables(truth_parts))
            totals["visits"] += len(visits)
            writers.append_csv(stage / "policies.csv", _policy_frame(people, policy, totals))
            writers.append_csv(stage / "ground_truth" / "conflicts.csv", _conflicts(rows))
            writers.append_text("consumer_keys.jsonl",
                                _consumer_key_lines(seed, people["national_id"].tolist()))
            all_claims += _claims(rng, kinds[claim_cuts[ci]:claim_cuts[ci + 1]],
                                  claim_cuts[ci] + 1, people, visits, policy, names)
            if bar is not None:
                bar[0].advance(bar[1], n)
        writers.close()
        _write_claims(stage, all_claims)
        _write_schema_truth(stage, names)
        files = _publish(stage, out_dir)
    seconds = time.perf_counter() - started
    return GenerationSummary(
        out_dir=out_dir, seed=seed, hospitals=hospitals, patients=patients,
        visits=totals["visits"], policies=totals["policies"], claims=len(all_claims),
        visits_by_hospital=by_hospital,
        claims_by_kind={k: kinds.count(k) for k in CLAIM_KINDS},
        files=files, seconds=seconds,
    )


@contextmanager
def _progress(enabled: bool, total: int):
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("generating patients"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn()) as bar:
        yield bar, bar.add_task("patients", total=total)


def _visit_rows(
    rng: np.random.Generator, people: pd.DataFrame, visits: pd.DataFrame
) -> pd.DataFrame:
    """Visits joined with the patient fields as each hospital recorded them."""
    p = visits["person"].to_numpy()
    hosp = visits["hosp"].to_numpy()
    rows = visits.copy()
    for col in ("national_id", "name", "phone", "address", "birth_day", "sex"):
        rows[col] = people[col].to_numpy()[p]
    typo = people["typo_name"].to_numpy()[p]
    old_phone = people["old_phone"].to_numpy()[p]
    layout_index = hosp % len(LAYOUTS)
    # Intake typos at Parquet-layout hospitals; stale phones at JSON-layout hospitals.
    use_typo = (layout_index == 1) & pd.notna(typo)
    rows["recorded_name"] = np.where(use_typo, typo, rows["name"].to_numpy())
    use_old = (layout_index == 2) & pd.notna(old_phone)
    phone = np.where(use_old, old_phone, rows["phone"].to_numpy()).astype(object)
    missing = (layout_index == 2) & (rng.random(len(rows)) < 0.02)
    phone[missing] = None
    rows["recorded_phone"] = phone
    return rows


def _str(column: pd.Series) -> pa.Array:
    return pa.array(column, type=pa.string(), from_pandas=True)


def _truth(sel: pd.DataFrame, hospital: str, local_ids: pd.Series) -> pa.Table:
    def days(col: str) -> pa.Array:
        return pa.array(sel[col].to_numpy().astype("datetime64[D]"), type=pa.date32())

    return pa.table(
        {
            "visit_id": pa.array([f"{hospital}:{x}" for x in local_ids.tolist()], pa.string()),
            "hospital_id": pa.array([hospital] * len(sel), pa.string()),
            "national_id": _str(sel["national_id"]),
            "name": _str(sel["recorded_name"]),
            "phone": _str(sel["recorded_phone"]),
            "address": _str(sel["address"]),
            "birth_date": days("birth_day"),
            "sex": _str(sel["sex"]),
            "admission_date": days("admission_day"),
            "discharge_date": days("discharge_day"),
            "diagnosis_code": pa.array(_DX_CODES[sel["dx"].to_numpy()].tolist(), pa.string()),
            "total_fen": pa.array(sel["total_fen"].to_numpy(), pa.int64()),
            "covered_fen": pa.array(sel["covered_fen"].to_numpy(), pa.int64()),
            "self_pay_fen": pa.array(sel["self_pay_fen"].to_numpy(), pa.int64()),
        },
        schema=COMMON_VISIT_SCHEMA,
    )


def _policy_frame(people: pd.DataFrame, policy, totals: dict[str, int]) -> pd.DataFrame:
    insured, insurer, covered, deductible = policy
    idx = np.flatnonzero(insured)
    first = totals["policies"] + 1
    totals["policies"] += len(idx)
    return pd.DataFrame(
        {
            "policy_id": [f"P{first + i:07d}" for i in range(len(idx))],
            "insurer": [INSURERS[insurer[i]] for i in idx],
            "national_id": people["national_id"].to_numpy()[idx],
            "covered_categories": [
                ";".join(c for c, ok in zip(_CATEGORIES, covered[i], strict=True) if ok)
                for i in idx
            ],
            "deductible_fen": deductible[idx],
        }
    )


def _conflicts(rows: pd.DataFrame) -> pd.DataFrame:
    """Persons whose name or phone differs between the hospitals that recorded them."""
    out = []
    for fld, col in (("name", "recorded_name"), ("phone", "recorded_phone")):
        distinct = rows.dropna(subset=[col]).groupby("national_id")[col].nunique()
        out += [(nid, fld) for nid in distinct[distinct > 1].index]
    return pd.DataFrame(out, columns=["national_id", "field"])


_CLAIM_COLUMNS = ["claim_id", "insurer", "national_id", "hospital_id", "visit_date",
                  "claimed_fen", "diagnosis_code"]
_TRUTH_COLUMNS = ["claim_id", "kind", "visit_found", "amount_consistent",
                  "diagnosis_covered", "payable"]


def _write_claims(stage: Path, rows: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(rows, columns=_CLAIM_COLUMNS + _TRUTH_COLUMNS[1:])
    frame = frame.sort_values("claim_id")
    frame[_CLAIM_COLUMNS].to_csv(stage / "claims.csv", index=False)
    truth = frame[_TRUTH_COLUMNS].copy()
    for col in ("visit_found", "amount_consistent", "diagnosis_covered"):
        truth[col] = truth[col].map({True: "true", False: "false"})
    truth.to_csv(stage / "ground_truth" / "claims_truth.csv", index=False)


def _write_schema_truth(stage: Path, names: list[str]) -> None:
    truth: dict[str, Any] = {}
    for h, hospital in enumerate(names):
        layout = layout_of(h)
        columns: dict[str, Any] = {}
        for fld, col in layout.columns.items():
            columns[col] = {
                "field": None if fld == "local_visit_no" else fld,
                "role": "visit_local_id" if fld == "local_visit_no" else "field",
                "sensitive_type": _SENSITIVE_FIELDS.get(fld),
            }
        for col in layout.decoys:
            columns[col] = {"field": None, "role": "decoy", "sensitive_type": None}
        for col, kind in layout.hidden.items():
            columns[col] = {"field": None, "role": "free_text", "sensitive_type": None,
                            "embedded_type": kind}
        truth[hospital] = {
            "file": f"raw/{raw_file_name(h)}",
            "format": layout.file_format,
            "date_format": layout.date_format,
            "code_format": layout.code_format,
            "amount_unit": layout.amount_unit,
            "sex_codes": {"M": layout.sex_codes[0], "F": layout.sex_codes[1]},
            "columns": columns,
        }
    (stage / "ground_truth" / "schema_truth.json").write_text(
        json.dumps(truth, ensure_ascii=False, indent=2), encoding="utf-8"
    )
