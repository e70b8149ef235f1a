"""Claim-risk training data that each hospital builds from its own records.

A hospital knows its visits; from each one it derives labelled claim-like
examples: an honest claim (at most the self-paid amount, on the visit's
dates), an inflated one (more than was self-paid) and a fabricated one (a date
with no visit of that person there). The features are what a hospital can
compute locally; the file format is `federated`'s local-data Parquet
(numeric features, `label`, `split`). Nothing here leaves the hospital: the
federated run trains on these files where they lie.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from governance.standardize import standardize_source
from scenarios.claim_check.generator import hospital_ids, raw_file_name

FEATURES = (
    "log_claimed", "log_self_pay", "claimed_over_self_pay", "days_from_visit",
    "length_of_stay", "log_total", "covered_share", "diagnosis_matches",
)


@dataclass(frozen=True)
class HospitalFeatures:
    hospital: str
    path: Path
    rows: int
    anomalous_share: float


def claim_risk_examples(visits: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Three labelled examples per visit (honest, inflated, fabricated), shuffled."""
    rng = np.random.default_rng(seed)
    n = len(visits)
    self_pay = visits["self_pay_fen"].to_numpy(dtype=np.float64)
    total = visits["total_fen"].to_numpy(dtype=np.float64)
    covered = visits["covered_fen"].to_numpy(dtype=np.float64)
    stay = (pd.to_datetime(visits["discharge_date"]) - pd.to_datetime(visits["admission_date"]))
    stay_days = stay.dt.days.to_numpy(dtype=np.float64)
    frames = []
    for kind in ("honest", "inflated", "fabricated"):
        if kind == "honest":
            claimed = self_pay * rng.uniform(0.6, 1.0, n)
            offset = rng.integers(-1, 2, n).astype(np.float64)
            matches = np.ones(n)
        elif kind == "inflated":
            claimed = self_pay * rng.uniform(1.05, 2.5, n) + rng.uniform(100, 5000, n)
            offset = rng.integers(-1, 2, n).astype(np.float64)
            matches = (rng.random(n) < 0.9).astype(np.float64)
        else:
            claimed = self_pay * rng.uniform(0.3, 1.5, n) + rng.uniform(0, 3000, n)
            offset = rng.integers(5, 60, n).astype(np.float64) * rng.choice([-1, 1], n)
            matches = (rng.random(n) < 0.3).astype(np.float64)
        frames.append(pd.DataFrame({
            "log_claimed": np.log1p(claimed),
            "log_self_pay": np.log1p(self_pay),
            "claimed_over_self_pay": np.minimum(claimed / np.maximum(self_pay, 1.0), 10.0),
            "days_from_visit": np.minimum(np.abs(offset), 60.0),
            "length_of_stay": stay_days,
            "log_total": np.log1p(total),
            "covered_share": covered / np.maximum(total, 1.0),
            "diagnosis_matches": matches,
            "label": np.int8(kind != "honest"),
        }))
    examples = pd.concat(frames, ignore_index=True)
    examples = examples.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    examples["split"] = np.where(rng.random(len(examples)) < 0.8, "train", "test")
    return examples


def write_hospital_features(
    data_dir: Path, out_dir: Path, hospitals: int = 3, seed: int = 7
) -> list[HospitalFeatures]:
    """Each hospital standardizes its own export and writes its local training file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, hospital in enumerate(hospital_ids(hospitals)):
        source = standardize_source(data_dir / "raw" / raw_file_name(index), hospital)
        examples = claim_risk_examples(source.table.to_pandas(), seed + index)
        path = out_dir / f"{hospital}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        examples.to_parquet(tmp, index=False)
        tmp.replace(path)
        written.append(HospitalFeatures(hospital, path, len(examples),
                                        float(examples["label"].mean())))
    return written


def write_holdout(files: list[Path], out: Path) -> Path:
    """The evaluation set: the hospitals' `test` rows, for the report only."""
    frames = [pd.read_parquet(f) for f in files]
    held = pd.concat([f[f["split"] == "test"] for f in frames], ignore_index=True)
    held.drop(columns=["split"]).to_parquet(out, index=False)
    return out
