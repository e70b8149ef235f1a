"""The SQLite Merkle log: appends, proofs, offline verification and tampering."""

import sqlite3

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.ledger import (
    EntryInvalid,
    EntrySignatureInvalid,
    InclusionProof,
    InclusionProofInvalid,
    MerkleLog,
    PersonalDataInPayload,
    ProofUnavailable,
    UnknownActor,
    UnknownEventKind,
    check_inclusion_proof,
    decode_leaf,
    encode_leaf,
    make_event,
    register_event_kind,
    sha256_hex,
    sign_event,
    verify_log,
)
from governance.ledger import verify as verify_module
from governance.ledger.merkle import MemoryTree, leaf_hash, verify_consistency
from governance.ledger.signing import public_key_hex

T0 = 1_794_000_000_000  # 2026-11 in Unix ms


@pytest.fixture
def keys():
    return {name: Ed25519PrivateKey.generate() for name in ("operator", "hospital-1", "insurer-a")}


def _open(path, keys) -> MerkleLog:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    # The entries are dated 2026-11 (T0) and the log's clock reads T0 too; skew has its
    # own tests (tests/test_ledger_keys.py).
    return MerkleLog(
        conn, "operator", keys["operator"], {n: k.public_key() for n, k in keys.items()},
        max_skew_ms=10**15,
    )


def _entries(keys, count, start=0, actor="hospital-1"):
    return [
        sign_event(
            make_event(
                "query_answered",
                actor,
                f"req-{start + i}",
                {"contract_id": "contract-1", "rows_returned": 1, "doc": sha256_hex(str(i))},
                timestamp_ms=T0 + start + i,
            ),
            keys[actor],
        )
        for i in range(count)
    ]


def _public(keys):
    return {name: public_key_hex(key) for name, key in keys.items()}


@pytest.fixture
def log(tmp_path, keys):
    log = _open(tmp_path / "ledger.db", keys)
    for batch in range(4):
        log.append(_entries(keys, 5, start=batch * 5), timestamp_ms=T0 + batch * 5)
    return log


def test_append_batches_and_root_matches_an_in_memory_tree(log, keys):
    assert log.size == 20
    leaves = log.leaves()
    memory = MemoryTree(leaf_hash(x) for x in leaves)
    head = log.tree_head()
    assert head.tree_size == 20 and head.root_hash == memory.root().hex()
    assert head.signature_valid(keys["operator"].public_key())
    for index, data in enumerate(leaves):
        leaf = decode_leaf(data)
        assert leaf.index == index
        assert encode_leaf(index, leaf.entry, leaf.integrated_ms) == data
    for old in range(0, 21):
        assert log.root_at(old) == memory.root(old)
        assert log.consistency_proof(old) == memory.consistency_proof(old)
        for index in range(old):
            assert list(log.inclusion_proof(index, old).path) == memory.inclusion_proof(index, old)


def test_reopening_continues_the_same_tree(tmp_path, keys, log):
    before = log.tree_head()
    reopened = _open(tmp_path / "ledger.db", keys)
    assert reopened.size == 20
    result = reopened.append(_entries(keys, 3, start=20))
    assert result.first_index == 20
    after = reopened.tree_head()
    proof = reopened.consistency_proof(20, 23)
    assert verify_consistency(20, 23, before.root, after.root, proof)
    assert reopened.tree_heads()[-1] == after


def test_an_entry_appended_again_is_stored_once(log, keys):
    """A replayed entry, or a retry after the response was lost, adds nothing."""
    head = log.tree_head()
    last_batch = _entries(keys, 5, start=15)  # the fixture's last batch, resent
    again = log.append(last_batch)
    assert (again.count, again.duplicates) == (0, 5) and log.size == 20
    assert log.tree_head() == head
    mixed = log.append([last_batch[-1], *_entries(keys, 1, start=20)])  # one old, one new
    assert (mixed.count, mixed.duplicates, mixed.first_index) == (1, 1, 20)
    assert log.size == 21


def test_a_bad_batch_writes_nothing(log, keys):
    good = _entries(keys, 3, start=100)
    forged = good[1].model_copy(update={"signature": good[0].signature})
    with pytest.raises(EntrySignatureInvalid):
        log.append([good[0], forged, good[2]])
    stranger = Ed25519PrivateKey.generate()
    unknown = sign_event(
        make_event("query_answered", "mallory", "req-x", timestamp_ms=T0), stranger
    )
    with pytest.raises(UnknownActor):
        log.append([good[0], unknown])
    assert log.size == 20 and len(log.leaves()) == 20
    assert log.append(good).first_index == 20


PERSONAL_DATA = {
    "national id": {"subject": "32050219900101123X"},
    "embedded national id": {"subject": "P-320502199001011234"},
    "15-digit id": {"subject": "320502900101123"},
    "phone": {"contact": "13912345678"},
    "phone +86": {"contact": "+86-13912345678"},
    "phone as int": {"contact": 13912345678},
    "email": {"contact": "zhang.wei@example.com"},
    "chinese name": {"holder": "张伟"},
    "free text name": {"holder": "Zhang Wei"},
    "key names data": {"name": "x1"},
}


@pytest.mark.parametrize("payload", PERSONAL_DATA.values(), ids=PERSONAL_DATA.keys())
def test_personal_data_in_a_payload_is_refused(payload):
    with pytest.raises(PersonalDataInPayload):
        make_event("query_answered", "operator", "req-1", payload)


def test_event_validation():
    with pytest.raises(UnknownEventKind):
        make_event("query_answred", "operator", "req-1")
    register_event_kind("audit_exported")
    assert make_event("audit_exported", "operator", "req-1").kind == "audit_exported"
    ok = {
        "consent_id": "consent-7f3a",
        "rows": 3,
        "doc": sha256_hex("x"),
        "flag": True,
        "columns": ["visit_date", "amount_fen"],
    }
    assert make_event("query_answered", "operator", "req-1", ok).payload == ok
    with pytest.raises(EntryInvalid, match="payload"):
        make_event("query_answered", "operator", "req-1", {"ratio": 0.5})
    with pytest.raises(EntryInvalid, match="actor"):
        make_event("query_answered", "Bad Actor", "req-1")


def test_inclusion_proof_json_roundtrip_and_checks(log, keys):
    head = log.tree_head()
    operator_key = keys["operator"].public_key()
    for index in (0, 7, 19):
        text = log.inclusion_proof(index).to_json()
        assert check_inclusion_proof(text, head, operator_key, leaf=log.leaf(index)) == index
    text = log.inclusion_proof(7).to_json()
    with pytest.raises(InclusionProofInvalid, match="another entry"):
        check_inclusion_proof(text, head, operator_key, leaf=log.leaf(8))
    with pytest.raises(InclusionProofInvalid, match="not signed"):
        check_inclusion_proof(text, head, keys["hospital-1"].public_key())
    older = log.tree_heads()[0]
    with pytest.raises(InclusionProofInvalid, match="tree of 20"):
        check_inclusion_proof(text, older, operator_key)
    proof = InclusionProof.from_json(text)
    tampered = proof.model_copy(update={"leaf_index": 6}).to_json()
    with pytest.raises(InclusionProofInvalid, match="does not reach the root"):
        check_inclusion_proof(tampered, head, operator_key)
    with pytest.raises(InclusionProofInvalid, match="parse"):
        check_inclusion_proof("{not json", head, operator_key)
    with pytest.raises(ProofUnavailable):
        log.inclusion_proof(20)


def test_inclusion_proof_for_a_million_entries_fits_in_one_kibibyte():
    proof = InclusionProof(
        log_id="operator",
        leaf_index=999_999,
        tree_size=1_000_000,
        leaf_hash=b"\xff" * 32,
        path=tuple(b"\xff" * 32 for _ in range((1_000_000 - 1).bit_length())),
    )
    assert len(proof.to_json().encode()) <= 1024
    assert InclusionProof.from_json(proof.to_json()) == proof


def test_clean_log_verifies(log, keys):
    report = verify_log(
        log.leaves(), log.tree_head(), [], _public(keys), checkpoints=log.tree_heads()
    )
    assert report.ok, report.summary()
    assert report.entries == 20 and report.signatures_checked == 20


def _tamper(log: MerkleLog, sql: str, params=()) -> None:
    with log._conn:
        log._conn.execute(sql, params)


def test_changing_any_byte_of_a_stored_entry_is_found_at_that_entry(log, keys):
    original = log.leaf(7)
    head, public = log.tree_head(), _public(keys)
    # The integration time's digits are the log's, not the actor's: only the signed head
    # commits to them, so a change there is found by the root (and the clock's order).
    digits = original.rfind(b'"integrated_ms":') + len(b'"integrated_ms":')
    log_time = range(digits, original.rfind(b',"v":'))
    for position in range(len(original)):
        changed = bytearray(original)
        changed[position] ^= 0x01
        leaves = log.leaves()
        leaves[7] = bytes(changed)
        report = verify_log(leaves, head, [], public)
        assert not report.ok
        if position in log_time and changed[position] in b"0123456789":
            # still a number: the root catches it (a leading zero is not canonical too)
            assert report.bad_entries in ([], [7]), (position, report.summary())
            assert any("differs from the signed head" in p.what for p in report.problems)
        else:
            assert report.bad_entries == [7], (position, report.summary())
    _tamper(
        log,
        "UPDATE ledger_entries SET leaf = ? WHERE leaf_index = 7",
        (original.replace(b'"rows_returned":1', b'"rows_returned":9'),),
    )
    report = verify_log(log.leaves(), head, [], public)
    assert report.bad_entries == [7]
    assert "signature" in str(report.problems[0]) and "entry 7" in report.summary()
    assert any(p.where == "tree_head" for p in report.problems)


def test_deleting_an_entry_is_found_where_it_was(log, keys):
    _tamper(log, "DELETE FROM ledger_entries WHERE leaf_index = 7")
    report = verify_log(log.leaves(), log.tree_head(), [], _public(keys))
    assert report.bad_entries[0] == 7
    assert "missing" in str(report.problems[0])
    assert any("commits to 20 entries, 19 were given" in str(p) for p in report.problems)


def test_swapping_two_entries_names_both(log, keys):
    a, b = log.leaf(3), log.leaf(11)
    _tamper(log, "UPDATE ledger_entries SET leaf = ? WHERE leaf_index = 3", (b,))
    _tamper(log, "UPDATE ledger_entries SET leaf = ? WHERE leaf_index = 11", (a,))
    report = verify_log(log.leaves(), log.tree_head(), [], _public(keys))
    assert report.bad_entries == [3, 11]


def test_a_renumbered_rewrite_is_located_between_checkpoints(log, keys):
    # The operator drops entry 7 and re-encodes the rest with shifted indices: every
    # entry then looks fine on its own, only the signed heads give it away.
    decoded = [decode_leaf(x) for x in log.leaves()]
    leaves = [d.entry for d in decoded]
    times = [d.integrated_ms for d in decoded]  # each position keeps its integration time
    rewritten = [encode_leaf(i, e, times[i]) for i, e in enumerate(leaves[:7] + leaves[8:])]
    rewritten.append(encode_leaf(19, leaves[7], times[19]))
    report = verify_log(rewritten, log.tree_head(), [], _public(keys), checkpoints=log.tree_heads())
    assert not report.ok and report.bad_entries == []
    assert any("within entries [5, 10)" in str(p) for p in report.problems), report.summary()


def test_forged_tree_head_and_unknown_keys(log, keys):
    head = log.tree_head()
    forged = head.model_copy(update={"tree_size": 19})
    report = verify_log(log.leaves()[:19], forged, [], _public(keys))
    assert any(p.where == "tree_head" and "not signed" in p.what for p in report.problems)
    public = _public(keys)
    del public["hospital-1"]
    report = verify_log(log.leaves(), head, [], public)
    assert len(report.bad_entries) == 20 and "no known public key" in str(report.problems[0])


def test_parallel_verification_agrees_with_serial(log, keys, monkeypatch):
    leaves = log.leaves()
    leaves[4] = leaves[4].replace(b'"rows_returned":1', b'"rows_returned":2')
    monkeypatch.setattr(verify_module, "PARALLEL_THRESHOLD", 1)
    monkeypatch.setattr(verify_module, "_CHUNK", 6)
    parallel = verify_log(leaves, log.tree_head(), [], _public(keys), processes=2)
    serial = verify_log(leaves, log.tree_head(), [], _public(keys), processes=1)
    assert parallel.problems == serial.problems
    assert parallel.bad_entries == [4]


def test_entries_are_queryable_by_kind_and_time(log, keys):
    log.append(
        [
            sign_event(
                make_event(
                    "bill_issued", "operator", "bill-1", {"total_fen": 5}, timestamp_ms=T0 + 500
                ),
                keys["operator"],
            )
        ]
    )
    bills = list(log.entries(kind="bill_issued"))
    assert [b.index for b in bills] == [20]
    window = list(log.entries(kind="query_answered", since_ms=T0 + 5, until_ms=T0 + 10))
    assert [leaf.index for leaf in window] == [5, 6, 7, 8, 9]


def test_leaf_bytes_are_the_canonical_json_of_the_entry(log):
    from governance.ledger.events import ENTRY_DOMAIN
    from governance.ledger.signing import canonical_json, signing_message

    for index in (0, 13):
        leaf = decode_leaf(log.leaf(index))
        document = {"entry": leaf.entry.document(), "index": index,
                    "integrated_ms": leaf.integrated_ms, "v": 2}
        assert encode_leaf(index, leaf.entry, leaf.integrated_ms) == canonical_json(document)
        assert encode_leaf(index, leaf.entry, None) == canonical_json(  # format 1
            {"entry": leaf.entry.document(), "index": index})
        event = leaf.entry.event
        assert event.signing_message() == signing_message(ENTRY_DOMAIN, event.document())


def test_a_store_belongs_to_one_log(tmp_path, keys, log):
    conn = sqlite3.connect(tmp_path / "ledger.db")
    with pytest.raises(ValueError, match="holds log 'operator'"):
        MerkleLog(conn, "other-log", keys["operator"], {})


def test_the_log_revalidates_events_that_skipped_validation(log, keys):
    event = make_event("query_answered", "hospital-1", "req-z", {"rows": 1}, timestamp_ms=T0)
    sneaky = event.model_copy(update={"payload": {"holder": "13912345678"}})  # no validation
    with pytest.raises(PersonalDataInPayload):
        log.append([sign_event(sneaky, keys["hospital-1"])])
    assert log.size == 20
