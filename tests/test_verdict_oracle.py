"""The verdict is not an oracle: the attacks of a malicious insurer holding one consent,
mounted as that insurer through real node processes.

The insurer holds a consent (or forges one), its own certificate and keys, and sends what
it likes: the SDK's requests, requests it edits, raw HTTP with its certificate. Each test
shows the attack gains nothing beyond what the check budget pays for, and carries the
control that shows what the attack would have gained without the defence:

1. membership from refusal types: a token of nobody, a present person under another
   person's key, a person with more visits than K and a consent about another person get
   byte-identical refusals (the node's own log keeps four distinct causes);
2. binary search of a self-pay within one consent: unbudgeted it finds the exact amount
   (control); under the default budget it gets three answers a day, the rest are refused
   with `CheckBudgetSpent` and logged, the interval stays 2^(21-3) fen wide, and a restart of
   the regulator does not give the budget back;
3. the same claim sent ten times costs one check, is computed once and answers the same
   bytes; passing a new claim off as the old one returns the old verdict;
4. refused checks spend the budget too, and an invented hospital tag buys no fresh one.
"""

import json
import os
import uuid

import pandas as pd
import pytest

from governance.contracts import DEFAULT_CHECKS_PER_CONSENT_PER_DAY, load_contract
from governance.meters import sign_request
from parties.claims.api import (
    CHECK,
    NOT_CHECKABLE,
    REQUEST_SIGNATURE_HEADER,
    ClaimCheckRequest,
    ClaimCheckResponse,
    signed_request,
)
from parties.claims.client import ClaimBatchFailed, Client
from parties.runtime.node_log import REQUEST_ID_HEADER
from parties.runtime.pki import load_signing_key
from parties.runtime.supervisor import start_node, stop_node, wait_healthy
from tests.attack_helpers import (
    CONTRACTS,
    ClaimWorld,
    events,
    ledger_entries,
    raw_request,
    read_only,
    refusal_rows,
    wait_for,
)

INSURER = "insurer-a"
DEFAULT = "oracle-default-insurer-a"  # the scenario's terms, no budget stated: the default
ROOMY = "oracle-roomy-insurer-a"  # the same with a budget no attack exhausts: the controls
RANGE_BITS = 21  # self-pays of the generated data are below 2^21 fen (20,971.52 yuan)


# --- the world ---------------------------------------------------------------------------


def _register(world: ClaimWorld, contract_id: str, budget: int | None) -> None:
    from governance.contracts import SignedContract, parse_contract, sign_contract
    from parties.agreements.cli import post_contract
    from parties.runtime.pki import load_signing_key

    terms = load_contract(CONTRACTS / f"claim-check-{INSURER}.toml").model_dump(mode="json")
    terms["contract_id"] = contract_id
    if budget is None:
        del terms["quota"]["checks_per_consent_per_day"]
    else:
        terms["quota"]["checks_per_consent_per_day"] = budget
    signed = SignedContract(terms=parse_contract(terms))
    for party in signed.terms.parties:
        signed = sign_contract(signed, party, load_signing_key(world.fed.state, party))
    post_contract(world.fed.state, world.fed.topology, signed, "regulator")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = ClaimWorld(tmp_path_factory.mktemp("oracle"))
    try:
        w.ingest()
        w.sign_contracts()
        _register(w, DEFAULT, None)
        _register(w, ROOMY, 1_000_000)
        yield w
    finally:
        w.down()


@pytest.fixture(scope="module")
def visits(world) -> pd.DataFrame:
    """The hospitals' visits as the generator wrote them (the attacker's unknowns)."""
    frame = pd.read_parquet(world.data / "ground_truth" / "visits.parquet")
    conflicted = set(pd.read_csv(world.data / "ground_truth" / "conflicts.csv",
                                 dtype=str)["national_id"])
    frame = frame[~frame["national_id"].isin(conflicted)]
    frame["visits_here"] = frame.groupby(["national_id", "hospital_id"])["visit_id"] \
        .transform("count")
    return frame.sort_values("visit_id").reset_index(drop=True)


def _lone_visits(visits: pd.DataFrame) -> pd.DataFrame:
    """Visits that are their person's only visit at that hospital."""
    return visits[(visits["visits_here"] == 1)
                  & (visits["self_pay_fen"] < 2**RANGE_BITS)].reset_index(drop=True)


def _crowded(visits: pd.DataFrame) -> pd.DataFrame:
    """Visits of a person who has another visit at the same hospital."""
    return visits[visits["visits_here"] >= 2].reset_index(drop=True)


def _client(world: ClaimWorld, contract: str, k: int = 4) -> Client:
    return Client(INSURER, state=world.fed.state, topology=world.fed.topology,
                  contract_id=contract, policies=world.policies, k=k, timeout=300)


def _claim(visit, claimed_fen: int, claim_id: str = "C1") -> pd.DataFrame:
    """A claim about `visit`: its person, hospital, admission date and diagnosis."""
    return pd.DataFrame([{
        "claim_id": claim_id, "insurer": INSURER, "national_id": visit.national_id,
        "hospital_id": visit.hospital_id, "visit_date": str(visit.admission_date)[:10],
        "claimed_fen": int(claimed_fen), "diagnosis_code": visit.diagnosis_code}])


def _consent(world: ClaimWorld, client: Client, national_id: str, *, key_of: str | None = None):
    consent = world.consent(national_id, INSURER, key_of=key_of)
    client.register_consents([consent])
    return consent


def _check(client: Client, visit, claimed_fen: int, consent) -> dict | str:
    """The verdict of one claim about `visit`, or the name of the refusal."""
    try:
        return client.check_one(
            national_id=visit.national_id, hospital_id=visit.hospital_id,
            visit_date=str(visit.admission_date)[:10], claimed_fen=claimed_fen,
            diagnosis_code=visit.diagnosis_code, consent=consent, mode="ss",
            request_id=f"oracle-{uuid.uuid4().hex[:12]}")
    except ClaimBatchFailed as exc:
        return exc.error


def _signed_headers(world: ClaimWorld, prepared, body: bytes) -> dict[str, str]:
    """The headers of `body` sent as `prepared`'s request, signed by the insurer (which
    may sign whatever it sends, altered bodies included)."""
    signature = sign_request(load_signing_key(world.fed.state, INSURER), signed_request(
        prepared.log_id, INSURER, ClaimCheckRequest.model_validate_json(body)))
    return {"Content-Type": "application/json", REQUEST_ID_HEADER: prepared.request_id,
            REQUEST_SIGNATURE_HEADER: signature}


def _spent(world: ClaimWorld, contract: str, consent_id: str) -> int:
    conn = read_only(world.fed.state.node("regulator").db)
    try:
        return conn.execute("SELECT COALESCE(SUM(checks), 0) FROM claim_check_budget"
                            " WHERE contract_id = ? AND consent_id = ?",
                            (contract, consent_id)).fetchone()[0]
    finally:
        conn.close()


def _refused_reasons(world: ClaimWorld, rid: str) -> list[str]:
    from governance.ledger import decode_leaf

    return [decode_leaf(leaf).entry.event.payload["reason"]
            for kind, r, leaf in ledger_entries(world.fed) if kind == "query_refused" and r == rid]


# --- 1. membership from refusal types ------------------------------------------------------


def test_refusals_that_depend_on_the_person_are_byte_identical(world, visits):
    """Three probes whose refusal used to say who is present, under which key and with how
    many visits: the insurer receives the same bytes (its request id aside) for each."""
    lone, crowded = _lone_visits(visits), _crowded(visits)
    present, other = lone.iloc[0], lone.iloc[1]
    assert present.national_id != other.national_id
    many = crowded.iloc[0]
    probes = {}  # cause -> (request id, prepared request)
    with _client(world, ROOMY) as client, _client(world, ROOMY, k=1) as narrow:
        # (a) a token of no person in the domain, with a valid consent
        consent = _consent(world, client, present.national_id)
        client._tokens[present.national_id] = os.urandom(32)
        probes["unknown_token"] = (client, _claim(present, 100), consent)
        # (b) a present person, the consent signed by another person's key
        forged = _consent(world, client, other.national_id, key_of=present.national_id)
        probes["consent_key_mismatch"] = (client, _claim(other, 100), forged)
        # (c) a person with more visits at the hospital than the K = 1 slots
        probes["too_many_candidates"] = (
            narrow, _claim(many, 100), _consent(world, narrow, many.national_id))
        sent = {}
        for cause, (sdk, claim, given) in probes.items():
            rid = f"probe-{uuid.uuid4().hex}"  # one length, so the bodies can be compared
            prepared = sdk.prepare(claim, {claim.iloc[0]["national_id"]: given}, "ss", rid)
            sent[cause] = (prepared.log_id, raw_request(
                world.fed, INSURER, "regulator", CHECK.method, CHECK.path, content=prepared.body,
                headers=_signed_headers(world, prepared, prepared.body)))
    # The control: each probe's claim, asked properly, is answered (they were well formed).
    with _client(world, ROOMY) as honest:
        for visit in (present, other, many):
            answered = _check(honest, visit, 100, _consent(world, honest, visit.national_id))
            assert isinstance(answered, dict), answered

    views = set()
    for cause, (rid, response) in sent.items():
        body = response.json()
        assert (response.status_code, body["error"], body["detail"]) == (
            403, "ClaimNotCheckable", NOT_CHECKABLE), (cause, body)
        assert body["request_id"] == rid
        views.add((response.status_code, response.content.replace(rid.encode(), b"<rid>"),
                   response.headers["content-length"]))
    assert len(views) == 1, views  # byte-identical apart from the request id

    # The operator, which refused, keeps the real, distinct causes: its log and refusal record.
    for cause, (rid, _) in sent.items():
        logged = wait_for(lambda r=rid: [
            e for e in events(world.fed, "operator", "claim_not_checkable")
            if e["request_id"] == r])
        assert [c["cause"] for c in logged[0]["causes"]] == [cause]
        assert any(r[0] == rid and cause in r[3] for r in refusal_rows(world.fed, "operator"))
        # refused at one point: after planning, before computing
        assert [e for e in events(world.fed, "operator", "claims_compute_started")
                if e["request_id"] == rid]
        assert not [e for e in events(world.fed, "operator", "claims_computed")
                    if e["request_id"] == rid]
        # The shared log names the uniform refusal only.
        assert wait_for(lambda r=rid: _refused_reasons(world, r)) == ["ClaimNotCheckable"]
    too_many = next(e for e in events(world.fed, "operator", "claim_not_checkable")
                    if e["request_id"] == sent["too_many_candidates"][0])
    assert "candidate rows" in too_many["causes"][0]["detail"]  # the count: the node's only


# --- 3. the same claim again ---------------------------------------------------------------


def test_the_same_claim_ten_times_costs_one_check_and_answers_the_same(world, visits):
    target = _lone_visits(visits).iloc[2]
    with _client(world, DEFAULT) as client, _client(world, DEFAULT) as another:
        consent = _consent(world, client, target.national_id)
        claim, consents = _claim(target, target.self_pay_fen), {target.national_id: consent}
        rids = [f"same-{i}-{uuid.uuid4().hex[:8]}" for i in range(10)]
        answers, verdicts = [], []
        for i, rid in enumerate(rids):
            sdk = another if i == 9 else client  # the insurer's other client asks it too
            prepared = sdk.prepare(claim, consents, "ss", rid)  # fresh shares each time
            response = sdk.send(prepared)
            answers.append(response.model_dump())
            verdicts.append(sdk.decode(prepared, response))
        assert all(a == answers[0] for a in answers)  # the stored bytes, not a new answer
        rids = [client.log_id(rid) for rid in rids]  # one insurer: both clients alike
        assert answers[0]["request_id"] == rids[0]
        for v in verdicts:
            pd.testing.assert_frame_equal(v, verdicts[0])
        assert bool(verdicts[0].iloc[0]["amount_consistent"]) is True
        assert _spent(world, DEFAULT, consent.consent_id) == 1
        computed = [e for e in events(world.fed, "operator", "claims_computed")
                    if e["request_id"] in rids]
        assert [e["request_id"] for e in computed] == [rids[0]]
        assert wait_for(lambda: [r for k, r, _ in ledger_entries(world.fed)
                                 if k == "query_answered" and r in rids]) == [rids[0]]

        # Passing a new claim (one fen more than the self-pay) off as the old one: the
        # digest is the insurer's word, so it gets the old answer, nothing new is computed.
        inflated = _claim(target, target.self_pay_fen + 1)
        prepared = client.prepare(inflated, consents, "ss", f"relabel-{uuid.uuid4().hex[:8]}")
        body = json.loads(prepared.body)
        old = json.loads(client.prepare(claim, consents, "ss", "relabel-old").body)
        body["claims"][0]["claim_digest"] = old["claims"][0]["claim_digest"]
        content = json.dumps(body).encode()
        response = raw_request(world.fed, INSURER, "regulator", CHECK.method, CHECK.path,
                               content=content, headers=_signed_headers(world, prepared, content))
        assert response.status_code == 200
        assert ClaimCheckResponse.model_validate(response.json()).model_dump() == answers[0]
        assert _spent(world, DEFAULT, consent.consent_id) == 1
        assert not [e for e in events(world.fed, "operator", "claims_computed")
                    if e["request_id"] == prepared.log_id]

        # The control: asked honestly, the new claim is a new check, computed and charged.
        honest = _check(client, target, int(target.self_pay_fen) + 1, consent)
        assert isinstance(honest, dict) and honest["amount_consistent"] is False
        assert _spent(world, DEFAULT, consent.consent_id) == 2


# --- 4. refusals are not free --------------------------------------------------------------


def test_refused_checks_spend_the_budget_and_invented_tags_buy_none(world, visits):
    many = _crowded(visits).iloc[1]
    with _client(world, DEFAULT, k=1) as narrow, _client(world, DEFAULT) as client:
        consent = _consent(world, narrow, many.national_id)
        # Three probes the operator refuses (too many candidates for K = 1), each distinct.
        refused = [_check(narrow, many, 100 + i, consent)
                   for i in range(DEFAULT_CHECKS_PER_CONSENT_PER_DAY)]
        assert refused == ["ClaimNotCheckable"] * DEFAULT_CHECKS_PER_CONSENT_PER_DAY
        assert _spent(world, DEFAULT, consent.consent_id) == DEFAULT_CHECKS_PER_CONSENT_PER_DAY
        # The check that would now be answered (K = 4 fits) finds the budget spent.
        assert _check(client, many, 100, consent) == "CheckBudgetSpent"
        # The control: the same check under a consent with budget left is answered.
        assert isinstance(_check(client, many, 100, _consent(world, client, many.national_id)),
                          dict)

        # An invented hospital tag opens a bucket of its own at the regulator, but the
        # operator refuses a tag that does not name the claim's token and hospital.
        rid = f"invented-tag-{uuid.uuid4().hex[:8]}"
        prepared = client.prepare(_claim(many, 100), {many.national_id: consent}, "ss", rid)
        body = json.loads(prepared.body)
        body["claims"][0]["hospital_tag"] = os.urandom(32).hex()
        content = json.dumps(body).encode()
        response = raw_request(world.fed, INSURER, "regulator", CHECK.method, CHECK.path,
                               content=content, headers=_signed_headers(world, prepared, content))
        assert (response.status_code, response.json()["error"]) == (422, "MalformedInput")
        assert "hospital_tag" in response.json()["detail"]
        assert not [e for e in events(world.fed, "operator", "claims_computed")
                    if e["request_id"] == prepared.log_id]


# --- 2. binary search within one consent ---------------------------------------------------


def _bisect(client: Client, visit, consent, queries: int) -> tuple[int, int, list]:
    """The insurer's bisection of `visit`'s self-pay: amount_consistent says claimed <=
    self-pay. Returns the interval [lo, hi) it is left with and each query's outcome."""
    lo, hi = 0, 2**RANGE_BITS
    outcomes = []
    for _ in range(queries):
        mid = (lo + hi) // 2
        outcome = _check(client, visit, mid, consent)
        outcomes.append(outcome)
        if isinstance(outcome, dict):
            lo, hi = (mid, hi) if outcome["amount_consistent"] else (lo, mid)
    return lo, hi, outcomes


def test_unbudgeted_bisection_finds_the_exact_self_pay(world, visits):
    """The control: without a budget, one consent gives the exact self-pay in 21 checks."""
    target = _lone_visits(visits).iloc[3]
    with _client(world, ROOMY) as client:
        consent = _consent(world, client, target.national_id)
        lo, hi, outcomes = _bisect(client, target, consent, RANGE_BITS)
    assert all(isinstance(o, dict) for o in outcomes)
    assert (lo, hi) == (target.self_pay_fen, target.self_pay_fen + 1)


def test_bisection_within_one_consent_gets_the_budget_and_no_more(world, visits):
    target = _lone_visits(visits).iloc[4]
    budget = DEFAULT_CHECKS_PER_CONSENT_PER_DAY
    with _client(world, DEFAULT) as client:
        consent = _consent(world, client, target.national_id)
        lo, hi, outcomes = _bisect(client, target, consent, RANGE_BITS)
    answered = [o for o in outcomes if isinstance(o, dict)]
    assert len(answered) == budget
    assert outcomes[budget:] == ["CheckBudgetSpent"] * (RANGE_BITS - budget)
    assert lo <= target.self_pay_fen < hi
    assert hi - lo == 2 ** (RANGE_BITS - budget)  # as wide as three answers leave it
    assert _spent(world, DEFAULT, consent.consent_id) == budget  # refusals here spend nothing

    # Each exhausted check is refused with 429 and logged, without personal data.
    spent = [r for r in refusal_rows(world.fed, "regulator") if r[2] == "CheckBudgetSpent"]
    assert len(spent) >= RANGE_BITS - budget
    assert all(target.national_id not in (r[3] or "") for r in spent)
    payloads = wait_for(lambda: [p for p in _budget_refusals(world)
                                 if p["contract_id"] == DEFAULT])
    assert len(payloads) >= RANGE_BITS - budget
    assert all(set(p) == {"contract_id", "party", "reason", "mode", "claims", "scenario"}
               for p in payloads)

    # A restart of the regulator gives nothing back: the counts are in its store.
    fed = world.fed
    stop_node(fed.state, "regulator", grace=5)
    start_node(fed.state, fed.topology_path, "regulator")
    assert wait_healthy(fed.state, fed.topology, ["regulator"])["regulator"] == "ok"
    with _client(world, DEFAULT) as client:
        assert _check(client, target, (lo + hi) // 2, consent) == "CheckBudgetSpent"
    assert _spent(world, DEFAULT, consent.consent_id) == budget


def _budget_refusals(world: ClaimWorld) -> list[dict]:
    from governance.ledger import decode_leaf

    return [dict(decode_leaf(leaf).entry.event.payload)
            for kind, _, leaf in ledger_entries(world.fed) if kind == "query_refused"
            and decode_leaf(leaf).entry.event.payload.get("reason") == "CheckBudgetSpent"]
