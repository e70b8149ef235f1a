"""Bits, not counts: every engine answers the nested three-bit verdict of `docs/verdict.md`.

- On the generated scenario (500 claims of every kind) plus hand-made claims with two or
  three visits in the window, `plain`, `he` and `ss` give identical verdicts, equal to
  the ground truth; `payable` needs ONE visit that passes every test.
- Mounted as the insurer: what it can see after adding the two `ss` result shares (or
  reading the `plain` answer) is bit-for-bit the same for a person with 1, 2 or 3
  visits in the window, for honest claims and for claim shares it crafts freely
  (values that wrap the ring included). Controls show the old count output and the old
  subtraction form of the circuit would have told the three persons apart.

Engines are driven directly, as in tests/test_claim_engines.py; `ss` runs as three real
OS processes (operator, regulator, dealer) on loopback with mutual TLS.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mpc.claim import (
    OPERATOR,
    REGULATOR,
    SERVER,
    CandidateIndex,
    InsurerClaims,
    bits_frame,
    encode_claims,
    encode_visit_rows,
    evaluate_he,
    evaluate_plain,
    finish_verdicts,
    he_verdict_payload,
    plain_verdicts,
    share_visit_rows,
    ss_shares,
)
from mpc.claim.errors import MalformedInput
from mpc.he import HeDecryptionKey
from mpc.ss.loopback import LoopbackCluster
from scenarios.claim_check.generator import CLAIM_KINDS, claim_verdict, generate

K = 4
HE_KEY = HeDecryptionKey.generate()  # the regulator's
HOSPITAL = "hospital-1"
DAY = dt.date(2025, 3, 10)
TRUTH_COLUMNS = ["claim_id", "visit_found", "amount_consistent", "diagnosis_covered",
                 "payable"]

# Hand-made people with several visits in one claim's +-1-day window (the generator
# keeps one person's visits at one hospital >= 4 days apart, so it never plants these).
# Each: visits (day offset, self-pay fen, diagnosis), the claim (claimed fen, diagnosis)
# and the verdict the rule gives (found, amount, covered, payable). Policies cover J18
# and K35 with no deductible.
MULTI = {
    # amount passes only on the K35 visit, diagnosis only on the J18 visit: not payable
    "split": ([(0, 1_000, "J18.0"), (1, 100_000, "K35.1")], (5_000, "J18.9"),
              (True, True, False, "0.00")),
    "split-reversed": ([(-1, 100_000, "K35.1"), (1, 1_000, "J18.0")], (5_000, "J18.9"),
                       (True, True, False, "0.00")),
    "each-test-elsewhere": ([(-1, 1_000, "K35.1"), (0, 100_000, "K35.1"),
                             (1, 1_000, "J18.0")], (5_000, "J18.9"),
                            (True, True, False, "0.00")),
    # both tests on one of the two visits: payable
    "one-visit-passes": ([(0, 1_000, "J18.0"), (1, 100_000, "J18.2")], (5_000, "J18.9"),
                         (True, True, True, "50.00")),
    "both-pass": ([(-1, 9_000, "J18.0"), (0, 100_000, "J18.2")], (5_000, "J18.9"),
                  (True, True, True, "50.00")),
    "neither-amount": ([(0, 1_000, "J18.0"), (1, 2_000, "J18.2")], (5_000, "J18.9"),
                       (True, False, False, "0.00")),
    "uncovered-on-one-visit": ([(0, 100_000, "I10.0"), (1, 1_000, "J18.0")],
                               (5_000, "I10.9"), (True, True, False, "0.00")),
}
SPLIT = ("split", "split-reversed", "each-test-elsewhere")
ONE_VISIT = ("one-visit-passes", "both-pass")


def _nid(i: int) -> str:
    return f"99{i:016d}"


def _multi_frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    visits, claims, policies, truth = [], [], [], []
    for i, (name, (person_visits, (claimed, code), verdict)) in enumerate(MULTI.items()):
        nid = _nid(i)
        for offset, self_pay, dx in person_visits:
            visits.append({"national_id": nid, "hospital_id": HOSPITAL,
                           "admission_date": DAY + dt.timedelta(days=offset),
                           "self_pay_fen": self_pay, "diagnosis_code": dx})
        claims.append({"claim_id": f"M-{name}", "insurer": "insurer-a", "national_id": nid,
                       "hospital_id": HOSPITAL, "visit_date": DAY.isoformat(),
                       "claimed_fen": claimed, "diagnosis_code": code})
        policies.append({"policy_id": f"PM{i:03d}", "insurer": "insurer-a",
                         "national_id": nid, "covered_categories": "J18;K35",
                         "deductible_fen": 0})
        truth.append((f"M-{name}", *verdict))
    return (pd.DataFrame(visits), pd.DataFrame(claims), pd.DataFrame(policies),
            pd.DataFrame(truth, columns=TRUTH_COLUMNS))


class Scenario:
    """The generated scenario plus the hand-made multi-visit people, as the engines see it."""

    def __init__(self, root: Path) -> None:
        generate(root, hospitals=3, patients=3000, claims=3000, seed=14, progress=False)
        visits = pq.read_table(root / "ground_truth" / "visits.parquet").to_pandas()
        claims = pd.read_csv(root / "claims.csv", dtype={"national_id": str})
        policies = pd.read_csv(root / "policies.csv", dtype={"national_id": str})
        truth = pd.read_csv(root / "ground_truth" / "claims_truth.csv", dtype=str)
        self.kinds = truth["kind"]
        truth = truth[TRUTH_COLUMNS].copy()
        for col in ("visit_found", "amount_consistent", "diagnosis_covered"):
            truth[col] = truth[col].map({"true": True, "false": False})
        m_visits, m_claims, m_policies, m_truth = _multi_frames()
        columns = ["national_id", "hospital_id", "admission_date", "self_pay_fen",
                   "diagnosis_code"]
        self.window_visits, self.window_ids = _window_people(100)
        self.hidden_visits, self.hidden_ids = _hidden_visit_people(200)
        self.visits = pd.concat([visits[columns], m_visits, self.window_visits,
                                 self.hidden_visits], ignore_index=True)
        self.claims = pd.concat([claims, m_claims], ignore_index=True)
        self.policies = pd.concat([policies, m_policies], ignore_index=True)
        self.truth = pd.concat([truth, m_truth], ignore_index=True)
        self.rows = encode_visit_rows(self.visits)
        self.index = CandidateIndex(_keys(self.visits))

    def slots(self, claims: pd.DataFrame):
        return self.index.plan(_keys(claims), K)


def _keys(frame: pd.DataFrame) -> list[tuple[str, str]]:
    return list(zip(frame["national_id"].astype(str), frame["hospital_id"].astype(str),
                    strict=True))


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Scenario:
    return Scenario(tmp_path_factory.mktemp("bits") / "data")


@pytest.fixture(scope="module")
def cluster(scenario):
    c = LoopbackCluster(share_visit_rows(scenario.visits))
    yield c
    c.close()


def _bits(mode: str, claims: pd.DataFrame, scenario: Scenario, cluster) -> pd.DataFrame:
    """The decoded private bits of one batch in one engine."""
    insurer = InsurerClaims(mode, K, HE_KEY.public if mode == "he" else None)
    query = insurer.encode_claims(claims)
    slots = scenario.slots(claims)
    if mode == "plain":
        answers = {SERVER: evaluate_plain(query.payloads[SERVER], scenario.rows, slots)}
    elif mode == "he":
        answer = evaluate_he(HE_KEY.public, query.payloads[SERVER], scenario.rows, slots)
        answers = {REGULATOR: he_verdict_payload(HE_KEY, answer, len(claims), K)}
    else:
        result = cluster.evaluate(f"bits-{len(claims)}-{claims.iloc[0].claim_id}",
                                  (query.payloads[OPERATOR], query.payloads[REGULATOR]), slots)
        answers = {OPERATOR: result.operator_blob, REGULATOR: result.regulator_blob}
    return insurer.decode_verdicts(query, answers)


@pytest.fixture(scope="module")
def verdicts(scenario, cluster) -> dict[str, pd.DataFrame]:
    return {mode: finish_verdicts(scenario.claims, scenario.policies,
                                  _bits(mode, scenario.claims, scenario, cluster))
            for mode in ("plain", "he", "ss")}


def _old_count_verdicts(claims: pd.DataFrame, scenario: Scenario) -> pd.DataFrame:
    """CONTROL: the verdict the old engines gave, from per-test counts over the slots."""
    slots = scenario.slots(claims)
    enc = encode_claims(claims).values
    rows = scenario.rows[slots.row_index]
    found = slots.valid & (np.abs(rows[..., 0] - enc[:, None, 0]) <= 1)
    counts = np.stack([found.sum(1), (found & (enc[:, None, 1] <= rows[..., 1])).sum(1),
                       (found & (rows[..., 2] == enc[:, None, 2])).sum(1)], 1)
    frame = pd.DataFrame({"claim_id": claims["claim_id"].astype(str).to_numpy()})
    for j, name in enumerate(("visit_found", "amount_consistent", "diagnosis_match")):
        frame[name] = counts[:, j] >= 1
    return finish_verdicts(claims, scenario.policies, frame)


# -- the rule, on the generated scenario and on several visits in the window -----------------


def test_scenario_has_500_claims_of_every_kind_and_multi_visit_claims(scenario):
    counts = scenario.kinds.value_counts()
    assert set(counts.index) == set(CLAIM_KINDS) and (counts >= 500).all()
    near = scenario.visits.merge(
        scenario.claims[scenario.claims["claim_id"].str.startswith("M-")],
        on=["national_id", "hospital_id"])
    gap = (pd.to_datetime(near["admission_date"]) - pd.to_datetime(near["visit_date"])).dt.days
    assert (near[gap.abs() <= 1].groupby("claim_id").size() >= 2).all()


def test_ground_truth_oracle_follows_the_nested_rule(scenario):
    # the generator's oracle, on the hand-made people
    for name, (person_visits, (claimed, code), verdict) in MULTI.items():
        visits = [(np.datetime64(DAY + dt.timedelta(days=o), "D"), s, dx)
                  for o, s, dx in person_visits]
        found, amount, covered, fen = claim_verdict(np.datetime64(DAY, "D"), claimed, code,
                                                    visits, {"J18", "K35"}, 0)
        assert (found, amount, covered, f"{fen // 100}.{fen % 100:02d}") == verdict, name
    # the plaintext reference's pandas join, on everything
    oracle = plain_verdicts(scenario.claims, scenario.visits, scenario.policies)
    pd.testing.assert_frame_equal(oracle, scenario.truth)


@pytest.mark.parametrize("mode", ["plain", "he", "ss"])
def test_every_engine_equals_the_ground_truth(verdicts, scenario, mode):
    pd.testing.assert_frame_equal(verdicts[mode], scenario.truth)


def test_payable_needs_one_visit_that_passes_every_test(verdicts, scenario):
    ids = scenario.claims["claim_id"]
    for mode, frame in verdicts.items():
        by_id = frame.set_index("claim_id")
        for name in SPLIT:
            got = by_id.loc[f"M-{name}"]
            assert got["amount_consistent"] and not got["diagnosis_covered"], (mode, name)
            assert got["payable"] == "0.00", (mode, name)
        for name in ONE_VISIT:
            assert by_id.loc[f"M-{name}", "payable"] == "50.00", (mode, name)
    # CONTROL: the old per-test counts pay the split claims (tests on two different visits)
    old = _old_count_verdicts(scenario.claims[ids.isin([f"M-{n}" for n in SPLIT])], scenario)
    assert (old["payable"] == "50.00").all() and old["diagnosis_covered"].all()


# -- count recovery, mounted as the insurer ---------------------------------------------------


def _window_people(first: int) -> tuple[pd.DataFrame, list[str]]:
    """Three people alike but for the number of visits in the window: 1, 2 and 3."""
    visits = []
    ids = [_nid(first + n) for n in (1, 2, 3)]
    for nid, n in zip(ids, (1, 2, 3), strict=True):
        for offset in (0, -1, 1)[:n]:
            visits.append({"national_id": nid, "hospital_id": HOSPITAL,
                           "admission_date": DAY + dt.timedelta(days=offset),
                           "self_pay_fen": 80_000, "diagnosis_code": "J18.0"})
    return pd.DataFrame(visits), ids


def _hidden_visit_people(first: int) -> tuple[pd.DataFrame, list[str]]:
    """A with one visit on DAY; B with the same visit and a second, cheaper one on DAY.

    Every honest claim sees the most a window can pay, so it cannot tell A from B; a
    claimed amount that wraps would ask about the cheapest visit instead."""
    a, b = _nid(first), _nid(first + 1)
    visit = {"hospital_id": HOSPITAL, "admission_date": DAY, "diagnosis_code": "J18.0"}
    return pd.DataFrame([{**visit, "national_id": a, "self_pay_fen": 80_000},
                         {**visit, "national_id": b, "self_pay_fen": 80_000},
                         {**visit, "national_id": b, "self_pay_fen": 12_345}]), [a, b]


# Claims the insurer may choose (claimed fen, diagnosis), all on the day whose window holds
# every visit of the three people: each is sent, word for word, about each of them.
PROBES = [(5_000, "J18.9"), (0, "J18.9"), (80_000, "J18.1"), (80_001, "J18.9"),
          (5_000, "K35.1"), (0, "K35.1"), (2**31 - 1, "C34.0")]


class WindowPeople:
    """The probes about the three people, planned against the scenario's whole table."""

    def __init__(self, scenario: Scenario) -> None:
        self.rows = scenario.rows
        claims = []
        for p, (claimed, code) in enumerate(PROBES):
            for nid in scenario.window_ids:
                claims.append({"claim_id": f"P{p}-{nid}", "insurer": "insurer-a",
                               "national_id": nid, "hospital_id": HOSPITAL,
                               "visit_date": DAY.isoformat(),
                               "claimed_fen": claimed, "diagnosis_code": code})
        self.claims = pd.DataFrame(claims)
        self.slots = scenario.slots(self.claims)


@pytest.fixture(scope="module")
def people(scenario) -> WindowPeople:
    return WindowPeople(scenario)


def _insurer_view(mode: str, values: np.ndarray, people: WindowPeople, cluster,
                  batch: str) -> np.ndarray:
    """What the insurer holds after the answer: the opened [n, 3] result, exactly.

    `values` are the claim fields as the insurer chose to encode them (any int64).
    """
    if mode == "plain":
        answer = evaluate_plain(ss_shares.pack(ss_shares.KIND_CLAIMS, values), people.rows,
                                people.slots)
        return ss_shares.unpack(answer, ss_shares.KIND_RESULT)
    if mode == "he":  # what the regulator answers the insurer (it never sees a ciphertext)
        from mpc.he import encrypt_claims

        answer = evaluate_he(HE_KEY.public, encrypt_claims(HE_KEY.public, values, K),
                             people.rows, people.slots)
        return ss_shares.unpack(he_verdict_payload(HE_KEY, answer, len(values), K),
                                ss_shares.KIND_RESULT)
    share_op, share_reg = ss_shares.split(values)
    result = cluster.evaluate(batch, (ss_shares.pack(ss_shares.KIND_CLAIMS, share_op),
                                      ss_shares.pack(ss_shares.KIND_CLAIMS, share_reg)),
                              people.slots)
    return ss_shares.combine(ss_shares.unpack(result.operator_blob, ss_shares.KIND_RESULT),
                             ss_shares.unpack(result.regulator_blob, ss_shares.KIND_RESULT))


def _per_person(view: np.ndarray) -> np.ndarray:
    """[probes, 3 people, 3 values]: claims were laid out probe by probe, person by person."""
    return view.reshape(-1, 3, 3)


def _old_counts(values: np.ndarray, people: WindowPeople) -> np.ndarray:
    """CONTROL: the old engines' output, per-test counts over the valid slots."""
    rows = people.rows[people.slots.row_index]
    found = people.slots.valid & (np.abs(rows[..., 0] - values[:, None, 0]) <= 1)
    return np.stack([found.sum(1), (found & (values[:, None, 1] <= rows[..., 1])).sum(1),
                     (found & (rows[..., 2] == values[:, None, 2])).sum(1)], 1)


@pytest.mark.parametrize("mode", ["plain", "he", "ss"])
def test_insurer_cannot_tell_one_two_or_three_visits_apart(mode, people, cluster):
    values = encode_claims(people.claims).values
    view = _per_person(_insurer_view(mode, values, people, cluster, f"count-{mode}"))
    assert np.isin(view, (0, 1)).all()
    for person in (1, 2):  # bit for bit what the one-visit person gets
        assert (view[:, person] == view[:, 0]).all(), (mode, view)
    assert (view[0, 0] == 1).all()  # the honest claim is verified: the bits say something
    # CONTROL: the old output names the number of visits (1, 2, 3) for the honest claim
    old = _per_person(_old_counts(values, people))
    assert old[0, :, 0].tolist() == [1, 2, 3]
    assert not (old[:, 1] == old[:, 0]).all()


def _subtraction_form(values: np.ndarray, people: WindowPeople) -> np.ndarray:
    """CONTROL: the opened result if the slot tests used 1 - ltz(x) - ltz(y) for the ANDs
    (the cheap form, wrong where both signs are negative) under the nested OR."""
    rows = people.rows[people.slots.row_index]
    with np.errstate(over="ignore"):
        d = rows[..., 0] - values[:, None, 0]
        e = rows[..., 2] - values[:, None, 2]
        ltz = lambda x: (x < 0).astype(np.int64)  # noqa: E731
        date = 1 - ltz(d + 1) - ltz(1 - d)
        amount = 1 - ltz(rows[..., 1] - values[:, None, 1])
        diag = 1 - ltz(e) - ltz(-e)
        f = people.slots.valid * date
        levels = np.stack([f, f * amount, f * amount * diag], 1)
        return 1 - np.prod(1 - levels, axis=-1)


def test_claim_shares_that_wrap_the_ring_open_only_bits(people, cluster):
    """The insurer writes its own shares: a claim day and a category offset by 2^63 make
    the cheap subtraction form -1 on every visit of the window, so its OR would be
    1 - 2^visits. The circuit's products keep every opened value a bit, the same for the
    three people."""
    honest = encode_claims(people.claims).values
    wrap = np.int64(-2**63)
    crafted = []
    with np.errstate(over="ignore"):
        for day_shift, cat_shift, claimed in ((wrap, 0, None), (0, wrap, None),
                                              (wrap, wrap, None), (wrap, wrap, -1),
                                              (wrap - 1, 0, 2**62)):
            v = honest.copy()
            v[:, 0] += day_shift
            v[:, 2] += cat_shift
            if claimed is not None:
                v[:, 1] = claimed
            crafted.append(v)
    for i, values in enumerate(crafted):
        control = _per_person(_subtraction_form(values, people))
        for mode in ("plain", "ss"):
            view = _per_person(_insurer_view(mode, values, people, cluster,
                                             f"wrap-{i}-{mode}"))
            assert np.isin(view, (0, 1)).all(), (i, mode, view)
            assert (view[:, 1] == view[:, 0]).all() and (view[:, 2] == view[:, 0]).all()
        if i == 0:  # CONTROL: the cheap form would have opened 1 - 2^visits
            assert control[0, :, 0].tolist() == [-1, -3, -7]


def _hidden_probe_view(mode: str, scenario: Scenario, cluster, claimed: list[int],
                       batch: str) -> np.ndarray:
    """[probes, 2 people, 3 bits]: A and B asked the same J18 claims on DAY, the claimed
    amounts encoded as the insurer chooses (any int64)."""
    claims = pd.DataFrame([{"claim_id": f"H{i}-{nid}", "insurer": "insurer-a",
                            "national_id": nid, "hospital_id": HOSPITAL,
                            "visit_date": DAY.isoformat(), "claimed_fen": 0,
                            "diagnosis_code": "J18.9"}
                           for i in range(len(claimed)) for nid in scenario.hidden_ids])
    values = encode_claims(claims).values.copy()
    values[:, 1] = np.repeat(np.asarray(claimed, dtype=np.int64), 2)
    slots = scenario.slots(claims)
    if mode == "plain":
        answer = evaluate_plain(ss_shares.pack(ss_shares.KIND_CLAIMS, values), scenario.rows,
                                slots)
        return ss_shares.unpack(answer, ss_shares.KIND_RESULT).reshape(-1, 2, 3)
    share_op, share_reg = ss_shares.split(values)
    result = cluster.evaluate(batch, (ss_shares.pack(ss_shares.KIND_CLAIMS, share_op),
                                      ss_shares.pack(ss_shares.KIND_CLAIMS, share_reg)), slots)
    return ss_shares.combine(
        ss_shares.unpack(result.operator_blob, ss_shares.KIND_RESULT),
        ss_shares.unpack(result.regulator_blob, ss_shares.KIND_RESULT)).reshape(-1, 2, 3)


@pytest.mark.parametrize("mode", ["plain", "ss"])
def test_a_wrapping_claimed_amount_cannot_find_a_hidden_visit(mode, scenario, cluster):
    """The insurer encodes claimed = c + 2^63: without a range check on shares the amount
    test becomes [self_pay < c] on every slot, which tells B (a second visit of 12,345
    fen) from A and bisects that visit's self-pay in 31 queries. The engines check the
    claimed amount's range inside the circuit, so A and B answer alike."""
    honest = [0, 5_000, 12_345, 12_346, 80_000, 80_001, 2**31 - 1]
    wrap = 2**63
    crafted = [c - wrap for c in (12_345, 12_346, 50_000, 80_000, 80_001)]  # c + 2^63
    with np.errstate(over="ignore"):
        crafted += [-1, -(2**62), 2**31, 2**62]
    views = {name: _hidden_probe_view(mode, scenario, cluster, amounts, f"hidden-{name}-{mode}")
             for name, amounts in (("honest", honest), ("crafted", crafted))}
    for name, view in views.items():
        assert np.isin(view, (0, 1)).all(), name
        assert (view[:, 0] == view[:, 1]).all(), (name, view)  # A and B look the same
    assert views["crafted"][:, :, 1:].sum() == 0  # an amount out of range never passes
    # CONTROL: the amount test without the range check ([self_pay - c' >= 0] in the ring)
    # tells them apart: B's hidden visit sits between the probes 12,345 and 12,346
    def unchecked(self_pays: list[int]) -> list[bool]:
        with np.errstate(over="ignore"):
            return [bool((np.array(self_pays, dtype=np.int64) - np.int64(c) >= 0).any())
                    for c in crafted[:2]]
    assert unchecked([80_000]) == [False, False]  # A
    assert unchecked([80_000, 12_345]) == [False, True]  # B


def test_ss_circuit_matches_plain_on_crafted_shares(people, cluster):
    """Whatever the insurer encodes, `ss` opens what the plain reference computes."""
    rng = np.random.default_rng(1)  # test inputs only, no secret
    values = encode_claims(people.claims).values.copy()
    values[::2, 1] = rng.integers(-2**63, 2**63 - 1, size=len(values[::2]), dtype=np.int64)
    values[1::3, 0] = rng.integers(-2**63, 2**63 - 1, size=len(values[1::3]), dtype=np.int64)
    plain = _insurer_view("plain", values, people, cluster, "random-plain")
    ss = _insurer_view("ss", values, people, cluster, "random-ss")
    assert (plain == ss).all()


# -- the decoder takes bits, never counts -----------------------------------------------------


def test_decoder_refuses_counts_and_unnested_bits():
    ids = ("a", "b")
    assert bits_frame(ids, np.array([[1, 1, 0], [0, 0, 0]])).iloc[0].tolist() == [
        "a", True, True, False]
    with pytest.raises(MalformedInput, match="not verdict bits"):
        bits_frame(ids, np.array([[2, 1, 1], [0, 0, 0]]))
    with pytest.raises(MalformedInput, match="not nested"):
        bits_frame(ids, np.array([[1, 0, 1], [0, 0, 0]]))
    with pytest.raises(MalformedInput, match="shape"):
        bits_frame(ids, np.array([[1, 1, 1]]))
    claims = pd.DataFrame([{"claim_id": "a", "insurer": "i", "national_id": "n",
                            "hospital_id": HOSPITAL, "visit_date": DAY.isoformat(),
                            "claimed_fen": 1, "diagnosis_code": "J18.0"}])
    counts = pd.DataFrame([{"claim_id": "a", "visit_found": 2, "amount_consistent": 2,
                            "diagnosis_match": 1}])
    with pytest.raises(MalformedInput, match="not a bit"):
        finish_verdicts(claims, pd.DataFrame(columns=["insurer", "national_id",
                                                      "covered_categories",
                                                      "deductible_fen"]), counts)
