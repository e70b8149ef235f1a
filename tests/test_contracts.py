"""Contracts: load and validate, sign by all parties, authorize every query, terminate."""

import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.contracts import (
    DEFAULT_CHECKS_PER_CONSENT_PER_DAY,
    MAX_CHECKS_PER_CONSENT_PER_DAY,
    ColumnNotAllowed,
    ContractBook,
    ContractConflict,
    ContractExpired,
    ContractInvalid,
    ContractNotSigned,
    ContractNotYetValid,
    ContractSignatureInvalid,
    ContractTerminated,
    ContractUnknown,
    OutputNotAllowed,
    PartyNotInContract,
    QueryMeter,
    QuotaExceeded,
    TerminationBackdated,
    TerminationNotAllowed,
    load_contract,
    parse_contract,
    sign_contract,
    terminate_contract,
    usage_from_log,
)
from governance.ledger import MerkleLog, make_event, sign_event
from governance.meters import meter_fields, request_document, sign_request
from parties.claims.api import CHECK

SCENARIO_CONTRACTS = Path(__file__).resolve().parents[1] / "scenarios" / "claim_check" / "contracts"
PARTIES = ("operator", "regulator", "health-authority", "insurer-a")
NOW = datetime(2026, 11, 3, 10, 0, tzinfo=UTC)

CONTRACT_TOML = """
contract_id = "claim-check-2026-insurer-a"
parties = ["operator", "regulator", "health-authority", "insurer-a"]
data_users = ["insurer-a"]
scenario = "claim_check"
purpose = "claim_settlement"
allowed_columns = ["visit_date", "amount_fen", "diagnosis_code"]
allowed_outputs = ["verdict"]
risk_reserve_bp = 500
utc_offset_minutes = 480

[quota]
queries_per_day = 3
rows_per_query = 2
rows_per_day = 5

[validity]
not_before = 2026-11-01T00:00:00+08:00
not_after = 2027-11-01T00:00:00+08:00

[price]
per_query_fen = 150
per_record_fen = 20
subscription_fen_per_month = 100000

[revenue_split_bp]
operator = 3000
regulator = 2000
health-authority = 5000

[termination]
notice_days = 30
may_terminate = ["insurer-a", "operator"]
"""


@pytest.fixture
def keys():
    return {name: Ed25519PrivateKey.generate() for name in PARTIES}


@pytest.fixture
def terms(tmp_path):
    path = tmp_path / "contract.toml"
    path.write_text(CONTRACT_TOML)
    return load_contract(path)


def _fully_signed(terms, keys):
    signed = terms
    for party in terms.parties:
        signed = sign_contract(signed, party, keys[party])
    return signed


@pytest.fixture
def book(tmp_path, keys, terms):
    book = ContractBook(
        sqlite3.connect(tmp_path / "contracts.db"), {n: k.public_key() for n, k in keys.items()}
    )
    book.register(_fully_signed(terms, keys), NOW)
    return book


def _authorize(
    book, at=NOW, rows=1, columns=("amount_fen",), outputs=("verdict",), party="insurer-a"
):
    return book.authorize("claim-check-2026-insurer-a", party, columns, outputs, at, rows)


def test_toml_and_json_documents_load_to_the_same_terms(tmp_path, terms):
    path = tmp_path / "contract.json"
    path.write_text(terms.model_dump_json())
    assert load_contract(path) == terms
    assert terms.price.per_query_fen == 150 and terms.day_of(NOW).isoformat() == "2026-11-03"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"revenue_split_bp": {"operator": 3000, "regulator": 2000}}, "revenue_split_bp"),
        ({"revenue_split_bp": {"operator": 5000, "mallory": 5000}}, "revenue_split_bp"),
        ({"data_users": ["insurer-b"]}, "data_users"),
        ({"quota": {"queries_per_day": 0, "rows_per_query": 1, "rows_per_day": 1}}, "quota"),
        (
            {
                "validity": {
                    "not_before": "2026-11-01T00:00:00",
                    "not_after": "2027-01-01T00:00:00Z",
                }
            },
            "validity.not_before",
        ),
        ({"price": {"per_query_fen": 1.5}}, "price.per_query_fen"),
        ({"surprise": True}, "surprise"),
    ],
)
def test_invalid_documents_name_the_field(terms, change, field):
    document = {**terms.model_dump(mode="json"), **change}
    with pytest.raises(ContractInvalid) as caught:
        parse_contract(document)
    assert str(caught.value).startswith(field)


_QUOTA = {"queries_per_day": 3, "rows_per_query": 2, "rows_per_day": 5}


def test_check_budget_defaults_to_a_few_checks_a_day(terms):
    """A contract that states no check budget gets the default, a few checks a day."""
    assert "checks_per_consent_per_day" not in CONTRACT_TOML
    assert terms.quota.checks_per_consent_per_day == DEFAULT_CHECKS_PER_CONSENT_PER_DAY == 3
    for insurer in ("insurer-a", "insurer-b"):
        scenario = load_contract(SCENARIO_CONTRACTS / f"claim-check-{insurer}.toml")
        assert scenario.quota.checks_per_consent_per_day == 4  # the demo's ss + he, twice


@pytest.mark.parametrize("budget", [0, -1, 2.5, "3", True, None,
                                    MAX_CHECKS_PER_CONSENT_PER_DAY + 1])
def test_invalid_check_budget_is_refused_naming_the_field(terms, budget):
    document = {**terms.model_dump(mode="json"),
                "quota": {**_QUOTA, "checks_per_consent_per_day": budget}}
    with pytest.raises(ContractInvalid) as caught:
        parse_contract(document)
    assert str(caught.value).startswith("quota.checks_per_consent_per_day")


def test_check_budget_is_part_of_the_signed_terms(terms, keys):
    """Changing the budget changes the document every party signed."""
    document = {**terms.model_dump(mode="json"),
                "quota": {**_QUOTA, "checks_per_consent_per_day": 50}}
    assert parse_contract(document).sha256() != terms.sha256()


def test_unparseable_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("contract_id = ")
    with pytest.raises(ContractInvalid, match=r"broken\.toml"):
        load_contract(path)


def test_in_force_only_when_every_party_signed(tmp_path, keys, terms):
    book = ContractBook(
        sqlite3.connect(tmp_path / "c.db"), {n: k.public_key() for n, k in keys.items()}
    )
    partial = sign_contract(
        sign_contract(terms, "operator", keys["operator"]), "insurer-a", keys["insurer-a"]
    )
    book.register(partial, NOW)
    with pytest.raises(ContractNotSigned, match="regulator"):
        _authorize(book)
    for party in ("regulator", "health-authority"):
        signature = sign_contract(terms, party, keys[party]).signatures[party]
        book.add_signature(terms.contract_id, party, signature)
    assert _authorize(book).queries_today == 1


def test_forged_or_foreign_signatures_are_refused(tmp_path, keys, terms):
    book = ContractBook(
        sqlite3.connect(tmp_path / "c.db"), {n: k.public_key() for n, k in keys.items()}
    )
    forged = sign_contract(terms, "regulator", keys["operator"])  # operator signs as regulator
    with pytest.raises(ContractSignatureInvalid, match="regulator"):
        book.register(forged, NOW)
    with pytest.raises(ContractSignatureInvalid, match="not a party"):
        sign_contract(terms, "insurer-b", keys["insurer-a"])
    with pytest.raises(ContractUnknown):
        book.get(terms.contract_id)  # nothing was stored


def test_other_terms_under_a_taken_id_conflict(book, keys, terms):
    cheaper = terms.model_copy(
        update={"price": terms.price.model_copy(update={"per_query_fen": 1})}
    )
    with pytest.raises(ContractConflict):
        book.register(sign_contract(cheaper, "insurer-a", keys["insurer-a"]), NOW)


def test_validity_window_and_unknown_contract(book):
    with pytest.raises(ContractNotYetValid):
        _authorize(book, at=datetime(2026, 10, 31, 15, 59, tzinfo=UTC))
    assert _authorize(book, at=datetime(2026, 10, 31, 16, 0, tzinfo=UTC))  # 00:00 in +08:00
    with pytest.raises(ContractExpired):
        _authorize(book, at=datetime(2027, 11, 1, tzinfo=UTC))
    with pytest.raises(ContractUnknown):
        book.authorize("no-such-contract", "insurer-a", [], ["verdict"], NOW, 1)


def test_party_columns_and_outputs(book):
    with pytest.raises(PartyNotInContract):
        _authorize(book, party="regulator")
    with pytest.raises(ColumnNotAllowed, match="patient_name"):
        _authorize(book, columns=("amount_fen", "patient_name"))
    with pytest.raises(OutputNotAllowed, match="raw_record"):
        _authorize(book, outputs=("raw_record",))


def test_daily_quota_counts_queries_and_rows(book):
    for _ in range(3):
        _authorize(book)
    with pytest.raises(QuotaExceeded, match="queries"):
        _authorize(book)
    tomorrow = NOW + timedelta(days=1)
    _authorize(book, at=tomorrow, rows=2)
    _authorize(book, at=tomorrow, rows=2)
    with pytest.raises(QuotaExceeded, match="rows"):
        _authorize(book, at=tomorrow, rows=2)
    with pytest.raises(QuotaExceeded, match="per query"):
        _authorize(book, at=tomorrow + timedelta(days=1), rows=3)
    assert book.usage("claim-check-2026-insurer-a", "insurer-a", tomorrow.date()).rows == 4


def test_quota_holds_under_concurrent_nodes(tmp_path, keys, book):
    path = tmp_path / "contracts.db"
    granted, refused = [], []

    def worker():
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
        own = ContractBook(conn, {n: k.public_key() for n, k in keys.items()})
        for _ in range(3):
            try:
                granted.append(_authorize(own, at=NOW + timedelta(days=5)))
            except QuotaExceeded:
                refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 3 and len(refused) == 9


def test_termination(book, keys):
    contract_id = "claim-check-2026-insurer-a"
    with pytest.raises(TerminationNotAllowed):
        book.terminate(terminate_contract(contract_id, "regulator", NOW, keys["regulator"]), NOW)
    forged = terminate_contract(contract_id, "insurer-a", NOW, keys["operator"])
    with pytest.raises(ContractSignatureInvalid):
        book.terminate(forged, NOW)
    assert _authorize(book)
    later = NOW + timedelta(hours=1)
    book.terminate(terminate_contract(contract_id, "insurer-a", later, keys["insurer-a"]), later)
    with pytest.raises(ContractTerminated):
        _authorize(book, at=later)
    assert _authorize(book, at=NOW + timedelta(minutes=30))  # before termination


def test_a_backdated_or_postdated_termination_is_refused(book, keys):
    """A party that wants past queries voided (or the contract kept alive) dates its notice
    away from the filing time: refused, and the contract stays in force."""
    contract_id = "claim-check-2026-insurer-a"
    filed = NOW + timedelta(days=2)
    for dated in (NOW, filed + timedelta(days=1)):
        with pytest.raises(TerminationBackdated):
            book.terminate(terminate_contract(contract_id, "insurer-a", dated,
                                              keys["insurer-a"]), filed)
    assert book.terminated_at(contract_id) is None
    effective = book.terminate(terminate_contract(
        contract_id, "insurer-a", filed - timedelta(seconds=30), keys["insurer-a"]), filed)
    assert effective == filed  # in effect when filed, not at the notice's own time


def test_quota_usage_is_recomputable_from_the_log(tmp_path, keys, book):
    log = MerkleLog(
        sqlite3.connect(tmp_path / "log.db"),
        "operator",
        keys["operator"],
        {"regulator": keys["regulator"].public_key()},
    )
    entries = []
    for minute in range(3):
        at = NOW + timedelta(minutes=minute)
        grant = _authorize(book, at=at, rows=1)
        meter = QueryMeter(
            contract_id=grant.contract_id,
            party=grant.party,
            records_touched=4,
            rows_returned=1,
            compute_ms=30,
        )
        rid, body_sha256 = f"req-{minute}", f"{minute:064x}"
        request = request_document(CHECK.method, CHECK.path, rid, body_sha256,
                                   grant.contract_id, "insurer-a", 1)
        signed = meter_fields(CHECK.method, CHECK.path, body_sha256,
                              sign_request(keys["insurer-a"], request))
        event = make_event(
            "query_answered",
            "regulator",
            rid,
            {**meter.payload(), **signed},
            timestamp_ms=int(at.timestamp() * 1000),
        )
        entries.append(sign_event(event, keys["regulator"]))
    log.append(entries, timestamp_ms=int(NOW.timestamp() * 1000) + 60_000)  # the log's clock
    public = {name: key.public_key() for name, key in keys.items()}
    from_log = usage_from_log(
        log.entries(), book.get(grant.contract_id).terms, "insurer-a", NOW.date(), "regulator",
        public,
    )
    stored = book.usage(grant.contract_id, "insurer-a", NOW.date())
    assert from_log.queries == stored.queries == 3 and from_log.rows == stored.rows == 3
