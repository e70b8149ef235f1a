"""The claim-check data generator: IDs, determinism, the visit guarantee, claims truth."""

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from governance.consent import consent_signing_key
from governance.scan import is_mobile_phone, national_id_check_character
from scenarios.claim_check import national_id
from scenarios.claim_check.generator import (
    CLAIM_KINDS,
    INSURERS,
    GenerationError,
    consumer_consent_key,
    consumer_master_seed,
    generate,
)

# Published examples: GB 11643-1999 appendix and the widely cited Beijing example.
VALID_IDS = ["11010519491231002X", "440524188001010014", "110101199003074477"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    generate(out, hospitals=3, patients=300, claims=60, seed=11, progress=False,
             chunk_patients=120)
    return out


@pytest.mark.parametrize("nid", VALID_IDS)
def test_check_character_of_published_examples(nid: str) -> None:
    assert national_id.check_character(nid[:17]) == nid[17]
    assert national_id.is_valid(nid)
    assert national_id_check_character(nid[:17]) == nid[17]  # the scanner's own code


def test_check_character_rejects_one_wrong_digit() -> None:
    wrong = "11010519491231003X"
    assert not national_id.is_valid(wrong)


def test_generated_ids_are_unique_valid_and_encode_birth_and_sex(generated: Path) -> None:
    keys = pd.read_json(generated / "consumer_keys.jsonl", lines=True, dtype=False)
    ids = keys["national_id"].tolist()
    assert len(ids) == 300 and len(set(ids)) == 300
    visits = pq.read_table(generated / "ground_truth" / "visits.parquet").to_pandas()
    for row in visits.drop_duplicates("national_id").itertuples():
        nid = row.national_id
        assert national_id.is_valid(nid)
        assert nid[6:14] == row.birth_date.strftime("%Y%m%d")
        assert ("M" if int(nid[16]) % 2 else "F") == row.sex
        assert nid[:2] in {"32", "34", "41", "51", "31", "11", "42", "43", "37", "33"}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        generate(out, patients=150, claims=12, seed=seed, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 10
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "claims.csv").read_bytes() != (c / "claims.csv").read_bytes()


def test_no_two_visits_of_a_person_at_a_hospital_within_three_days(generated: Path) -> None:
    visits = pq.read_table(generated / "ground_truth" / "visits.parquet").to_pandas()
    visits["adm"] = pd.to_datetime(visits["admission_date"])
    for _, group in visits.groupby(["national_id", "hospital_id"]):
        days = group["adm"].sort_values().diff().dt.days.dropna()
        assert (days > 3).all()
    assert (visits["total_fen"] == visits["covered_fen"] + visits["self_pay_fen"]).all()
    assert (visits["self_pay_fen"] > 0).all()
    assert (pd.to_datetime(visits["discharge_date"]) >= visits["adm"]).all()


def test_phones_are_real_mobile_numbers(generated: Path) -> None:
    visits = pq.read_table(generated / "ground_truth" / "visits.parquet").to_pandas()
    phones = visits["phone"].dropna()
    assert phones.str.fullmatch(r"\d{11}").all()
    assert all(is_mobile_phone(p) for p in phones)


def _oracle(claims: pd.DataFrame, visits: pd.DataFrame, policies: pd.DataFrame) -> pd.DataFrame:
    """The verdict of `docs/verdict.md`, written again from the files alone."""
    policy = policies.set_index("national_id")
    rows = []
    for c in claims.itertuples():
        date = dt.date.fromisoformat(c.visit_date)
        mine = visits[(visits.national_id == c.national_id) & (visits.hospital_id == c.hospital_id)]
        near = mine[[abs((d - date).days) <= 1 for d in mine.admission_date]]
        found = len(near) == 1
        assert len(near) <= 1  # the generator's guarantee makes "that visit" unique
        v = near.iloc[0] if found else None
        amount = found and c.claimed_fen <= v.self_pay_fen
        cats = set(policy.loc[c.national_id, "covered_categories"].split(";"))
        category = v.diagnosis_code[:3] if found else None
        # nested: the diagnosis counts only on a visit whose amount is consistent too
        covered = amount and category == c.diagnosis_code[:3] and category in cats
        payable = 0
        if covered:
            payable = max(0, c.claimed_fen - int(policy.loc[c.national_id, "deductible_fen"]))
        rows.append((c.claim_id, found, amount, covered, f"{payable // 100}.{payable % 100:02d}"))
    return pd.DataFrame(rows, columns=["claim_id", "visit_found", "amount_consistent",
                                       "diagnosis_covered", "payable"])


def test_claims_truth_matches_an_independent_oracle(generated: Path) -> None:
    claims = pd.read_csv(generated / "claims.csv", dtype={"national_id": str})
    assert list(claims.columns) == ["claim_id", "insurer", "national_id", "hospital_id",
                                    "visit_date", "claimed_fen", "diagnosis_code"]
    truth = pd.read_csv(generated / "ground_truth" / "claims_truth.csv", dtype=str)
    visits = pq.read_table(generated / "ground_truth" / "visits.parquet").to_pandas()
    policies = pd.read_csv(generated / "policies.csv", dtype={"national_id": str})
    expected = _oracle(claims, visits, policies)
    for col in ("visit_found", "amount_consistent", "diagnosis_covered"):
        assert truth[col].tolist() == expected[col].map({True: "true", False: "false"}).tolist()
    assert truth["payable"].tolist() == expected["payable"].tolist()
    assert set(claims["insurer"]) <= {"insurer-a", "insurer-b"}
    # The claimant's insurer is the insurer of their policy.
    by_person = policies.set_index("national_id")["insurer"]
    assert (claims["insurer"].to_numpy() == by_person.loc[claims["national_id"]].to_numpy()).all()


def test_planted_kinds_have_their_verdicts_in_equal_shares(generated: Path) -> None:
    truth = pd.read_csv(generated / "ground_truth" / "claims_truth.csv", dtype=str)
    assert truth["kind"].value_counts().to_dict() == dict.fromkeys(CLAIM_KINDS, 10)
    flags = truth.set_index("kind")[["visit_found", "amount_consistent", "diagnosis_covered"]]
    expected = {
        "true": ("true", "true", "true"), "inflated": ("true", "false", "false"),
        "fabricated": ("false", "false", "false"), "uncovered": ("true", "true", "false"),
        "date_off_by_one": ("true", "true", "true"),
        "date_off_by_several": ("false", "false", "false"),
    }
    for kind, want in expected.items():
        assert {tuple(r) for r in flags.loc[[kind]].to_numpy()} == {want}, kind
    assert (truth.loc[truth.kind == "inflated", "payable"] == "0.00").all()
    assert (truth.loc[truth.kind == "true", "payable"] != "0.00").any()


def test_consumer_keys_are_reproducible_and_one_per_insurer(generated: Path) -> None:
    lines = (generated / "consumer_keys.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    nid, master = first["national_id"], first["master_seed"]
    assert set(first) == {"national_id", "master_seed", "public_keys"}
    assert consumer_master_seed(11, nid).hex() == master
    assert consumer_master_seed(12, nid).hex() != master
    assert set(first["public_keys"]) == set(INSURERS)
    for insurer, public in first["public_keys"].items():
        key = consumer_consent_key(11, nid, insurer)
        assert key.public_key().public_bytes_raw().hex() == public
        assert key.private_bytes_raw() == consent_signing_key(bytes.fromhex(master),
                                                              insurer).private_bytes_raw()
    # no fixed public key follows a person across insurers, nor two people share one
    every = [k for line in lines for k in json.loads(line)["public_keys"].values()]
    assert len(set(every)) == len(every) == len(INSURERS) * len(lines)


def test_raw_exports_use_their_own_schemas(generated: Path) -> None:
    truth = json.loads((generated / "ground_truth" / "schema_truth.json").read_text())
    h1 = pd.read_csv(generated / "raw" / "hospital-1.csv", dtype=str)
    h2 = pd.read_parquet(generated / "raw" / "hospital-2.parquet")
    h3 = pd.read_json(generated / "raw" / "hospital-3.jsonl", lines=True, dtype=False)
    for frame, hospital in ((h1, "hospital-1"), (h2, "hospital-2"), (h3, "hospital-3")):
        assert list(frame.columns) == list(truth[hospital]["columns"])
    assert h1["admit_date"].str.fullmatch(r"\d{4}-\d{2}-\d{2}").all()
    assert h2["入院日期"].str.fullmatch(r"\d{8}").all()
    assert h3["inDate"].str.fullmatch(r"\d{2}/\d{2}/\d{4}").all()
    assert h2["诊断编码"].str.contains(".", regex=False).sum() == 0
    assert h1["dx_code"].str.contains(".", regex=False).any()
    assert str(h2["总费用"].dtype) == "int64"
    assert h3["fee_total"].str.fullmatch(r"\d+\.\d{2}").all()
    assert set(h1["gender"]) == {"1", "2"} and set(h2["性别"]) == {"男", "女"}


def test_a_failed_generation_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(GenerationError):
        generate(tmp_path, patients=2, claims=60, seed=1, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(GenerationError):
        generate(tmp_path, patients=0, progress=False)
