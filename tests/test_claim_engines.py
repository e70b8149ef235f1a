"""The three claim-check engines agree with the plaintext oracle, claim by claim.

`ss` runs as three real OS processes (operator, regulator, dealer) on loopback with
mutual TLS; one session serves several batches.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from mpc.claim import (
    OPERATOR,
    REGULATOR,
    SERVER,
    InsurerClaims,
    encode_visit_rows,
    evaluate_he,
    evaluate_plain,
    finish_verdicts,
    he_verdict_payload,
    plain_verdicts,
    plan_candidate_slots,
    share_visit_rows,
)
from mpc.claim.candidates import CandidateSlots
from mpc.claim.synthetic import KINDS, make_dataset
from mpc.he import HeDecryptionKey
from mpc.ss.loopback import LoopbackCluster


@pytest.fixture(scope="module")
def data():
    return make_dataset(n_claims=600, seed=11)


@pytest.fixture(scope="module")
def cluster(data):
    c = LoopbackCluster(share_visit_rows(data.visits))
    yield c
    c.close()


def _keys(frame: pd.DataFrame, id_col: str) -> list[tuple[str, str]]:
    return list(zip(frame[id_col].astype(str), frame["hospital_id"].astype(str), strict=True))


def _slots(claims: pd.DataFrame, visits: pd.DataFrame) -> CandidateSlots:
    return plan_candidate_slots(_keys(claims, "national_id"), _keys(visits, "national_id"), k=4)


def independent_verdicts(claims, visits, policies) -> pd.DataFrame:
    """The model's rules written out once more, row by row, sharing no engine code."""
    out = []
    for c in claims.itertuples(index=False):
        day = dt.date.fromisoformat(c.visit_date)
        near = [
            v for v in visits.itertuples(index=False)
            if v.national_id == c.national_id and v.hospital_id == c.hospital_id
            and abs((v.admission_date - day).days) <= 1
        ]
        policy = policies[(policies.insurer == c.insurer) & (policies.national_id ==
                                                             c.national_id)]
        covered_set = set(policy.iloc[0].covered_categories.split(";")) if len(policy) else set()
        deductible = int(policy.iloc[0].deductible_fen) if len(policy) else 0
        # one visit must pass every test: amount on that visit, then category on it too
        fits = [v for v in near if c.claimed_fen <= v.self_pay_fen]
        category = c.diagnosis_code.split(".")[0]
        same = [v for v in fits if v.diagnosis_code.split(".")[0] == category]
        covered = bool(same) and category in covered_set
        fen = max(0, c.claimed_fen - deductible) if covered else 0
        out.append((c.claim_id, bool(near), bool(fits), covered,
                    f"{fen // 100}.{fen % 100:02d}"))
    return pd.DataFrame(out, columns=["claim_id", "visit_found", "amount_consistent",
                                      "diagnosis_covered", "payable"])


def test_dataset_plants_every_kind(data):
    assert len(data.claims) >= 500
    assert set(data.claims["kind"]) == set(KINDS)


def test_plain_oracle_equals_independent_computation(data):
    oracle = plain_verdicts(data.claims, data.visits, data.policies)
    independent = independent_verdicts(data.claims, data.visits, data.policies)
    pd.testing.assert_frame_equal(oracle, independent)
    by_kind = oracle.assign(kind=data.claims["kind"].to_numpy()).groupby("kind")
    assert by_kind["visit_found"].mean()["fabricated"] == 0
    assert by_kind["visit_found"].mean()["date_off_by_several"] == 0
    assert by_kind["visit_found"].mean()["date_off_by_one"] == 1
    assert by_kind["amount_consistent"].mean()["inflated"] == 0
    assert by_kind["diagnosis_covered"].mean()["uncovered"] == 0
    assert by_kind["amount_consistent"].mean()["true"] == 1
    assert (oracle["payable"] != "0.00").any()


def test_three_engines_agree_with_oracle(data, cluster):
    claims, visits, policies = data.claims, data.visits, data.policies
    oracle = plain_verdicts(claims, visits, policies)
    rows = encode_visit_rows(visits)

    plain = InsurerClaims("plain")
    query = plain.encode_claims(claims)
    answer = evaluate_plain(query.payloads[SERVER], rows, _slots(claims, visits))
    plain_result = finish_verdicts(claims, policies,
                                   plain.decode_verdicts(query, {SERVER: answer}))

    key = HeDecryptionKey.generate()  # the regulator's
    he = InsurerClaims("he", he_public=key.public)
    query = he.encode_claims(claims)
    answer = evaluate_he(key.public, query.payloads[SERVER], rows, _slots(claims, visits))
    bits = he_verdict_payload(key, answer, len(claims), he.k)
    he_result = finish_verdicts(claims, policies, he.decode_verdicts(query, {REGULATOR: bits}))

    ss = InsurerClaims("ss")
    parts = []
    for batch, part in enumerate((claims.iloc[:250], claims.iloc[250:])):  # one session
        query = ss.encode_claims(part)
        result = cluster.evaluate(f"batch-{batch}", (query.payloads[OPERATOR],
                                                     query.payloads[REGULATOR]),
                                  _slots(part, visits))
        parts.append(ss.decode_verdicts(query, {OPERATOR: result.operator_blob,
                                                REGULATOR: result.regulator_blob}))
    ss_result = finish_verdicts(claims, policies, pd.concat(parts, ignore_index=True))

    for result in (plain_result, he_result, ss_result):
        pd.testing.assert_frame_equal(result, oracle)


def test_ss_result_shares_alone_look_random(data, cluster):
    ss = InsurerClaims("ss")
    part = data.claims.iloc[:64]
    query = ss.encode_claims(part)
    result = cluster.evaluate("shares-look-random", (query.payloads[OPERATOR],
                                                     query.payloads[REGULATOR]),
                              _slots(part, data.visits))
    from mpc.claim import ss_shares

    share = ss_shares.unpack(result.operator_blob, ss_shares.KIND_RESULT, (64, 3))
    # bits are 0/1; a lone share of them is a full-width ring element
    assert (np.abs(share) > 2**40).mean() > 0.99


def test_ss_runs_over_mutual_tls_only(cluster):
    operator = cluster.audit_operator()
    assert operator["torch_distributed_initialized"] is False
    assert operator["communicator"] == "ChannelCommunicator"
    assert set(operator["tls"]) == {"regulator", "health-authority"}
    for peer, info in operator["tls"].items():
        assert info["tls_version"] == "TLSv1.3"
        assert info["peer_names"] == [peer]
    assert set(operator["transports"].values()) == {"_SSLProtocolTransport"}
    assert operator["stats"]["dealer_requests"] > 0
    assert operator["stats"]["channel"]["health-authority"]["received"] > 0


def test_ss_follower_audit_and_refusal_keeps_session(data, cluster):
    ss = InsurerClaims("ss")
    part = data.claims.iloc[:10]
    query = ss.encode_claims(part)
    slots = _slots(part, data.visits)
    with pytest.raises(RuntimeError, match="EngineMismatch"):
        cluster.evaluate("bad-share", (query.payloads[OPERATOR], b"CGSS1garbage"), slots)
    result = cluster.evaluate("after-refusal", (query.payloads[OPERATOR],
                                                query.payloads[REGULATOR]), slots)
    audit = result.regulator_audit
    assert audit["torch_distributed_initialized"] is False
    assert all(i["tls_version"] == "TLSv1.3" for i in audit["tls"].values())
    assert set(audit["transports"].values()) == {"_SSLProtocolTransport"}
    bits = ss.decode_verdicts(query, {OPERATOR: result.operator_blob,
                                      REGULATOR: result.regulator_blob})
    expected = plain_verdicts(part, data.visits, data.policies)
    assert (bits["visit_found"].to_numpy() == expected["visit_found"].to_numpy()).all()
