"""The regulator statistic through real nodes, and the attacks of an insurer on it.

One module-scoped world (all eight nodes, generated data ingested, contracts signed).
Each insurer first runs real claim checks: insurer-a for claimants who consented to the
statistic, and for others who consented to the claim check only; insurer-b for one
claimant who consented to the statistic and a group who did not. The statistic then
runs over what the operator kept from those checks, and is compared with the same sum
over the generator's ground truth. The attacks are mounted as the insurer, with its
node key and the freedom to send anything to the regulator.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from governance.billing import statement
from governance.consent import issue_consent
from governance.contracts import load_contract
from governance.ledger import decode_leaf
from governance.meters import sign_request, sort_meters
from mpc.claim.constants import RECORD_COLUMNS, VERDICT_OUTPUTS
from parties.claims.api import REQUEST_SIGNATURE_HEADER
from parties.claims.client import ClaimBatchFailed
from parties.runtime.client import NodeClient
from parties.runtime.errors import RemoteError
from parties.runtime.node_log import current_request_id
from parties.runtime.pki import federation_signing_keys, load_signing_key
from parties.stats.api import (
    EPSILON_BUDGET_MILLI,
    MIN_GROUP_SIZE,
    NOT_RELEASED,
    SELF_PAY,
    STATISTIC,
    SelfPayQuery,
    SelfPayRequest,
    StatsAnswer,
    signed_self_pay,
)
from parties.stats.client import claimant_self_pay, self_pay_request
from tests.attack_helpers import CONTRACTS, ClaimWorld, ledger_entries, read_only, wait_for

pytestmark = pytest.mark.slow

CONTRACT = {"insurer-a": "claim-check-insurer-a-2026", "insurer-b": "claim-check-insurer-b-2026"}
FIRST, LAST = "2025-04", "2026-03"  # the generator's last twelve months
MAX_VALUE = 200_000


def _consent(world: ClaimWorld, national_id: str, insurer: str, *, statistic: bool,
             key_of: str | None = None):
    now = datetime.now(UTC)
    outputs = (*VERDICT_OUTPUTS, STATISTIC) if statistic else VERDICT_OUTPUTS
    return issue_consent(world.consent_key(key_of or national_id, insurer),
                         insurer=insurer, purpose="claim_settlement", columns=RECORD_COLUMNS,
                         outputs=outputs, not_before=now - timedelta(minutes=5),
                         not_after=now + timedelta(days=30))


def _check(world: ClaimWorld, insurer: str, claims: pd.DataFrame, consents: dict) -> None:
    with world.client(insurer) as client:
        client.register_consents(consents.values())
        client.check(claims, consents, "ss")


def _check_all(world: ClaimWorld, insurer: str, claims: pd.DataFrame,
               consents: dict) -> set[str]:
    """Check every claim (in batches; a batch refused for one claim, e.g. a person with
    more visits than the K slots, is checked claim by claim); the ids checked."""
    checked: set[str] = set()
    for start in range(0, len(claims), 10):
        batch = claims.iloc[start:start + 10].reset_index(drop=True)
        try:
            _check(world, insurer, batch, {n: consents[n] for n in batch["national_id"]})
            checked |= set(batch["national_id"])
        except ClaimBatchFailed:
            for i in range(len(batch)):
                one = batch.iloc[[i]].reset_index(drop=True)
                try:
                    _check(world, insurer, one, {n: consents[n] for n in one["national_id"]})
                    checked.add(one["national_id"][0])
                except ClaimBatchFailed:
                    pass
    return checked


class Truth:
    def __init__(self, world: ClaimWorld) -> None:
        visits = pd.read_parquet(world.data / "ground_truth" / "visits.parquet")
        visits["month"] = pd.to_datetime(visits["admission_date"]).dt.strftime("%Y-%m")
        self.visits = visits[visits["month"].between(FIRST, LAST)]

    def matched(self, hospital: str, ids: set[str]) -> pd.Series:
        """Per-person clipped self-pay of `ids` at `hospital` in the window."""
        v = self.visits
        chosen = v[(v["hospital_id"] == hospital) & v["national_id"].isin(ids)]
        return chosen.groupby("national_id")["self_pay_fen"].sum().clip(upper=MAX_VALUE)

    def best_hospital(self, ids: set[str]) -> tuple[str, int]:
        sizes = {h: len(self.matched(h, ids)) for h in ("hospital-1", "hospital-2", "hospital-3")}
        hospital = max(sizes, key=lambda h: sizes[h])
        return hospital, sizes[hospital]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = ClaimWorld(tmp_path_factory.mktemp("stats"), patients=300, claims=160)
    try:
        w.ingest()
        w.sign_contracts()
        truth = Truth(w)
        # insurer-a: the first half of its claims with the statistic in the consent's scope,
        # the other half with the claim check only.
        claims_a = w.claims_of("insurer-a").drop_duplicates("national_id").reset_index(drop=True)
        half = len(claims_a) // 2
        consenting = set(claims_a["national_id"][:half])
        checked = _check_all(w, "insurer-a", claims_a, {
            n: _consent(w, n, "insurer-a", statistic=n in consenting)
            for n in claims_a["national_id"]})
        w.consenting, w.check_only = checked & consenting, checked - consenting
        # insurer-b: one claimant consenting to the statistic, the others to the check only.
        claims_b = w.claims_of("insurer-b").drop_duplicates("national_id").reset_index(drop=True)
        lone = claims_b["national_id"][0]
        checked = _check_all(w, "insurer-b", claims_b, {
            n: _consent(w, n, "insurer-b", statistic=n == lone)
            for n in claims_b["national_id"]})
        assert lone in checked
        w.lone, w.b_check_only = lone, checked - {lone}
        w.truth = truth
        yield w
    finally:
        w.down()


def _client(world: ClaimWorld, insurer: str) -> NodeClient:
    return NodeClient(world.fed.state, world.fed.topology, insurer, timeout=300)


def _ask(world: ClaimWorld, insurer: str, hospital: str, epsilon: float):
    with _client(world, insurer) as client:
        return claimant_self_pay(client, CONTRACT[insurer],
                                 SelfPayQuery(hospital=hospital, month=FIRST, through=LAST),
                                 epsilon=epsilon, max_value=MAX_VALUE)


def _refused(world: ClaimWorld, insurer: str, hospital: str, epsilon: float) -> RemoteError:
    with pytest.raises(RemoteError) as refused:
        _ask(world, insurer, hospital, epsilon)
    return refused.value


def _spent_milli(world: ClaimWorld, insurer: str) -> int:
    conn = read_only(world.fed.state.node("regulator").db)
    try:
        return conn.execute("SELECT COALESCE(SUM(epsilon_milli), 0) FROM stats_epsilon"
                            " WHERE data_user = ?", (insurer,)).fetchone()[0]
    finally:
        conn.close()


def _stats_entries(world: ClaimWorld, kind: str, insurer: str) -> list[dict]:
    return [dict(decode_leaf(leaf).entry.event.payload) for k, _, leaf in ledger_entries(world.fed)
            if k == kind and decode_leaf(leaf).entry.event.payload.get("statistic") == STATISTIC
            and decode_leaf(leaf).entry.event.payload.get("party") == insurer]


def test_statistic_counts_the_consenting_checked_claimants_only_and_is_metered(world):
    hospital, size = world.truth.best_hospital(world.consenting)
    assert size >= MIN_GROUP_SIZE, "the generated data must give a releasable group"
    matched = world.truth.matched(hospital, world.consenting)
    everyone = world.truth.matched(hospital, world.consenting | world.check_only)
    assert len(everyone) - len(matched) >= 10  # the check-only claimants would show
    answer = _ask(world, "insurer-a", hospital, 2.0)
    # ε = 2, half each: count noise of scale 1, sum noise of scale MAX_VALUE.
    assert abs(answer.claimants - len(matched)) <= 9
    assert abs(answer.self_pay_fen - int(matched.sum())) <= 13 * MAX_VALUE
    assert answer.epsilon_spent == 2.0 and _spent_milli(world, "insurer-a") == 2000
    # The meter proves itself (the insurer's signature), so the bill counts it.
    entries = [decode_leaf(leaf) for _, _, leaf in ledger_entries(world.fed)]
    terms = load_contract(CONTRACTS / "claim-check-insurer-a.toml")
    keys = federation_signing_keys(world.fed.state, ["insurer-a", "regulator"])
    meters, anomalies = sort_meters(entries, terms, "regulator", keys)
    stats_meters = [m for m in meters if m.entry.event.payload.get("statistic") == STATISTIC]
    assert len(stats_meters) == 1 and not anomalies
    bill = statement(terms, terms.day_of(datetime.now(UTC)).strftime("%Y-%m"), entries,
                     "regulator", keys)
    assert bill.meters.queries == len(meters) and not bill.anomalies  # billed per query
    payload = stats_meters[0].entry.event.payload
    assert payload["records_touched"] == 0 and "claimants" not in payload  # no true size


def test_repeated_identical_queries_spend_budget_and_get_fresh_noise(world):
    hospital, _ = world.truth.best_hospital(world.consenting)
    before = _spent_milli(world, "insurer-a")
    answers = [_ask(world, "insurer-a", hospital, 1.0) for _ in range(2)]
    assert _spent_milli(world, "insurer-a") == before + 2000
    assert [a.epsilon_spent for a in answers] == [(before + 1000) / 1000, (before + 2000) / 1000]
    assert answers[0] != answers[1]  # fresh noise (and request id) each time
    # A retry of one request (same request id, same signed body) is not a repeat: the
    # stored answer, nothing spent; the id under another body is refused.
    body = SelfPayRequest(contract_id=CONTRACT["insurer-a"], epsilon=1.0,
                          query=SelfPayQuery(hospital=hospital, month=FIRST, through=LAST))
    with _client(world, "insurer-a") as client:
        log_id, signature = self_pay_request(client, body)
        token = current_request_id.set(log_id)
        try:
            first, again = (client.call("regulator", SELF_PAY, body,
                                        headers={REQUEST_SIGNATURE_HEADER: signature})
                            for _ in range(2))
            other = body.model_copy(update={"epsilon": 0.5})
            with pytest.raises(RemoteError) as reused:
                client.call("regulator", SELF_PAY, other,
                            headers={REQUEST_SIGNATURE_HEADER: sign_request(
                                load_signing_key(world.fed.state, "insurer-a"),
                                signed_self_pay(log_id, "insurer-a", other))})
        finally:
            current_request_id.reset(token)
    assert first == again and reused.value.error == "RequestIdReused"
    before += 1000
    # No noiseless query exists: ε is required and bounded.
    with _client(world, "insurer-a") as client:
        for epsilon in (None, 0, 0.0001, 50):
            body = {"contract_id": CONTRACT["insurer-a"], "epsilon": epsilon,
                    "query": {"hospital": hospital, "month": FIRST, "through": LAST}}
            if epsilon is None:
                del body["epsilon"]
            with pytest.raises(RemoteError) as refused:
                client.send("regulator", SELF_PAY, json=body)
            assert refused.value.http_status == 422
    assert _spent_milli(world, "insurer-a") == before + 2000


def test_insurer_reporting_a_size_or_naming_ids_is_refused_and_changes_nothing(world):
    """The old attack: report size 10 while summing one person. There is no size, no id
    and no noise field left to lie in; anything extra is refused before any ε is spent."""
    hospital, _ = world.truth.best_hospital(world.consenting)
    before = _spent_milli(world, "insurer-a")
    good = SelfPayRequest(contract_id=CONTRACT["insurer-a"], epsilon=1.0,
                          query=SelfPayQuery(hospital=hospital, month=FIRST, through=LAST))
    with _client(world, "insurer-a") as client:
        log_id, signature = self_pay_request(client, good)
        for extra in ({"size": 10}, {"national_ids": sorted(world.consenting)[:1]},
                      {"min_group": 1}, {"noise": 0}):
            token = current_request_id.set(log_id)
            try:
                with pytest.raises(RemoteError) as refused:
                    client.send("regulator", SELF_PAY, json={**good.model_dump(mode="json"),
                                                             **extra},
                                headers={REQUEST_SIGNATURE_HEADER: signature})
            finally:
                current_request_id.reset(token)
            assert refused.value.http_status == 422
        # An unsigned (or re-signed for another body) request is not served either.
        with pytest.raises(RemoteError) as unsigned:
            client.send("regulator", SELF_PAY, json=good.model_dump(mode="json"))
        assert unsigned.value.error == "RequestSignatureInvalid"
    assert _spent_milli(world, "insurer-a") == before


def test_one_id_statistic_no_consent_and_spent_budget_are_one_refusal(world):
    """insurer-b's only claimant consenting to the statistic (a one-id statistic), then a
    hospital where many of its checked claimants have visits but none consented to the
    statistic, then its budget spent: the same status and message each time; the size is
    never told, in the answer or in the log."""
    lone_hospital, lone_size = world.truth.best_hospital({world.lone})
    assert lone_size == 1
    # The threshold is on the noised count: at ε = 2 (count noise of scale 1) a group of
    # one is released with probability about 1e-4, and then only as a noised count.
    one = _refused(world, "insurer-b", lone_hospital, 2.0)
    assert _spent_milli(world, "insurer-b") == 2000  # a refusal from the data spends its ε

    hospital, size = world.truth.best_hospital(world.b_check_only)
    assert size >= MIN_GROUP_SIZE  # releasable, were the check-only consents counted
    unconsented = _refused(world, "insurer-b", hospital, 2.0)
    assert _spent_milli(world, "insurer-b") == 4000

    while _spent_milli(world, "insurer-b") + 2000 <= EPSILON_BUDGET_MILLI:
        _refused(world, "insurer-b", hospital, 2.0)
    spent = _spent_milli(world, "insurer-b")
    budget = _refused(world, "insurer-b", hospital, 2.0)
    assert _spent_milli(world, "insurer-b") == spent  # refused on budget: nothing changed

    for refusal in (one, unconsented, budget):
        assert (refusal.http_status, refusal.error, refusal.detail) == (
            403, "StatisticNotReleased", NOT_RELEASED)
    refused = wait_for(lambda: _stats_entries(world, "query_refused", "insurer-b"))
    assert {p["reason"] for p in refused} == {"StatisticNotReleased"}
    assert len({frozenset(p) for p in refused}) == 1  # the same fields: no size, no cause
    assert not _stats_entries(world, "query_answered", "insurer-b")


def test_claim_with_a_forged_consent_does_not_join_the_set(world):
    """A claimant 'claimed for' with a consent signed by someone else is refused at the
    claim check and never becomes a checked claimant."""
    conn = read_only(world.fed.state.node("operator").db)
    try:
        before = conn.execute("SELECT COUNT(*) FROM checked_claimants").fetchone()[0]
    finally:
        conn.close()
    claim = world.claims_of("insurer-a").drop_duplicates("national_id").iloc[[0]]
    named = claim["national_id"].iloc[0]
    impostor = next(n for n in world.claims["national_id"] if n != named)
    forged = _consent(world, named, "insurer-a", statistic=True, key_of=impostor)
    with pytest.raises(ClaimBatchFailed):
        _check(world, "insurer-a", claim.reset_index(drop=True), {named: forged})
    conn = read_only(world.fed.state.node("operator").db)
    try:
        after = conn.execute("SELECT COUNT(*) FROM checked_claimants").fetchone()[0]
    finally:
        conn.close()
    assert after == before


def test_cli_asks_the_statistic_and_lists_the_answer_book(world):
    hospital, _ = world.truth.best_hospital(world.consenting)
    out = world.cli("stats", "claimant-self-pay", "--insurer", "insurer-a",
                    "--contract", CONTRACT["insurer-a"], "--hospital", hospital,
                    "--month", FIRST, "--through", LAST, "--epsilon", "0.5",
                    "--max-value", str(MAX_VALUE), "--json")
    answer = StatsAnswer.model_validate_json(out.strip().splitlines()[-1])
    assert answer.epsilon == 0.5 and answer.insurer == "insurer-a"
    book = [StatsAnswer.model_validate_json(line) for line in
            world.cli("stats", "answers", "--json", "--limit", "100").splitlines() if line]
    assert answer in book
    assert all(a.insurer == "insurer-a" for a in book)  # insurer-b was never answered
