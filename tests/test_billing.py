"""Metering from the log, statements traced to entries, exact revenue split."""

import io
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from governance.billing import (
    MeteringError,
    Statement,
    split_largest_remainder,
    statement,
)
from governance.contracts import (
    ContractTerms,
    QueryMeter,
    load_contract,
    parse_contract,
    usage_from_log,
)
from governance.ledger import LogEntry, MerkleLog, make_event, sign_event
from governance.meters import meter_fields, request_document, sign_request
from parties.claims.api import CHECK

KEY = Ed25519PrivateKey.generate()  # the serving node's (the regulator's)
INSURER_KEY = Ed25519PrivateKey.generate()  # the data user's: it signs every request it sends
OTHER_KEYS = {name: Ed25519PrivateKey.generate() for name in ("operator", "health-authority")}
KEYS = {"regulator": KEY.public_key(), "insurer-a": INSURER_KEY.public_key(),
        **{name: key.public_key() for name, key in OTHER_KEYS.items()}}
CID = "claim-check-2026-insurer-a"
PATH = CHECK.path


def _bill(terms, period, log_entries):
    return statement(terms, period, log_entries, "regulator", KEYS)


def _terms(**changes) -> ContractTerms:
    document = {
        "contract_id": CID,
        "parties": ["operator", "regulator", "health-authority", "insurer-a"],
        "data_users": ["insurer-a"],
        "scenario": "claim_check",
        "purpose": "claim_settlement",
        "allowed_columns": ["amount_fen"],
        "allowed_outputs": ["verdict"],
        "quota": {"queries_per_day": 1000, "rows_per_query": 10, "rows_per_day": 10000},
        "validity": {
            "not_before": "2026-10-01T00:00:00+08:00",
            "not_after": "2027-10-01T00:00:00+08:00",
        },
        "price": {"per_query_fen": 150, "per_record_fen": 20, "subscription_fen_per_month": 100000},
        "revenue_split_bp": {"operator": 3333, "regulator": 3333, "health-authority": 3334},
        "risk_reserve_bp": 500,
        "termination": {"notice_days": 30, "may_terminate": ["insurer-a"]},
    }
    document.update(changes)
    return parse_contract(document)


def _ms(*args) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)


def _event(kind, request_id, at_ms, **payload):
    return sign_event(make_event(kind, "regulator", request_id, payload, timestamp_ms=at_ms), KEY)


def _answered(request_id, at_ms, records, contract_id=CID, rows=1, compute_ms=25,
              actor="regulator", signer=INSURER_KEY):
    """A meter as the serving node appends it: with the data user's signature of the request
    (`actor` and `signer` let a test forge one)."""
    meter = QueryMeter(
        contract_id=contract_id,
        party="insurer-a",
        records_touched=records,
        rows_returned=rows,
        compute_ms=compute_ms,
    )
    body_sha256 = f"{request_id}-body".encode().hex().ljust(64, "0")[:64]
    document = request_document("POST", PATH, request_id, body_sha256, contract_id, "insurer-a",
                                rows)
    signed = meter_fields("POST", PATH, body_sha256, sign_request(signer, document))
    key = KEY if actor == "regulator" else OTHER_KEYS[actor]
    event = make_event("query_answered", actor, request_id, {**meter.payload(), **signed},
                       timestamp_ms=at_ms)
    return sign_event(event, key)


@pytest.fixture
def leaves(tmp_path):
    log = MerkleLog(
        sqlite3.connect(tmp_path / "log.db"),
        "operator",
        Ed25519PrivateKey.generate(),
        {"regulator": KEY.public_key()},
    )
    for entry in [
            _event("contract_signed", "sign-1", _ms(2026, 10, 1), contract_id=CID),  # 0
            _answered("q-1", _ms(2026, 10, 31, 15, 59), records=9),  # 1 Oct 31 local
            _answered("q-2", _ms(2026, 10, 31, 16, 0), records=3),  # 2 Nov 1 local
            _answered("q-3", _ms(2026, 11, 1, 3, 0), records=4),  # 3 Nov 1
            # 4: the same request metered again (a retry after a crash signs a new entry;
            # the log itself refuses a byte-identical one)
            _answered("q-3", _ms(2026, 11, 1, 3, 1), records=4),
            _event("query_refused", "q-4", _ms(2026, 11, 2), contract_id=CID),  # 5
            _answered("q-5", _ms(2026, 11, 2, 8, 0), records=2, contract_id="other-deal"),  # 6
            _answered("q-6", _ms(2026, 11, 20, 1, 0), records=5, rows=2, compute_ms=40),  # 7 Nov 20
            _answered("q-7", _ms(2026, 11, 30, 16, 0), records=7),  # 8 Dec 1 local
    ]:
        # the log's clock reads what each entry claims: bills follow the integration time
        log.append([entry], timestamp_ms=entry.event.timestamp_ms)
    return list(log.entries())


def test_statement_lines_trace_to_log_entries(leaves):
    bill = _bill(_terms(), "2026-11", leaves)
    by_item = {(line.item, line.day.isoformat() if line.day else None): line for line in bill.lines}
    nov1_queries = by_item[("queries answered", "2026-11-01")]
    assert nov1_queries.quantity == 2 and nov1_queries.entry_indices == (2, 3, 4)
    assert by_item[("records touched", "2026-11-01")].amount_fen == (3 + 4) * 20
    assert by_item[("queries answered", "2026-11-20")].entry_indices == (7,)
    assert by_item[("subscription", None)].entry_indices == (0,)
    assert bill.meters.queries == 3 and bill.meters.records_touched == 12
    assert bill.meters.rows_returned == 4 and bill.meters.compute_ms == 90
    assert bill.total_fen == 3 * 150 + 12 * 20 + 100000
    assert bill.risk_reserve_fen + sum(s.amount_fen for s in bill.shares) == bill.total_fen
    assert bill.risk_reserve_fen == bill.total_fen * 500 // 10000
    assert {s.party for s in bill.shares} == {"operator", "regulator", "health-authority"}


def test_json_rich_and_log_payload(leaves):
    bill = _bill(_terms(), "2026-11", leaves)
    assert Statement.model_validate(json.loads(bill.to_json())) == bill
    console = Console(file=io.StringIO(), width=140)
    console.print(bill.render())
    text = console.file.getvalue()
    assert (
        "Statement claim-check-2026-insurer-a" in text and "2-4" in text and "Revenue split" in text
    )
    event = make_event("bill_issued", "operator", "bill-2026-11", bill.log_payload())
    assert event.payload["total_fen"] == bill.total_fen


def test_termination_with_notice_bounds_the_subscription(leaves):
    terminated = _event("contract_terminated", "t-1", _ms(2026, 10, 10), contract_id=CID)
    extra = [*leaves, LogEntry(index=9, entry=terminated)]
    assert any(line.item == "subscription" for line in _bill(_terms(), "2026-11", extra).lines)
    no_notice = _terms(termination={"notice_days": 0, "may_terminate": ["insurer-a"]})
    assert not any(
        line.item == "subscription" for line in _bill(no_notice, "2026-11", extra).lines
    )
    unsigned = [leaf for leaf in leaves if leaf.entry.event.kind != "contract_signed"]
    assert not any(
        line.item == "subscription" for line in _bill(_terms(), "2026-11", unsigned).lines
    )


def test_malformed_meter_names_the_entry():
    signed = _answered("q-x", _ms(2026, 11, 5), records=3).event
    payload = {k: v for k, v in signed.payload.items() if k != "compute_ms"}
    bad = sign_event(make_event("query_answered", "regulator", "q-x", payload,
                                timestamp_ms=signed.timestamp_ms), KEY)
    with pytest.raises(MeteringError, match="entry 4"):
        _bill(_terms(), "2026-11", [LogEntry(index=4, entry=bad)])
    with pytest.raises(ValueError, match="YYYY-MM"):
        _bill(_terms(), "2026-13", [])


def test_largest_remainder_examples():
    assert split_largest_remainder(100, {"a": 1, "b": 1, "c": 1}) == {"a": 34, "b": 33, "c": 33}
    assert split_largest_remainder(0, {"a": 0}) == {"a": 0}
    assert split_largest_remainder(7, {"a": 3, "b": 0}) == {"a": 7, "b": 0}
    with pytest.raises(ValueError):
        split_largest_remainder(-1, {"a": 1})


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(0, 10**12),
    weights=st.dictionaries(
        st.text("abcdef", min_size=1, max_size=3), st.integers(0, 10**8), min_size=1, max_size=8
    ).filter(lambda w: sum(w.values()) > 0),
)
def test_split_sums_exactly_and_is_within_one_fen(total, weights):
    parts = split_largest_remainder(total, weights)
    assert sum(parts.values()) == total
    weight_sum = sum(weights.values())
    for name, weight in weights.items():
        exact = total * weight / weight_sum
        assert abs(parts[name] - exact) < 1 + 1e-6 * max(1, exact)
        assert parts[name] >= 0


split_bp = st.lists(st.integers(0, 10_000), min_size=1, max_size=5).map(
    lambda xs: [*xs, 10_000 - sum(xs)] if sum(xs) <= 10_000 else [10_000]
)


@settings(max_examples=60, deadline=None)
@given(
    records=st.lists(st.integers(0, 1_000), min_size=0, max_size=30),
    per_query=st.integers(0, 10_000),
    per_record=st.integers(0, 1_000),
    subscription=st.integers(0, 10**7),
    reserve=st.integers(0, 10_000),
    shares=split_bp,
)
def test_statement_totals_reconcile_exactly(
    records, per_query, per_record, subscription, reserve, shares
):
    parties = [f"p{i}" for i in range(len(shares))]
    terms = _terms(
        parties=[*parties, "insurer-a"],
        revenue_split_bp=dict(zip(parties, shares, strict=True)),
        risk_reserve_bp=reserve,
        price={
            "per_query_fen": per_query,
            "per_record_fen": per_record,
            "subscription_fen_per_month": subscription,
        },
        termination={"notice_days": 0, "may_terminate": ["insurer-a"]},
    )
    leaves = [LogEntry(0, _event("contract_signed", "s", _ms(2026, 10, 1), contract_id=CID))]
    start = datetime(2026, 11, 1, tzinfo=UTC)
    for i, count in enumerate(records):
        at = int((start + timedelta(hours=7 * i)).timestamp() * 1000)
        leaves.append(LogEntry(i + 1, _answered(f"q-{i}", at, records=count)))
    bill = _bill(terms, "2026-11", leaves)
    assert bill.total_fen == sum(line.amount_fen for line in bill.lines)
    assert bill.total_fen == len(records) * per_query + sum(records) * per_record + subscription
    assert bill.risk_reserve_fen + sum(s.amount_fen for s in bill.shares) == bill.total_fen
    traced = sorted({i for line in bill.lines if line.day for i in line.entry_indices})
    assert traced == list(range(1, len(records) + 1)) or not (per_query or per_record)


def _forged_meters():
    """Meters naming the contract that no honest serving node appended for a signed request:
    each node that can append forges its own, with the freedom to copy a real signature."""
    honest = _answered("q-honest", _ms(2026, 11, 3), records=4)
    copied = honest.event.payload
    forged = {
        # the operator and the health authority append meters as themselves, even carrying
        # the insurer's real signature of another request
        "operator": _answered("q-op", _ms(2026, 11, 3), records=10**6, actor="operator"),
        "health-authority": _answered("q-ha", _ms(2026, 11, 3), records=10**6,
                                      actor="health-authority"),
        "operator-copy": sign_event(make_event("query_answered", "operator", "q-honest",
                                               copied, timestamp_ms=_ms(2026, 11, 3)),
                                    OTHER_KEYS["operator"]),
        # the serving node itself: no signature, a signature by another key, an honest
        # signature replayed under a new request id, or more rows than were signed
        "unsigned": _event("query_answered", "q-unsigned", _ms(2026, 11, 3), contract_id=CID,
                           party="insurer-a", records_touched=10**6, rows_returned=1,
                           compute_ms=1),
        "wrong-signer": _answered("q-wrong", _ms(2026, 11, 3), records=10**6,
                                  signer=OTHER_KEYS["operator"]),
        "replayed": sign_event(make_event("query_answered", "regulator", "q-replayed", copied,
                                          timestamp_ms=_ms(2026, 11, 3)), KEY),
        "inflated": sign_event(make_event("query_answered", "regulator", "q-honest",
                                          {**copied, "rows_returned": 500},
                                          timestamp_ms=_ms(2026, 11, 3) + 1), KEY),
    }
    return honest, forged


def test_forged_meters_are_anomalies_never_billed():
    honest, forged = _forged_meters()
    leaves = [LogEntry(0, honest)] + [
        LogEntry(i + 1, entry) for i, entry in enumerate(forged.values())]
    terms = _terms(price={"per_query_fen": 150, "per_record_fen": 20})
    bill = _bill(terms, "2026-11", leaves)
    assert bill.meters.queries == 1 and bill.meters.records_touched == 4
    assert bill.total_fen == 150 + 4 * 20
    assert [line.entry_indices for line in bill.lines] == [(0,), (0,)]
    anomalies = {a.index: a for a in bill.anomalies}
    assert sorted(anomalies) == list(range(1, len(forged) + 1))
    by_name = dict(zip(forged, (anomalies[i + 1] for i in range(len(forged))), strict=True))
    assert "not by the serving node" in by_name["operator"].reason
    assert "not by the serving node" in by_name["health-authority"].reason
    assert "not by the serving node" in by_name["operator-copy"].reason
    assert by_name["unsigned"].reason == "no data-user signature over the request"
    for name in ("wrong-signer", "replayed", "inflated"):
        assert by_name[name].reason == "the data user's signature does not sign this request"
    console = Console(file=io.StringIO(), width=160)
    console.print(bill.render())
    assert "anomalies" in console.file.getvalue()


def test_quota_from_log_counts_only_meters_that_prove_themselves():
    honest, forged = _forged_meters()
    leaves = [LogEntry(0, honest)] + [
        LogEntry(i + 1, entry) for i, entry in enumerate(forged.values())]
    day = datetime(2026, 11, 3, tzinfo=UTC).date()
    usage = usage_from_log(leaves, _terms(), "insurer-a", day, "regulator", KEYS)
    assert (usage.queries, usage.rows) == (1, 1)
    assert len(usage.anomalies) == len(forged)


def _integrated(entries_at: list[tuple[object, int]]) -> list[LogEntry]:
    """A real log that integrates each entry at the given log clock reading."""
    log = MerkleLog(sqlite3.connect(":memory:"), "operator", Ed25519PrivateKey.generate(),
                    {"regulator": KEY.public_key()})
    for entry, clock in entries_at:
        log.append([entry], timestamp_ms=clock)
    return list(log.entries())


def test_a_duplicate_meter_across_a_month_boundary_is_billed_once():
    """The serving node meters one request twice, either side of midnight on Oct 31 (local
    time): the request is billed in October only, never again in November."""
    before, after = _ms(2026, 10, 31, 15, 59, 30), _ms(2026, 10, 31, 16, 0, 30)
    entries = _integrated([
        (_event("contract_signed", "sign-1", _ms(2026, 10, 1), contract_id=CID),
         _ms(2026, 10, 1)),
        (_answered("q-dup", before, records=5), before),
        (_answered("q-dup", after, records=5), after),  # the retry, after midnight
    ])
    october, november = _bill(_terms(), "2026-10", entries), _bill(_terms(), "2026-11", entries)
    assert october.meters.queries == 1 and october.meters.records_touched == 5
    assert november.meters.queries == 0
    queries = [line for line in october.lines if line.item == "queries answered"]
    assert [line.entry_indices for line in queries] == [(1, 2)]


def test_bills_follow_the_logs_clock_not_the_nodes_claim():
    """A serving node backdates a meter to the previous month, within the log's skew bound:
    the bill counts it when the log integrated it."""
    claimed, integrated = _ms(2026, 10, 31, 15, 57), _ms(2026, 10, 31, 16, 1)  # 4 min apart
    entries = _integrated([(_answered("q-late", claimed, records=3), integrated)])
    assert entries[0].integrated_ms == integrated and entries[0].time_ms == integrated
    assert _bill(_terms(), "2026-10", entries).meters.queries == 0
    assert _bill(_terms(), "2026-11", entries).meters.queries == 1
    day = datetime.fromtimestamp(integrated / 1000, UTC).astimezone(_terms().timezone).date()
    usage = usage_from_log(entries, _terms(), "insurer-a", day, "regulator", KEYS)
    assert usage.queries == 1


def test_meters_are_checked_with_the_data_users_key_valid_at_their_index():
    """The insurer rotates its signing key: meters it signed before stay billable; a meter
    signed with the rotated-out key after the rotation (a thief's) is an anomaly."""
    from governance.ledger import rotation_entry

    new_key = Ed25519PrivateKey.generate()
    at = _ms(2026, 11, 3)
    rotation = rotation_entry("insurer-a", INSURER_KEY, new_key, "rotate-1", at)
    entries = [
        LogEntry(0, _answered("q-before", at, records=1)),
        LogEntry(1, rotation),
        LogEntry(2, _answered("q-after", at + 1, records=1, signer=new_key)),
        LogEntry(3, _answered("q-stolen", at + 2, records=1)),  # the old key, after its end
    ]
    bill = _bill(_terms(), "2026-11", entries)
    assert bill.meters.queries == 2
    assert [(a.index, a.request_id) for a in bill.anomalies] == [(3, "q-stolen")]
    assert "signature does not sign" in bill.anomalies[0].reason


SCENARIO_CONTRACT = (Path(__file__).resolve().parents[1]
                     / "scenarios/claim_check/contracts/claim-check-insurer-a.toml")


def _scenario_bill(*extra: LogEntry) -> Statement:
    """insurer-a's scenario contract (hospitals among its parties) billed for one honest
    check of 8 records in 2026-11: 50 + 8 x 2 + the 100,000 subscription = 100,066 fen."""
    terms = load_contract(SCENARIO_CONTRACT)
    cid = terms.contract_id
    leaves = [LogEntry(0, _event("contract_signed", "s", _ms(2026, 10, 1), contract_id=cid)),
              LogEntry(1, _answered("q-1", _ms(2026, 11, 3), records=8, contract_id=cid)),
              *extra]
    return _bill(terms, "2026-11", leaves)


def test_data_owners_share_every_bill_to_the_fen():
    """The rounding rule, worked by hand on the scenario contract: every part gets the floor
    of its exact share of 100,066 fen (reserve 5 %, then the declared basis points of the
    rest); the 4 fen left go one each to the largest fractional remainders, ties by name:
    hospital-2 and hospital-3 (.72...), then health-authority and operator (.675; the
    regulator's equal .675 loses the tie). Nothing is lost, nothing invented."""
    bill = _scenario_bill()
    assert bill.total_fen == 100_066
    assert bill.risk_reserve_fen == 5003
    assert {s.party: s.amount_fen for s in bill.shares} == {
        "health-authority": 23_766, "operator": 23_766, "regulator": 23_765,
        "hospital-1": 7928, "hospital-2": 7919, "hospital-3": 7919, "insurer-a": 0}
    assert bill.risk_reserve_fen + sum(s.amount_fen for s in bill.shares) == bill.total_fen


def test_a_data_owners_share_never_counts_a_meter_the_serving_node_did_not_sign():
    """The health authority (a party, paid per bill) appends a meter for a check insurer-a
    signed, to raise the bill the hospitals and it share: an anomaly, and every share,
    the hospitals' included, is what the honest meter alone gives."""
    cid = load_contract(SCENARIO_CONTRACT).contract_id
    forged = LogEntry(2, _answered("q-2", _ms(2026, 11, 3), records=10**6, contract_id=cid,
                                   actor="health-authority"))
    honest, with_forgery = _scenario_bill(), _scenario_bill(forged)
    assert with_forgery.shares == honest.shares and with_forgery.total_fen == 100_066
    assert [a.index for a in with_forgery.anomalies] == [2]
    assert "not by the serving node" in with_forgery.anomalies[0].reason


def test_a_meter_edited_in_the_store_is_an_anomaly_never_billed(tmp_path):
    """rev16 H1: the operator rewrites `records_touched` in a stored meter leaf (the data
    user's signature does not cover it): the serving node's own signature no longer
    verifies, so the bill reports the meter and counts nothing of it."""
    from governance.ledger import decode_leaf, encode_leaf
    from governance.ledger.events import LogEvent, SignedEntry

    conn = sqlite3.connect(tmp_path / "log.db")
    log = MerkleLog(conn, "operator", Ed25519PrivateKey.generate(), {"regulator": KEY.public_key()})
    at = _ms(2026, 11, 3)
    log.append([_event("contract_signed", "s", at, contract_id=CID)], timestamp_ms=at)
    log.append([_answered("q-1", at + 1, records=3)], timestamp_ms=at + 1)

    def bill() -> Statement:  # raw leaves from the operator's db, as `agreements bill` reads
        rows = conn.execute("SELECT leaf FROM ledger_entries ORDER BY leaf_index")
        return _bill(_terms(), "2026-11", [decode_leaf(bytes(r[0])) for r in rows])

    honest = bill()
    assert (honest.meters.records_touched, honest.anomalies) == (3, ())
    leaf = decode_leaf(log.leaf(1))
    document = leaf.entry.event.document()
    document["payload"]["records_touched"] = 3_000_000
    edited = SignedEntry(event=LogEvent.model_validate(document), signature=leaf.entry.signature)
    conn.execute("UPDATE ledger_entries SET leaf = ? WHERE leaf_index = 1",
                 (encode_leaf(1, edited, leaf.integrated_ms),))
    tampered = bill()
    assert tampered.meters.queries == 0 and tampered.meters.records_touched == 0
    assert tampered.total_fen == honest.total_fen - 150 - 3 * 20
    assert [a.index for a in tampered.anomalies] == [1]
    assert "the meter's own signature" in tampered.anomalies[0].reason


def test_a_data_user_cannot_revoke_its_way_out_of_its_bill():
    """rev16 H2: insurer-a rotates, then revokes its old key from index 0 to make every
    meter it signed an anomaly. The log refuses the revocation, and a verifier given it
    anyway (spliced in by a colluding operator) still bills every meter."""
    from governance.ledger import rotation_entry
    from governance.ledger.errors import KeyEntryInvalid
    from governance.ledger.key_history import revocation_entry

    log = MerkleLog(sqlite3.connect(":memory:"), "operator", Ed25519PrivateKey.generate(),
                    {"regulator": KEY.public_key(), "insurer-a": INSURER_KEY.public_key()})
    at = _ms(2026, 11, 3)
    log.append([_event("contract_signed", "sign-1", _ms(2026, 10, 1), contract_id=CID)],
               timestamp_ms=_ms(2026, 10, 1))
    for i in range(5):
        log.append([_answered(f"q-{i}", at + i, records=1000)], timestamp_ms=at + i)
    before = _bill(_terms(), "2026-11", list(log.entries()))
    assert before.meters.queries == 5
    new_key, later = Ed25519PrivateKey.generate(), _ms(2026, 12, 2)
    rotation = log.append([rotation_entry("insurer-a", INSURER_KEY, new_key, "rot-1", later)],
                          timestamp_ms=later).first_index
    revocation = revocation_entry("insurer-a", new_key, INSURER_KEY.public_key(), 0, "rev-1",
                                  later + 1)
    with pytest.raises(KeyEntryInvalid, match="before the rotation entry"):
        log.append([revocation], timestamp_ms=later + 1)
    spliced = [*log.entries(), LogEntry(rotation + 1, revocation)]
    after = _bill(_terms(), "2026-11", spliced)
    assert after.meters == before.meters and after.total_fen == before.total_fen
    assert after.anomalies == ()


def test_a_garbage_rotation_leaves_a_data_users_meters_billable():
    """rev16 H3: one rotation "by" insurer-a made with two keys the operator holds, at the
    log's tail, does not re-root insurer-a's chain: its meters stay billable."""
    from governance.ledger import rotation_entry

    at = _ms(2026, 11, 3)
    entries = [LogEntry(i, _answered(f"q-{i}", at + i, records=100)) for i in range(3)]
    honest = _bill(_terms(), "2026-11", entries)
    garbage = rotation_entry("insurer-a", Ed25519PrivateKey.generate(),
                             Ed25519PrivateKey.generate(), "rot-x", at + 10)
    after = _bill(_terms(), "2026-11", [*entries, LogEntry(3, garbage)])
    assert after.meters.queries == honest.meters.queries == 3
    assert after.total_fen == honest.total_fen


def _package_run(run_id: str, request_id: str, at_ms: int, key: Ed25519PrivateKey):
    return sign_event(make_event("package_run", "health-authority", request_id, {
        "run_id": run_id, "package": "p", "version": "1", "package_sha256": "0" * 64,
        "party": "regulator", "library": "authorized", "contract_id": CID, "outcome": "ok",
        "accepted": True, "records_touched": 1000, "rows_returned": 5, "suppressed_groups": 0,
        "compute_ms": 100, "wall_ms": 100, "peak_memory_kib": 1, "output_sha256": "0" * 64},
        timestamp_ms=at_ms), key)


def test_package_runs_under_one_client_request_id_are_each_billed():
    """rev16 M3: the regulator (the package data user) sends every production run with the
    same X-Request-ID, so every `package_run` meter carries one request id: each run (its
    own run id, the data owner's nonce) is billed; a retried meter of one run is not."""
    owner = Ed25519PrivateKey.generate()
    terms = _terms(data_users=["regulator"], parties=["operator", "regulator", "health-authority"],
                   termination={"notice_days": 30, "may_terminate": ["regulator"]})
    keys = {**KEYS, "health-authority": owner.public_key()}
    at = _ms(2026, 11, 3)
    entries = [LogEntry(i, _package_run(f"{i:032x}", "same-header", at + i, owner))
               for i in range(10)]
    retried = LogEntry(10, _package_run(f"{9:032x}", "same-header", at + 20, owner))
    bill = statement(terms, "2026-11", [*entries, retried], "health-authority", keys)
    assert (bill.meters.queries, bill.meters.records_touched) == (10, 10_000)
    assert bill.anomalies == ()
    day = datetime.fromtimestamp(at / 1000, UTC).astimezone(terms.timezone).date()
    usage = usage_from_log([*entries, retried], terms, "regulator", day, "health-authority", keys)
    assert usage.queries == 10
