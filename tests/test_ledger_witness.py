"""Witnesses countersign consistent heads and catch rewrites and split views."""

import sqlite3

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.ledger import (
    LogInconsistent,
    MerkleLog,
    ProofUnavailable,
    StaleTreeHead,
    TreeHeadInvalid,
    Witness,
    make_event,
    sign_event,
    verify_log,
)
from governance.ledger.signing import public_key_hex
from governance.ledger.tree_head import sign_tree_head

T0 = 1_794_000_000_000


@pytest.fixture
def keys():
    names = ("operator", "hospital-1", "regulator", "health-authority")
    return {name: Ed25519PrivateKey.generate() for name in names}


def _log(path, keys) -> MerkleLog:
    return MerkleLog(
        sqlite3.connect(path),
        "operator",
        keys["operator"],
        {"hospital-1": keys["hospital-1"].public_key()},
    )


def _append(log, keys, start, count, marker="a"):
    entries = [
        sign_event(
            make_event(
                "data_registered",
                "hospital-1",
                f"req-{marker}-{i}",
                {"dataset": f"d{i}"},
                timestamp_ms=T0 + i,
            ),
            keys["hospital-1"],
        )
        for i in range(start, start + count)
    ]
    return log.append(entries, timestamp_ms=T0 + start + count).tree_head


def _witness(path, keys, name="regulator") -> Witness:
    return Witness(
        sqlite3.connect(path), name, keys[name], {"operator": keys["operator"].public_key()}
    )


def test_consistent_heads_are_cosigned_and_remembered(tmp_path, keys):
    log, witness = _log(tmp_path / "log.db", keys), _witness(tmp_path / "w.db", keys)
    first = _append(log, keys, 0, 5)
    cosig1 = witness.cosign(first)
    assert cosig1.covers(first) and cosig1.signature_valid(keys["regulator"].public_key())
    second = _append(log, keys, 5, 7)
    cosig2 = witness.cosign(second, log.consistency_proof(5, 12))
    assert witness.cosign(second, log.consistency_proof(5, 12)) == cosig2  # idempotent
    assert witness.latest("operator") == second
    # The memory survives a restart of the witness.
    assert _witness(tmp_path / "w.db", keys).latest("operator") == second
    other = _witness(tmp_path / "w2.db", keys, "health-authority")
    cosig3 = other.cosign(second)
    public = {name: public_key_hex(key) for name, key in keys.items()}
    report = verify_log(
        log.leaves(),
        second,
        [cosig2, cosig3],
        public,
        required_witnesses=["regulator", "health-authority"],
    )
    assert report.ok and report.witnesses_valid == ["health-authority", "regulator"]
    report = verify_log(log.leaves(), second, [cosig1], public, required_witnesses=["regulator"])
    assert not report.ok
    assert {p.where for p in report.problems} == {"witness"}


def test_a_rewritten_history_is_refused_and_recorded(tmp_path, keys):
    honest, witness = _log(tmp_path / "log.db", keys), _witness(tmp_path / "w.db", keys)
    witness.cosign(_append(honest, keys, 0, 8))
    # The operator keeps a second, rewritten copy (same key) and tries to move on from it.
    forked = _log(tmp_path / "fork.db", keys)
    _append(forked, keys, 0, 8, marker="b")
    fork_head = _append(forked, keys, 8, 4, marker="b")
    with pytest.raises(LogInconsistent, match="rewritten or forked"):
        witness.cosign(fork_head, forked.consistency_proof(8, 12))
    incidents = witness.incidents("operator")
    assert len(incidents) == 1
    assert incidents[0]["evidence"]["shown"]["root_hash"] == fork_head.root_hash
    assert witness.latest("operator").tree_size == 8  # the bad head was not accepted


def test_a_split_view_at_the_same_size_is_caught(tmp_path, keys):
    honest, witness = _log(tmp_path / "log.db", keys), _witness(tmp_path / "w.db", keys)
    head = _append(honest, keys, 0, 6)
    witness.cosign(head)
    forked = _log(tmp_path / "fork.db", keys)
    other = _append(forked, keys, 0, 6, marker="b")
    with pytest.raises(LogInconsistent, match="two roots for one tree size"):
        witness.cosign(other)
    assert witness.incidents()[0]["reason"] == "two roots for one tree size"


def test_stale_forged_and_backdated_heads(tmp_path, keys):
    log, witness = _log(tmp_path / "log.db", keys), _witness(tmp_path / "w.db", keys)
    old = _append(log, keys, 0, 4)
    new = _append(log, keys, 4, 4)
    witness.cosign(new)
    with pytest.raises(StaleTreeHead):
        witness.cosign(old, log.consistency_proof(4, 8))  # a prefix of what it witnessed
    forged = new.model_copy(update={"tree_size": 9})
    with pytest.raises(TreeHeadInvalid):
        witness.cosign(forged)
    _append(log, keys, 8, 1)
    with pytest.raises(TreeHeadInvalid, match="proof from size 8 to 9 is required"):
        witness.cosign(log.tree_head())  # no proof given: refused, but no incident
    backdated = log.sign_tree_head(timestamp_ms=T0)
    with pytest.raises(LogInconsistent, match="backwards"):
        witness.cosign(backdated, log.consistency_proof(8, 9))
    assert len(witness.incidents()) == 1


def test_a_smaller_forked_head_is_an_incident_not_a_stale_one(tmp_path, keys):
    """The log shows a shrunken head of another history: without a proof that it is a
    prefix of what was witnessed, it is recorded as a fork, not waved off as stale."""
    honest, witness = _log(tmp_path / "log.db", keys), _witness(tmp_path / "w.db", keys)
    witness.cosign(_append(honest, keys, 0, 8))
    forked = _log(tmp_path / "fork.db", keys)
    shrunk = _append(forked, keys, 0, 4, marker="b")
    for proof in ([], honest.consistency_proof(4, 8)):  # none, or the honest log's own
        with pytest.raises(LogInconsistent, match="not a prefix"):
            witness.cosign(shrunk, proof)
    (incident,) = witness.incidents()
    assert incident["evidence"]["shown"]["root_hash"] == shrunk.root_hash
    assert witness.latest("operator").tree_size == 8


def test_a_far_future_head_is_refused_and_blocks_no_honest_head(tmp_path, keys):
    log, witness = _log(tmp_path / "log.db", keys), _witness(tmp_path / "w.db", keys)
    now = T0 + 1_000
    witness.cosign(_append(log, keys, 0, 3), now_ms=now)
    _append(log, keys, 3, 2)
    future = log.sign_tree_head(timestamp_ms=now + 365 * 86_400_000)
    with pytest.raises(LogInconsistent, match="ahead of the witness's clock"):
        witness.cosign(future, log.consistency_proof(3, 5), now_ms=now)
    assert witness.latest("operator").tree_size == 3  # not remembered
    honest = log.sign_tree_head(timestamp_ms=now + 10)
    assert witness.cosign(honest, log.consistency_proof(3, 5), now_ms=now + 20).covers(honest)
    assert [i["reason"] for i in witness.incidents()] == [
        "tree head timestamp is ahead of the witness's clock"]


def test_the_same_incident_is_counted_once_and_stays_open_until_cleared(tmp_path, keys):
    honest, witness = _log(tmp_path / "log.db", keys), _witness(tmp_path / "w.db", keys)
    witness.cosign(_append(honest, keys, 0, 6))
    other = _append(_log(tmp_path / "fork.db", keys), keys, 0, 6, marker="b")
    for _ in range(5):  # the loop polls every 2 s: five polls, one incident
        with pytest.raises(LogInconsistent):
            witness.cosign(other)
    (incident,) = witness.incidents(open_only=True)
    assert incident["seen"] == 5 and incident["last_seen_ms"] >= incident["detected_at_ms"]
    assert witness.clear_incidents() == 1
    assert witness.incidents(open_only=True) == [] and len(witness.incidents()) == 1
    with pytest.raises(LogInconsistent):  # shown again after clearing: open again
        witness.cosign(other)
    (again,) = witness.incidents(open_only=True)
    assert again["incident_id"] == incident["incident_id"] and again["seen"] == 6


def test_gossip_between_witnesses_catches_a_split_view_each_check_alone_missed(tmp_path, keys):
    honest, forked = _log(tmp_path / "log.db", keys), _log(tmp_path / "fork.db", keys)
    regulator = _witness(tmp_path / "r.db", keys, "regulator")
    authority = _witness(tmp_path / "a.db", keys, "health-authority")
    shared = _append(honest, keys, 0, 5)
    _append(forked, keys, 0, 5)
    assert forked.tree_head().root_hash == shared.root_hash
    regulator.cosign(shared)
    authority.cosign(shared)
    # The log now shows each witness its own, internally consistent, continuation.
    to_regulator = _append(honest, keys, 5, 3)
    to_authority = _append(forked, keys, 5, 4, marker="b")
    regulator.cosign(to_regulator, honest.consistency_proof(5, 8))
    authority.cosign(to_authority, forked.consistency_proof(5, 9))
    assert not regulator.incidents() and not authority.incidents()

    shown = authority.witnessed("operator")
    assert shown is not None and shown.head == to_authority
    # Whichever copy the log proves from, the two heads are not one history.
    for log in (honest, forked):
        with pytest.raises(LogInconsistent, match="not one history"):
            regulator.compare_with_peer("health-authority", keys["health-authority"].public_key(),
                                        shown, lambda a, b, log=log: log.consistency_proof(a, min(
                                            b, log.tree_head().tree_size)))
    incident = regulator.incidents()[-1]
    assert incident["evidence"]["shown"]["root_hash"] == to_authority.root_hash
    assert incident["evidence"]["peer_cosignature"]["witness"] == "health-authority"
    # Equal sizes, two roots: caught without any proof.
    same_size = _append(honest, keys, 8, 1)
    regulator.cosign(same_size, honest.consistency_proof(8, 9))
    with pytest.raises(LogInconsistent, match="another root"):
        regulator.compare_with_peer("health-authority", keys["health-authority"].public_key(),
                                    shown, lambda a, b: [])
    # the two proofs of one split view are one incident, seen twice
    assert [i["seen"] for i in regulator.incidents()] == [2, 1]


def test_gossip_between_honest_witnesses_passes_and_forged_views_are_refused(tmp_path, keys):
    log = _log(tmp_path / "log.db", keys)
    regulator = _witness(tmp_path / "r.db", keys, "regulator")
    authority = _witness(tmp_path / "a.db", keys, "health-authority")
    assert regulator.witnessed("operator") is None
    regulator.cosign(_append(log, keys, 0, 4))
    authority.cosign(log.tree_head())
    regulator.cosign(_append(log, keys, 4, 6), log.consistency_proof(4, 10))
    peer_key = keys["health-authority"].public_key()
    shown = authority.witnessed("operator")
    asked = []

    def proof(first, second):
        asked.append((first, second))
        return log.consistency_proof(first, second)

    regulator.compare_with_peer("health-authority", peer_key, shown, proof)  # older, consistent
    assert asked == [(4, 10)]
    mine = regulator.witnessed("operator")
    authority.compare_with_peer("regulator", keys["regulator"].public_key(), mine, proof)
    assert not regulator.incidents() and not authority.incidents()
    # A cosignature by someone else, or for another head, is refused and is no incident.
    with pytest.raises(TreeHeadInvalid):
        regulator.compare_with_peer("health-authority", keys["regulator"].public_key(), shown,
                                    proof)
    with pytest.raises(TreeHeadInvalid):
        regulator.compare_with_peer("health-authority", peer_key, shown.model_copy(
            update={"head": log.tree_head()}), proof)
    assert not regulator.incidents()


def _split_view(tmp_path, keys):
    """The log shows each witness its own continuation of a cosigned prefix of size 5, at
    different sizes (10 and 12), so no size has two roots."""
    honest, forked = _log(tmp_path / "log.db", keys), _log(tmp_path / "fork.db", keys)
    regulator = _witness(tmp_path / "r.db", keys, "regulator")
    authority = _witness(tmp_path / "a.db", keys, "health-authority")
    shared = _append(honest, keys, 0, 5)
    _append(forked, keys, 0, 5)
    regulator.cosign(shared)
    authority.cosign(shared)
    regulator.cosign(_append(honest, keys, 5, 5), honest.consistency_proof(5, 10))
    authority.cosign(_append(forked, keys, 5, 7, marker="b"), forked.consistency_proof(5, 12))
    return regulator, authority


def test_a_log_that_refuses_the_cross_fork_proof_is_an_incident(tmp_path, keys):
    """Shown a split view, the log answers the gossip's proof request with an error instead
    of a proof it cannot make: that refusal is the incident, not a failed round."""
    regulator, authority = _split_view(tmp_path, keys)

    def refuse(first, second):
        raise ProofUnavailable("the log answered 503")

    with pytest.raises(LogInconsistent, match="will not prove"):
        regulator.compare_with_peer("health-authority", keys["health-authority"].public_key(),
                                    authority.witnessed("operator"), refuse)
    assert [i["reason"] for i in regulator.incidents(open_only=True)] == [
        "the log will not prove health-authority's head and this one's"]


def test_a_larger_head_the_log_will_not_prove_is_an_incident(tmp_path, keys):
    log, witness = _log(tmp_path / "log.db", keys), _witness(tmp_path / "w.db", keys)
    witness.cosign(_append(log, keys, 0, 4))
    forked = _log(tmp_path / "fork.db", keys)
    _append(forked, keys, 0, 4, marker="b")
    unproven = _append(forked, keys, 4, 3, marker="b")
    with pytest.raises(LogInconsistent, match="will not prove its head"):
        witness.refuse_unproven(unproven)
    (incident,) = witness.incidents(open_only=True)
    assert incident["evidence"]["shown"]["root_hash"] == unproven.root_hash
    assert witness.latest("operator").tree_size == 4


def test_a_freshly_signed_smaller_head_is_a_rollback_not_a_stale_head(tmp_path, keys):
    """The log rolls back to a real prefix and signs it anew: the proof holds, but a head
    signed after a larger one is proof the log shrank. An old head shown late stays stale."""
    log, witness = _log(tmp_path / "log.db", keys), _witness(tmp_path / "w.db", keys)
    old = _append(log, keys, 0, 5)
    witness.cosign(_append(log, keys, 5, 5), now_ms=T0 + 100)
    with pytest.raises(StaleTreeHead):
        witness.cosign(old, log.consistency_proof(5, 10), now_ms=T0 + 100)
    # same size and root, re-signed later with the log's key
    rolled_back = sign_tree_head("operator", 5, old.root, T0 + 50, keys["operator"])
    with pytest.raises(LogInconsistent, match="smaller head after a larger one"):
        witness.cosign(rolled_back, log.consistency_proof(5, 10), now_ms=T0 + 100)


def test_far_future_heads_signed_at_new_times_are_one_incident(tmp_path, keys):
    log, witness = _log(tmp_path / "log.db", keys), _witness(tmp_path / "w.db", keys)
    now = T0 + 1_000
    witness.cosign(_append(log, keys, 0, 3), now_ms=now)
    _append(log, keys, 3, 2)
    for i in range(5):  # a new timestamp each poll: one distinct head, one incident
        future = log.sign_tree_head(timestamp_ms=now + 86_400_000 + i)
        with pytest.raises(LogInconsistent):
            witness.cosign(future, log.consistency_proof(3, 5), now_ms=now)
    (incident,) = witness.incidents()
    assert incident["seen"] == 5
