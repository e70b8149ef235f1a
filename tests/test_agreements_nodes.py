"""Contracts, consents and bills through real nodes, recorded in the log."""

import json
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from governance.billing import split_largest_remainder
from governance.consent import issue_consent
from governance.contracts import (
    FULL_SPLIT_BP,
    ContractNotSigned,
    ContractUnknown,
    SignedContract,
    load_contract,
    sign_contract,
    terminate_contract,
)
from governance.ledger import decode_leaf
from governance.meters import meter_fields, request_document, sign_request
from parties.agreements.api import CONTRACT as CONTRACT_ROUTE
from parties.agreements.api import REGISTER_CONSENT, REGISTER_CONTRACT, TERMINATE_CONTRACT
from parties.agreements.books import contract_book
from parties.claims.api import CHECK
from parties.ledger.api import APPEND_ENTRIES, EntryBatch
from parties.ledger.client import append_entry, signed_entry
from parties.ledger.deferred import (
    BOUND_ENV,
    append_or_defer,
    complete_deferred,
    deferral_incidents,
)
from parties.ledger.operator_log import operator_log
from parties.node import open_node
from parties.runtime.client import NodeClient
from parties.runtime.errors import RemoteError
from parties.runtime.node_log import current_request_id, read_log
from parties.runtime.pki import load_signing_key
from parties.runtime.supervisor import start_node, stop_node, wait_healthy
from scenarios.cli import app
from tests.attack_helpers import wait_for
from tests.federation import Federation

runner = CliRunner()
CONTRACT = Path(__file__).resolve().parents[1] / (
    "scenarios/claim_check/contracts/claim-check-insurer-a.toml"
)
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")
NODES = [*HOSPITALS, "health-authority", "operator", "regulator", "insurer-a", "insurer-b"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("agreements"), nodes=NODES)
    fed.up()
    yield fed
    fed.down()


def _cli(fed: Federation, *args: str):
    return runner.invoke(
        app, [*args, "--state", str(fed.state.root), "--topology", str(fed.topology_path)]
    )


def _kinds(fed: Federation) -> list[str]:
    ctx = open_node(fed.state, fed.topology, "operator")
    return [decode_leaf(leaf).entry.event.kind for leaf in operator_log(ctx).log.leaves()]


def test_contract_in_force_only_when_every_party_signed(fed, tmp_path):
    """Signed by the insurer, the product owner, the operator and the authority, but not
    by the hospitals whose data it sells, the contract is not in force: it authorizes no
    query and is not logged as signed. Each hospital's signature completes it."""
    doc = tmp_path / "contract.toml"
    doc.write_text(CONTRACT.read_text())
    for party in ("insurer-a", "regulator", "operator", "health-authority"):
        assert _cli(fed, "contract", "sign", str(doc), "--as", party).exit_code == 0
        doc = tmp_path / "contract.signed.json"
    partial = _cli(fed, "contract", "register", str(doc))
    assert partial.exit_code == 0
    assert "awaiting hospital-1, hospital-2, hospital-3" in partial.output, partial.output
    assert "contract_signed" not in _kinds(fed)
    book = contract_book(open_node(fed.state, fed.topology, "regulator"))
    with pytest.raises(ContractNotSigned, match="hospital-1"):
        book.authorize("claim-check-insurer-a-2026", "insurer-a", ["admission_date"],
                       ["visit_found"], datetime.now(UTC), 1)
    for hospital in HOSPITALS:
        assert _cli(fed, "contract", "sign", str(doc), "--as", hospital).exit_code == 0
    done = _cli(fed, "contract", "register", str(doc))
    assert "in force" in done.output, done.output
    assert _kinds(fed).count("contract_signed") == 1


@pytest.mark.parametrize(("change", "error"), [
    ("leave out hospital-2", "ContractSignatoriesMissing"),
    ("give hospital-3 no share", "DataOwnerShareMissing"),
])
def test_a_contract_that_cuts_out_a_data_owner_is_refused(fed, change, error):
    """The product owner and the other parties sign a contract that leaves a hospital out,
    or names it but pays it nothing: refused before anything is stored, and recorded."""
    base = load_contract(CONTRACT)
    split = dict(base.revenue_split_bp)
    if change.startswith("leave out"):
        parties = tuple(p for p in base.parties if p != "hospital-2")
        split["hospital-1"] += split.pop("hospital-2")
    else:
        parties = base.parties
        split["hospital-1"] += split["hospital-3"]
        split["hospital-3"] = 0
    terms = base.model_copy(update={"contract_id": f"cut-{error}", "parties": parties,
                                    "revenue_split_bp": split})
    before = _refusals(fed, "regulator", error)
    with NodeClient(fed.state, fed.topology, "regulator") as client, \
            pytest.raises(RemoteError) as refused:
        client.call("regulator", REGISTER_CONTRACT, _signed_by_all(fed, terms))
    assert refused.value.error == error
    assert _refusals(fed, "regulator", error) == before + 1
    with pytest.raises(ContractUnknown):
        contract_book(open_node(fed.state, fed.topology, "regulator")).get(terms.contract_id)


def test_forged_party_signature_is_refused(fed):
    terms = load_contract(CONTRACT).model_copy(update={"contract_id": "forged-1"})
    forged = sign_contract(terms, "operator", Ed25519PrivateKey.generate())
    with NodeClient(fed.state, fed.topology, "regulator") as client, \
            pytest.raises(RemoteError) as refused:
        client.call("regulator", REGISTER_CONTRACT, forged)
    assert refused.value.error == "ContractSignatureInvalid"


def _signed_by_all(fed: Federation, terms) -> SignedContract:
    signed = SignedContract(terms=terms)
    for party in terms.parties:
        signed = sign_contract(signed, party, load_signing_key(fed.state, party))
    return signed


def _refusals(fed: Federation, node: str, error: str) -> int:
    conn = sqlite3.connect(f"file:{fed.state.node(node).db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM refusals WHERE error = ?", (error,)
                            ).fetchone()[0]
    finally:
        conn.close()


def test_a_self_made_contract_authorizes_nothing(fed):
    """Two insurers (or an insurer and the operator) sign a contract of their own: price 0,
    a quota of 10^9, plain mode. Posted by them it is refused (only the product owner
    registers); passed to the product owner it is refused (the required signatories are
    missing). Nothing is stored, and each refusal is recorded."""
    base = load_contract(CONTRACT)
    price = base.price.model_copy(update={"per_query_fen": 0, "per_record_fen": 0,
                                          "subscription_fen_per_month": 0})
    quota = base.quota.model_copy(update={"queries_per_day": 10**9, "rows_per_day": 10**9})
    for parties in (("insurer-a", "insurer-b"), ("insurer-a", "operator")):
        terms = base.model_copy(update={
            "contract_id": f"self-made-{parties[1]}", "parties": parties,
            "data_users": ("insurer-a",), "price": price, "quota": quota,
            "allowed_outputs": (*base.allowed_outputs, "mode.plain"),
            "revenue_split_bp": {parties[1]: 10_000},
            "termination": base.termination.model_copy(update={"may_terminate": parties}),
        })
        signed = _signed_by_all(fed, terms)
        with NodeClient(fed.state, fed.topology, "insurer-a") as client, \
                pytest.raises(RemoteError) as posted:
            client.call("regulator", REGISTER_CONTRACT, signed)
        assert posted.value.error == "RoleNotAllowed"
        before = _refusals(fed, "regulator", "ContractSignatoriesMissing")
        with NodeClient(fed.state, fed.topology, "regulator") as client, \
                pytest.raises(RemoteError) as relayed:
            client.call("regulator", REGISTER_CONTRACT, signed)
        assert relayed.value.error == "ContractSignatoriesMissing"
        assert _refusals(fed, "regulator", "ContractSignatoriesMissing") == before + 1
        with pytest.raises(ContractUnknown):
            contract_book(open_node(fed.state, fed.topology, "regulator")).get(
                terms.contract_id)


def test_only_a_contracts_parties_read_it(fed):
    """insurer-b asks for insurer-a's contract (price, quota): refused exactly as for a
    contract that does not exist, so it cannot even learn that one is registered."""
    terms = load_contract(CONTRACT).model_copy(update={"contract_id": "private-terms-1"})
    with NodeClient(fed.state, fed.topology, "regulator") as client:
        client.call("regulator", REGISTER_CONTRACT, _signed_by_all(fed, terms))
    with NodeClient(fed.state, fed.topology, "insurer-a") as party:
        assert party.call("regulator", CONTRACT_ROUTE, params={"contract_id": "private-terms-1"}
                          ).terms.price == terms.price
    seen = []
    with NodeClient(fed.state, fed.topology, "insurer-b") as stranger:
        for contract_id in ("private-terms-1", "private-terms-2"):  # registered, and not
            with pytest.raises(RemoteError) as refused:
                stranger.call("regulator", CONTRACT_ROUTE, params={"contract_id": contract_id})
            seen.append((refused.value.http_status, refused.value.error,
                         refused.value.detail.replace(contract_id, "<id>")))
    assert seen[0] == seen[1] == (404, "ContractUnknown", "no contract <id>")


def _consent(insurer: str = "insurer-a", days: int = 30):
    key = Ed25519PrivateKey.generate()
    now = datetime.now(UTC)
    consent = issue_consent(
        key, insurer=insurer, purpose="claim_settlement",
        columns=["admission_date"], outputs=["visit_found"],
        not_before=now - timedelta(minutes=1), not_after=now + timedelta(days=days),
    )
    return key, consent


def test_consent_registration_and_revocation_are_logged(fed, tmp_path):
    key, consent = _consent()
    with NodeClient(fed.state, fed.topology, "insurer-a") as client:
        registered = client.call("regulator", REGISTER_CONSENT, consent)
    assert registered.status == "registered"
    path = tmp_path / "consent.json"
    path.write_text(consent.model_dump_json())
    revoked = _cli(fed, "consent", "revoke", str(path), "--key",
                   key.private_bytes_raw().hex())
    assert revoked.exit_code == 0, revoked.output
    kinds = _kinds(fed)
    assert "consent_given" in kinds and "consent_revoked" in kinds


def test_consent_for_another_insurer_is_refused(fed):
    _, consent = _consent(insurer="insurer-b")
    with NodeClient(fed.state, fed.topology, "insurer-a") as client, \
            pytest.raises(RemoteError) as refused:
        client.call("regulator", REGISTER_CONSENT, consent)
    assert refused.value.error == "ConsentMismatch"


def test_a_v1_consent_is_refused_with_a_typed_error_and_not_registered(fed):
    """A consent of the retired format (scrypt id commitment, an offline oracle on the id)
    is refused before anything is stored or logged, with what to do instead."""
    _, consent = _consent()
    document = consent.model_dump(mode="json")
    document["terms"]["subject"] |= {"scheme": "scrypt-n16384-r8-p1",
                                     "id_commitment": "ab" * 32}
    before = _kinds(fed).count("consent_given")
    with NodeClient(fed.state, fed.topology, "insurer-a") as client, \
            pytest.raises(RemoteError) as refused:
        client.send("regulator", REGISTER_CONSENT, json=document)
    assert (refused.value.http_status, refused.value.error) == (410, "ConsentSchemeRetired")
    assert "issues a new consent" in refused.value.detail
    assert _kinds(fed).count("consent_given") == before


def test_billing_statement_bills_only_meters_that_prove_themselves(fed):
    """The forged bill of the issue: every node that can append writes `query_answered`
    entries naming insurer-a's contract. Only the meter the serving node appended for a
    request insurer-a signed is billed; every forgery is listed as an anomaly (exit 1)."""
    contract_id = "claim-check-insurer-a-2026"
    path = CHECK.path
    insurer = load_signing_key(fed.state, "insurer-a")
    regulator = open_node(fed.state, fed.topology, "regulator")

    def meter(rid: str, rows: int, signer=insurer) -> dict:
        body_sha256 = rid.encode().hex().ljust(64, "0")
        document = request_document("POST", path, rid, body_sha256, contract_id, "insurer-a",
                                    rows)
        return {"contract_id": contract_id, "party": "insurer-a", "records_touched": 4 * rows,
                "rows_returned": rows, "compute_ms": 5,
                **meter_fields("POST", path, body_sha256, sign_request(signer, document))}

    token = current_request_id.set("rq-honest")
    try:
        append_entry(regulator, "query_answered", meter("rq-honest", 2))
    finally:
        current_request_id.reset(token)
    for node in ("operator", "health-authority", "regulator"):
        ctx = open_node(fed.state, fed.topology, node)
        token = current_request_id.set(f"rq-forged-by-{node}")
        try:
            forged = meter(f"rq-forged-by-{node}", 1_000_000)
            if node == "regulator":  # the serving node, without the payer's signature
                forged = {k: v for k, v in forged.items() if k != "data_user_signature"}
            append_entry(ctx, "query_answered", forged)
        finally:
            current_request_id.reset(token)
    period = datetime.now(UTC).astimezone().strftime("%Y-%m")
    result = _cli(fed, "billing", "statement", "--contract", contract_id,
                  "--period", period, "--json")
    assert result.exit_code == 1, result.output
    bill = json.loads(result.output)
    assert bill["meters"] == {"queries": 1, "records_touched": 8, "rows_returned": 2,
                              "compute_ms": 5}
    assert bill["total_fen"] == sum(line["amount_fen"] for line in bill["lines"])
    assert bill["total_fen"] == bill["risk_reserve_fen"] + sum(
        s["amount_fen"] for s in bill["shares"])
    assert all(line["entry_indices"] for line in bill["lines"])
    anomalies = {a["request_id"]: a for a in bill["anomalies"]}
    assert set(anomalies) == {f"rq-forged-by-{n}" for n in
                              ("operator", "health-authority", "regulator")}
    assert anomalies["rq-forged-by-operator"]["actor"] == "operator"
    assert "not by the serving node regulator" in anomalies["rq-forged-by-operator"]["reason"]
    assert anomalies["rq-forged-by-regulator"]["reason"] == (
        "no data-user signature over the request")
    assert "bill_issued" in _kinds(fed)
    # The data owners' shares come from the one honest meter alone, split as the contract
    # declares, to the fen (largest remainder: no fen lost or invented by rounding).
    terms = load_contract(CONTRACT)
    weights = {"risk-reserve": terms.risk_reserve_bp * FULL_SPLIT_BP} | {
        p: (FULL_SPLIT_BP - terms.risk_reserve_bp) * bp for p, bp in terms.revenue_split_bp.items()}
    expected = split_largest_remainder(bill["total_fen"], weights)
    shares = {s["party"]: s["amount_fen"] for s in bill["shares"]}
    assert {h: shares[h] for h in HOSPITALS} == {h: expected[h] for h in HOSPITALS}
    assert all(shares[h] > 0 for h in HOSPITALS)


def test_a_hospital_cannot_put_a_meter_in_the_log(fed):
    """A hospital, or the authority relaying for it, tries to log a meter that would bill
    insurer-a (and so pay the hospital): the log takes from a hospital, through the
    authority, only its signed data asset registrations."""
    hospital = open_node(fed.state, fed.topology, "hospital-1")
    entry = signed_entry(hospital, "query_answered", {
        "contract_id": "claim-check-insurer-a-2026", "party": "insurer-a",
        "records_touched": 10**6, "rows_returned": 10**6, "compute_ms": 1})
    with NodeClient(fed.state, fed.topology, "hospital-1") as client, \
            pytest.raises(RemoteError) as direct:
        client.send("operator", APPEND_ENTRIES, json=EntryBatch([entry]).model_dump(mode="json"),
                    check_flow=False)
    assert direct.value.error == "FlowNotAllowed"
    with NodeClient(fed.state, fed.topology, "health-authority") as client, \
            pytest.raises(RemoteError) as relayed:
        client.call("operator", APPEND_ENTRIES, EntryBatch([entry]))
    assert relayed.value.error == "IdentityMismatch"
    assert entry.signature not in {decode_leaf(leaf).entry.signature for leaf in
                                   operator_log(open_node(fed.state, fed.topology, "operator")
                                                ).log.leaves()}


def test_termination_stops_the_contract(fed, tmp_path):
    doc = tmp_path / "c.toml"
    doc.write_text(CONTRACT.read_text().replace("claim-check-insurer-a-2026", "to-end-1"))
    with NodeClient(fed.state, fed.topology, "regulator") as client:
        client.call("regulator", REGISTER_CONTRACT, _signed_by_all(fed, load_contract(doc)))
    assert _cli(fed, "contract", "terminate", "to-end-1", "--as", "insurer-a").exit_code == 0
    book = contract_book(open_node(fed.state, fed.topology, "regulator"))
    assert book.terminated_at("to-end-1") is not None
    with pytest.raises(Exception) as refused:
        book.authorize("to-end-1", "insurer-a", ["admission_date"], ["visit_found"],
                       datetime.now(UTC), 1)
    assert type(refused.value).__name__ == "ContractTerminated"
    assert "contract_terminated" in _kinds(fed)
    ctx = open_node(fed.state, fed.topology, "operator")
    events = (decode_leaf(leaf).entry.event for leaf in operator_log(ctx).log.leaves())
    (entry,) = [e for e in events
                if e.kind == "contract_terminated" and e.payload["contract_id"] == "to-end-1"]
    assert abs(entry.payload["effective_at_ms"] - entry.timestamp_ms) < 5_000
    assert len(entry.payload["notice_sha256"]) == 64


def test_a_backdated_termination_is_refused_and_the_contract_stays(fed):
    """insurer-a files a notice dated yesterday, to void the queries it made since: refused
    (typed, recorded), the contract still in force, nothing in the log."""
    terms = load_contract(CONTRACT).model_copy(update={"contract_id": "backdate-1"})
    with NodeClient(fed.state, fed.topology, "regulator") as client:
        client.call("regulator", REGISTER_CONTRACT, _signed_by_all(fed, terms))
    notice = terminate_contract("backdate-1", "insurer-a", datetime.now(UTC) - timedelta(days=1),
                                load_signing_key(fed.state, "insurer-a"))
    with NodeClient(fed.state, fed.topology, "insurer-a") as client, \
            pytest.raises(RemoteError) as refused:
        client.call("regulator", TERMINATE_CONTRACT, notice,
                    params={"contract_id": "backdate-1"})
    assert refused.value.error == "TerminationBackdated"
    book = contract_book(open_node(fed.state, fed.topology, "regulator"))
    assert book.terminated_at("backdate-1") is None
    assert book.authorize("backdate-1", "insurer-a", ["admission_date"], ["visit_found"],
                          datetime.now(UTC), 1)
    assert _refusals(fed, "regulator", "TerminationBackdated") >= 1


def test_log_outage_defers_entries_and_a_long_deferral_raises_an_incident(fed, monkeypatch):
    """The log node is down: the regulator keeps the refusal it must log, signed; an entry
    deferred beyond the bound raises one incident (not one per pass); once the log is back
    the node's own loop appends it, once."""
    regulator = open_node(fed.state, fed.topology, "regulator")
    stop_node(fed.state, "operator", grace=5)
    try:
        token = current_request_id.set("rq-deferred-during-outage")
        try:
            assert not append_or_defer(regulator, "query_refused", {
                "contract_id": "claim-check-insurer-a-2026", "party": "insurer-a",
                "reason": "ConsentRevoked"})
        finally:
            current_request_id.reset(token)
        monkeypatch.setenv(BOUND_ENV, "0.2")
        time.sleep(0.3)
        first = complete_deferred(regulator)
        assert (first.appended, first.pending, first.incidents) == (0, 1, 1)
        assert complete_deferred(regulator).incidents == 0  # raised once
        [incident] = deferral_incidents(regulator)
        assert incident["kind"] == "query_refused" and incident["last_error"] == (
            "NodeUnavailable")
        assert [e for e in read_log(fed.state.node("regulator").log)
                if e["event"] == "log_deferral_incident" and e["kind"] == "query_refused"]
    finally:
        start_node(fed.state, fed.topology_path, "operator")
        assert wait_healthy(fed.state, fed.topology, ["operator"])["operator"] == "ok"
        fed.admin_login()

    def logged() -> list:
        ctx = open_node(fed.state, fed.topology, "operator")
        return [e for e in (decode_leaf(leaf).entry.event for leaf in
                            operator_log(ctx).log.leaves())
                if e.request_id == "rq-deferred-during-outage"]

    assert wait_for(lambda: logged() and not deferral_incidents(regulator), timeout=15)
    time.sleep(1.5)  # another pass of the loop stores nothing twice
    assert len(logged()) == 1 and logged()[0].kind == "query_refused"
