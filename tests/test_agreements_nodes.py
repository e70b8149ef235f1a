"""Contracts, consents and bills through real nodes, recorded in the log."""

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from governance.consent import issue_consent
from governance.contracts import SignedContract, load_contract, sign_contract
from governance.ledger import decode_leaf
from governance.meters import meter_fields, request_document, sign_request
from parties.agreements.api import REGISTER_CONSENT, REGISTER_CONTRACT
from parties.agreements.books import contract_book
from parties.claims.api import CHECK
from parties.ledger.client import append_entry
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
NODES = ["health-authority", "operator", "regulator", "insurer-a"]


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
    doc = tmp_path / "contract.toml"
    doc.write_text(CONTRACT.read_text())
    for party in ("insurer-a", "regulator", "operator"):
        assert _cli(fed, "contract", "sign", str(doc), "--as", party).exit_code == 0
        doc = tmp_path / "contract.signed.json"
    partial = _cli(fed, "contract", "register", str(doc))
    assert partial.exit_code == 0 and "awaiting health-authority" in partial.output
    assert "contract_signed" not in _kinds(fed)
    assert _cli(fed, "contract", "sign", str(doc), "--as", "health-authority").exit_code == 0
    done = _cli(fed, "contract", "register", str(doc))
    assert "in force" in done.output, done.output
    assert _kinds(fed).count("contract_signed") == 1


def test_forged_party_signature_is_refused(fed):
    terms = load_contract(CONTRACT).model_copy(update={"contract_id": "forged-1"})
    forged = sign_contract(terms, "operator", Ed25519PrivateKey.generate())
    with NodeClient(fed.state, fed.topology, "insurer-a") as client, \
            pytest.raises(RemoteError) as refused:
        client.call("regulator", REGISTER_CONTRACT, forged)
    assert refused.value.error == "ContractSignatureInvalid"


def _consent(insurer: str = "insurer-a", days: int = 30):
    key = Ed25519PrivateKey.generate()
    now = datetime.now(UTC)
    consent = issue_consent(
        key, "320505199001011234", insurer=insurer, purpose="claim_settlement",
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


def test_termination_stops_the_contract(fed, tmp_path):
    doc = tmp_path / "c.toml"
    doc.write_text(CONTRACT.read_text().replace("claim-check-insurer-a-2026", "to-end-1"))
    signed = SignedContract(terms=load_contract(doc))
    for party in ("insurer-a", "regulator", "operator", "health-authority"):
        signed = sign_contract(signed, party, load_signing_key(fed.state, party))
    with NodeClient(fed.state, fed.topology, "regulator") as client:
        client.call("regulator", REGISTER_CONTRACT, signed)
    assert _cli(fed, "contract", "terminate", "to-end-1", "--as", "insurer-a").exit_code == 0
    book = contract_book(open_node(fed.state, fed.topology, "regulator"))
    assert book.terminated_at("to-end-1") is not None
    with pytest.raises(Exception) as refused:
        book.authorize("to-end-1", "insurer-a", ["admission_date"], ["visit_found"],
                       datetime.now(UTC), 1)
    assert type(refused.value).__name__ == "ContractTerminated"
    assert "contract_terminated" in _kinds(fed)


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
