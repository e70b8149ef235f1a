"""A small synthetic claim-check dataset in the model's columns, for tests and benches.

The scenario's full generator lives in `scenarios/claim_check`; engines cannot import
it, so this one plants the same claim kinds on a few hundred people: `true`,
`inflated`, `fabricated`, `uncovered`, `date_off_by_one`, `date_off_by_several`.
Visits of one person at one hospital are at least 25 days apart, so at most one
visit is ever within a claim's window.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd

KINDS = ("true", "inflated", "fabricated", "uncovered", "date_off_by_one",
         "date_off_by_several")
CATEGORIES = ("J18", "J20", "K35", "I10", "E11", "S72", "N39", "A09", "M54", "C34")
INSURERS = ("insurer-a", "insurer-b")
_START = dt.date(2023, 1, 1)


@dataclass(frozen=True)
class Dataset:
    visits: pd.DataFrame
    claims: pd.DataFrame  # model columns plus `kind`
    policies: pd.DataFrame


def _national_id(i: int) -> str:
    return f"32050{i:012d}X"


def make_dataset(n_claims: int = 600, seed: int = 7, hospitals: int = 3) -> Dataset:
    rng = np.random.default_rng(seed)
    people = max(50, n_claims // 2)
    visits = []
    for p in range(people):
        for h in range(1, hospitals + 1):
            count = rng.integers(0, 4)
            day = int(rng.integers(0, 40))
            for _ in range(count):
                day += int(rng.integers(25, 90))
                self_pay = int(rng.integers(0, 500_000))
                covered = int(rng.integers(0, 2_000_000))
                visits.append({
                    "visit_id": f"hospital-{h}:V{len(visits):06d}",
                    "hospital_id": f"hospital-{h}",
                    "national_id": _national_id(p),
                    "admission_date": _START + dt.timedelta(days=day),
                    "discharge_date": _START + dt.timedelta(days=day + int(rng.integers(0, 5))),
                    "diagnosis_code": f"{rng.choice(CATEGORIES)}.{rng.integers(0, 10)}",
                    "total_fen": self_pay + covered,
                    "covered_fen": covered,
                    "self_pay_fen": self_pay,
                })
    visits_df = pd.DataFrame(visits)
    policies = []
    for p in range(people):
        covered = [c for c in CATEGORIES if rng.random() < 0.6]
        policies.append({
            "policy_id": f"P{p:07d}",
            "insurer": INSURERS[p % 2],
            "national_id": _national_id(p),
            "covered_categories": ";".join(covered),
            "deductible_fen": int(rng.choice([0, 10_000, 50_000])),
        })
    policies_df = pd.DataFrame(policies)
    covered_of = {r.national_id: set(r.covered_categories.split(";")) if r.covered_categories
                  else set() for r in policies_df.itertuples()}
    insurer_of = dict(zip(policies_df["national_id"], policies_df["insurer"], strict=True))
    claims = []
    for i in range(n_claims):
        kind = KINDS[i % len(KINDS)]
        v = visits_df.iloc[int(rng.integers(0, len(visits_df)))]
        category = v.diagnosis_code.split(".")[0]
        date = v.admission_date
        claimed = int(rng.integers(0, v.self_pay_fen + 1))
        code = f"{category}.{rng.integers(0, 10)}"
        hospital = v.hospital_id
        if kind == "inflated":
            claimed = v.self_pay_fen + int(rng.integers(1, 100_000))
        elif kind == "fabricated":
            date = v.admission_date + dt.timedelta(days=int(rng.choice([-1, 1]) *
                                                             rng.integers(3, 10)))
        elif kind == "uncovered":
            others = [c for c in CATEGORIES if c not in covered_of[v.national_id]]
            if others and rng.random() < 0.5:  # same category as the visit, not covered
                covered_of[v.national_id].discard(category)
                code = f"{category}.{rng.integers(0, 10)}"
            else:  # a category the visit does not have
                code = f"{rng.choice([c for c in CATEGORIES if c != category])}.1"
        elif kind == "date_off_by_one":
            date = v.admission_date + dt.timedelta(days=int(rng.choice([-1, 1])))
        elif kind == "date_off_by_several":
            date = v.admission_date + dt.timedelta(days=int(rng.choice([-1, 1]) *
                                                             rng.integers(2, 11)))
        claims.append({
            "claim_id": f"C{i:07d}",
            "insurer": insurer_of[v.national_id],
            "national_id": v.national_id,
            "hospital_id": hospital,
            "visit_date": date.isoformat(),
            "claimed_fen": claimed,
            "diagnosis_code": code,
            "kind": kind,
        })
    policies_df["covered_categories"] = [";".join(sorted(covered_of[n]))
                                         for n in policies_df["national_id"]]
    return Dataset(visits_df, pd.DataFrame(claims), policies_df)
