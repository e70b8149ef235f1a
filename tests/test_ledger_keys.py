"""Node signing keys with a history, and the log's own time: attacks on a real SQLite log.

The adversaries: a node (or a thief) holding a rotated-out or revoked key, a rotation
forged without the old key, the operator splicing entries into its own log, and a node
that back- or forward-dates its entries.
"""

import hashlib
import json
import sqlite3
import time
from pathlib import Path

import nacl.signing
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.ledger import (
    EntrySignatureInvalid,
    MerkleLog,
    decode_leaf,
    encode_leaf,
    make_event,
    sign_event,
    validate_event,
    verify_log,
)
from governance.ledger.errors import KeyEntryInvalid, TimestampSkewed
from governance.ledger.key_history import (
    SIGNING_KEY_ROTATED,
    revocation_entry,
    rotation_entry,
)
from governance.ledger.merkle import CompactRange, leaf_hash
from governance.ledger.signing import private_key_from_hex, public_key_hex
from governance.ledger.tree_head import sign_tree_head
from parties.ledger import operator_log
from parties.runtime import pki
from parties.runtime.state import StateDir
from tests.federation import write_topology

T0 = 1_794_000_000_000


class World:
    """A log at the operator, the certified keys of the federation, and a node's keys."""

    def __init__(self, path) -> None:
        self.operator = Ed25519PrivateKey.generate()
        self.old = Ed25519PrivateKey.generate()  # health-authority's first key
        self.new = Ed25519PrivateKey.generate()  # its key after the rotation
        self.certified = {"operator": self.operator.public_key(),
                          "health-authority": self.old.public_key()}
        self.path = path
        self.log = self.open(self.certified)
        self.clock = T0
        self.counter = 0

    def open(self, certified) -> MerkleLog:
        return MerkleLog(sqlite3.connect(self.path), "operator", self.operator, certified)

    def entry(self, key, *, at: int | None = None):
        self.counter += 1
        event = make_event("data_registered", "health-authority", f"req-{self.counter}",
                           {"dataset": f"d{self.counter}"},
                           timestamp_ms=self.clock if at is None else at)
        return sign_event(event, key)

    def append(self, *entries):
        self.clock += 1000
        return self.log.append(list(entries), timestamp_ms=self.clock)

    def public(self, **certified) -> dict[str, str]:
        keys = {name: public_key_hex(k) for name, k in self.certified.items()}
        return {**keys, **{n.replace("_", "-"): public_key_hex(k) for n, k in certified.items()}}

    def verify(self, leaves=None, **certified):
        leaves = self.log.leaves() if leaves is None else leaves
        return verify_log(leaves, self.log.tree_head(), [], self.public(**certified))


@pytest.fixture
def world(tmp_path) -> World:
    w = World(tmp_path / "ledger.db")
    w.append(w.entry(w.old), w.entry(w.old))  # 0, 1
    return w


def _rotate(w: World) -> int:
    rotation = rotation_entry("health-authority", w.old, w.new, "rotate-1", w.clock + 1000)
    return w.append(rotation).first_index


def _forged_log(w: World, leaves: list[bytes]):
    """The operator rebuilds its log around `leaves` and signs a head over them."""
    compact = CompactRange()
    for data in leaves:
        compact.append(leaf_hash(data))
    return sign_tree_head("operator", len(leaves), compact.root(), w.clock, w.operator)


def test_history_verifies_across_a_rotation_with_only_public_material(world):
    index = _rotate(world)
    assert index == 2
    world.append(world.entry(world.new), world.entry(world.new))  # 3, 4
    # A verifier that knows the first certificate, or the renewed one carrying the new key,
    # follows the chain through the rotation entry both ways.
    for certified in (world.old, world.new):
        report = world.verify(health_authority=certified)
        assert report.ok, report.summary()
    history = world.log.key_history
    assert history.key_at("health-authority", 2) == bytes.fromhex(public_key_hex(world.old))
    assert history.key_at("health-authority", 3) == bytes.fromhex(public_key_hex(world.new))
    # The log, reopened with the renewed certificate, keeps accepting the new key.
    reopened = world.open({**world.certified, "health-authority": world.new.public_key()})
    world.log = reopened
    assert world.append(world.entry(world.new)).first_index == 5


def test_a_rotation_without_the_old_keys_signature_is_refused(world):
    thief = Ed25519PrivateKey.generate()
    # signed by the key it introduces, not by the current one
    self_signed = rotation_entry("health-authority", thief, thief, "rotate-x", world.clock)
    claimed = self_signed.event.model_copy(update={"payload": {
        **self_signed.event.payload, "old_key": public_key_hex(world.old)}})
    with pytest.raises(KeyEntryInvalid, match="not signed by"):
        world.append(sign_event(claimed, thief))
    # signed by the old key, but the new key never agreed to it
    honest = rotation_entry("health-authority", world.old, world.new, "rotate-y", world.clock)
    lied = honest.event.model_copy(update={"payload": {
        **honest.event.payload, "new_key": public_key_hex(thief)}})
    with pytest.raises(KeyEntryInvalid, match="new key did not sign"):
        world.append(sign_event(lied, world.old))
    assert world.log.size == 2
    # The operator splices the forged rotation into its own log anyway: verifiers refuse it,
    # and the thief's later entries with it.
    forged = sign_event(claimed, thief)
    leaves = world.log.leaves()
    leaves.append(encode_leaf(2, forged, world.clock))
    leaves.append(encode_leaf(3, world.entry(thief), world.clock))
    report = verify_log(leaves, _forged_log(world, leaves), [], world.public())
    assert report.bad_entries == [2, 3], report.summary()
    assert "key entry refused" in str(report.problems[0])


def test_a_rotated_out_key_signs_nothing_after_its_end(world):
    index = _rotate(world)
    stale = world.entry(world.old)
    with pytest.raises(EntrySignatureInvalid, match="current key"):
        world.append(stale)
    # The operator, colluding with whoever holds the old key, writes it in place anyway.
    leaves = world.log.leaves()
    leaves.append(encode_leaf(index + 1, stale, world.clock))
    report = verify_log(leaves, _forged_log(world, leaves), [], world.public())
    assert report.bad_entries == [index + 1]
    assert "outside its validity" in str(report.problems[0])


def test_a_revocation_bounds_a_compromised_keys_entries(world):
    """The old key leaked: after rotating, the node revokes it from its rotation on, and an
    entry signed with it after that (a thief's, spliced in by the operator) is reported."""
    index = _rotate(world)
    world.append(revocation_entry("health-authority", world.new, world.old.public_key(),
                                  index, "revoke-1", world.clock + 1000))
    stale = world.entry(world.old)
    leaves = world.log.leaves()
    leaves.append(encode_leaf(len(leaves), stale, world.clock))
    report = verify_log(leaves, _forged_log(world, leaves), [], world.public())
    assert report.bad_entries == [len(leaves) - 1], report.summary()
    assert "outside its validity" in str(report.problems[0])
    # a node cannot revoke its current key (it would lose the log), nor a stranger's key
    with pytest.raises(KeyEntryInvalid, match="earlier key"):
        world.append(revocation_entry("health-authority", world.new, world.new.public_key(),
                                      0, "revoke-2", world.clock))


@pytest.mark.parametrize("invalid_from", [0, 1])
def test_a_revocation_cannot_void_entries_made_while_the_key_was_current(world, invalid_from):
    """rev16 H2: the node (or a thief with its current key) rotates, then revokes the old key
    from before the rotation, to erase entries (its meters) the old key signed while
    current. Refused; the operator splicing it in anyway changes no earlier verdict."""
    index = _rotate(world)
    reaching_back = revocation_entry("health-authority", world.new, world.old.public_key(),
                                     invalid_from, "revoke-1", world.clock + 1000)
    with pytest.raises(KeyEntryInvalid, match="before the rotation entry"):
        world.append(reaching_back)
    assert world.log.size == index + 1
    leaves = world.log.leaves()
    leaves.append(encode_leaf(len(leaves), reaching_back, world.clock))
    report = verify_log(leaves, _forged_log(world, leaves), [], world.public())
    assert report.bad_entries == [len(leaves) - 1], report.summary()
    assert "before the rotation entry" in str(report.problems[0])


def test_a_garbage_rotation_never_re_roots_a_nodes_chain(world):
    """rev16 H3: the operator (its log code modified to skip the key check) appends one
    rotation "by" health-authority made with two keys of its own. It is reported; every
    earlier entry still verifies, and after a restart the node's real key still appends."""
    mine, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    garbage = rotation_entry("health-authority", mine, other, "rotate-x", world.clock)
    leaves = world.log.leaves()
    leaves.append(encode_leaf(len(leaves), garbage, world.clock))
    report = verify_log(leaves, _forged_log(world, leaves), [], world.public())
    assert report.bad_entries == [2], report.summary()
    assert "key entry refused" in str(report.problems[0])
    # written into the store, then the log restarts from it
    skip_check = MerkleLog._admit
    try:
        MerkleLog._admit = lambda *args, **kwargs: None
        world.append(garbage)
    finally:
        MerkleLog._admit = skip_check
    world.log = world.open(world.certified)
    assert 2 in world.log.key_history.refused
    assert world.append(world.entry(world.old)).first_index == 3
    assert world.verify().bad_entries == [2]


def test_a_retry_of_a_stored_entry_after_the_skew_bound_is_a_duplicate(world):
    """rev16 L2: a stored entry retried (lost response) beyond the skew bound is skipped,
    not refused `TimestampSkewed` (which had the deferred queue re-sign and store it twice)."""
    entry = world.entry(world.old)
    world.append(entry)
    world.clock += 10 * 60_000
    result = world.append(entry)
    assert (result.count, result.duplicates) == (0, 1)
    assert world.log.size == 3


def test_reissuing_a_certificate_with_a_fresh_key_breaks_the_chain_visibly(world):
    """`pki issue` on a node already in the log (not a renewal, not a rotation): the
    verifier refuses every entry of the node rather than trust an unlinked key."""
    stranger = Ed25519PrivateKey.generate()
    report = world.verify(health_authority=stranger)
    assert report.bad_entries == [0, 1]
    assert "does not verify" in str(report.problems[0])


@pytest.mark.parametrize("offset_s", [-301, 301, -86_400, 365 * 86_400])
def test_back_or_forward_dated_entries_are_refused(world, offset_s):
    before = world.log.leaves()
    dated = world.entry(world.old, at=world.clock + 1000 + offset_s * 1000)
    with pytest.raises(TimestampSkewed):
        world.append(dated)
    assert world.log.leaves() == before
    # within the bound the entry is taken, dated by the log
    near = world.entry(world.old, at=world.clock + 1000 + (299 if offset_s > 0 else -299) * 1000)
    index = world.append(near).first_index
    integrated = decode_leaf(world.log.leaf(index)).integrated_ms
    assert integrated == world.clock and integrated != near.event.timestamp_ms


def test_the_logs_clock_never_runs_backwards(world):
    world.log.append([world.entry(world.old, at=T0)], timestamp_ms=T0)  # behind the last batch
    times = [decode_leaf(x).integrated_ms for x in world.log.leaves()]
    assert times == sorted(times) and times[-1] == T0 + 1000
    # an operator that rewrites one integration time backwards is caught in order, and by
    # the root its head signed
    leaves = world.log.leaves()
    entry = decode_leaf(leaves[1])
    leaves[1] = encode_leaf(1, entry.entry, T0 - 10_000)
    report = verify_log(leaves, _forged_log(world, leaves), [], world.public())
    assert any(p.where == "time" and p.index == 1 for p in report.problems), report.summary()


def test_the_skew_bound_is_configured_by_environment(monkeypatch):
    monkeypatch.setenv(operator_log.MAX_SKEW_ENV, "30")
    assert operator_log.max_skew_ms() == 30_000
    monkeypatch.delenv(operator_log.MAX_SKEW_ENV)
    assert operator_log.max_skew_ms() == 300_000


def test_renewing_a_certificate_keeps_the_signing_key(tmp_path):
    """`cogov pki renew`'s path: a new TLS key and certificate, the same signing key, so
    every entry the node signed before stays verifiable from the new certificate."""
    state = StateDir(tmp_path / "state")
    topology_path = write_topology(tmp_path, ["operator", "health-authority"])
    from parties.runtime.topology import load_topology

    topology = load_topology(topology_path)
    pki.init_federation(state, topology)
    names = [n.name for n in topology.nodes]
    before = pki.federation_signing_keys(state, names)
    tls_before = state.node("health-authority").key.read_bytes()
    pki.issue_node_certificate(state, "health-authority", "127.0.0.1",
                               signing_key=pki.load_signing_key(state, "health-authority"))
    assert pki.federation_signing_keys(state, names) == before
    assert state.node("health-authority").key.read_bytes() != tls_before
    assert SIGNING_KEY_ROTATED == "signing_key_rotated"


VECTORS = json.loads((Path(__file__).parent / "vectors" / "ledger_entry_v2.json").read_text())


def test_entry_and_rotation_vectors_reproduce():
    old = private_key_from_hex(VECTORS["old_seed"])
    new = private_key_from_hex(VECTORS["new_seed"])
    assert public_key_hex(old) == VECTORS["old_public_key"]
    vector = VECTORS["entry"]
    entry = sign_event(validate_event(vector["event"]), old)
    assert entry.signature == vector["signature"]
    leaf = encode_leaf(vector["index"], entry, vector["integrated_ms"])
    assert leaf.decode() == vector["leaf"] and leaf_hash(leaf).hex() == vector["leaf_hash"]
    assert encode_leaf(vector["index"], entry, None).decode() == VECTORS["format_1_leaf"]
    rotation = VECTORS["rotation"]
    made = rotation_entry("health-authority", old, new, rotation["event"]["request_id"],
                          rotation["event"]["timestamp_ms"])
    assert made.event.document() == rotation["event"] and made.signature == rotation["signature"]
    assert encode_leaf(rotation["index"], made, rotation["integrated_ms"]).decode() == \
        rotation["leaf"]


def test_vectors_check_with_an_independent_reader():
    """Parse the leaves with json and check them with hashlib and libsodium only: the
    leaf layout, the RFC 6962 leaf hash, and both signatures of the rotation."""
    for name in ("entry", "rotation"):
        vector = VECTORS[name]
        leaf = vector["leaf"].encode()
        document = json.loads(leaf)
        assert list(document) == ["entry", "index", "integrated_ms", "v"]
        assert document["v"] == 2 and document["index"] == vector["index"]
        assert hashlib.sha256(b"\x00" + leaf).hexdigest() == vector["leaf_hash"]
        event = json.dumps(document["entry"]["event"], sort_keys=True, separators=(",", ":"))
        message = VECTORS["entry_domain"].encode() + b"\x00" + event.encode()
        nacl.signing.VerifyKey(bytes.fromhex(VECTORS["old_public_key"])).verify(
            message, bytes.fromhex(document["entry"]["signature"]))
    payload = json.loads(VECTORS["rotation"]["leaf"])["entry"]["event"]["payload"]
    statement = json.dumps({"actor": "health-authority", "old_key": payload["old_key"],
                            "new_key": payload["new_key"],
                            "request_id": VECTORS["rotation"]["event"]["request_id"]},
                           sort_keys=True, separators=(",", ":")).encode()
    message = VECTORS["rotation_domain"].encode() + b"\x00" + statement
    assert message.hex() == VECTORS["rotation"]["statement_message_hex"]
    nacl.signing.VerifyKey(bytes.fromhex(VECTORS["new_public_key"])).verify(
        message, bytes.fromhex(payload["new_key_signature"]))


def test_an_entry_kept_through_a_long_outage_is_redated_not_lost(tmp_path):
    """The log was away longer than its skew bound: the kept entry is refused as dated, then
    signed again with its original time in the payload, and appended once."""
    from governance.migrations import apply_migrations
    from parties.ledger.deferred import COMPONENT, MIGRATIONS, complete_deferred, defer
    from parties.ledger.operator_log import operator_log
    from parties.node import open_node
    from parties.runtime.topology import load_topology

    state = StateDir(tmp_path / "state")
    topology = load_topology(write_topology(tmp_path, ["operator", "health-authority"]))
    pki.init_federation(state, topology)
    ctx = open_node(state, topology, "operator")
    apply_migrations(ctx.store.conn, COMPONENT, MIGRATIONS)  # as a serving node has them
    old = int(time.time() * 1000) - 3_600_000  # an hour ago
    kept = sign_event(make_event("query_refused", "operator", "rq-kept", {"reason": "x"},
                                 timestamp_ms=old), ctx.signing_key)
    defer(ctx, kept, "NodeUnavailable")
    done = complete_deferred(ctx)
    assert (done.appended, done.pending) == (1, 0)
    log = operator_log(ctx).log
    (logged,) = list(log.entries(kind="query_refused"))
    assert logged.entry.event.payload["deferred_from_ms"] == old
    assert logged.entry.signature != kept.signature
    assert abs(logged.entry.event.timestamp_ms - logged.integrated_ms) < log.max_skew_ms


def test_one_early_clock_reading_neither_advances_past_wall_time_nor_freezes_the_log(world):
    """rev16 L1: a batch dated an hour ahead of wall time is refused (the log's clock does
    not advance past now + skew); a batch once dated ahead (a clock stepped back since)
    refuses no honest entry made after it."""
    wall = time.time_ns() // 1_000_000
    before = world.log.leaves()
    with pytest.raises(TimestampSkewed, match="ahead of wall time"):
        world.log.append([world.entry(world.old, at=wall + 3_600_000)],
                         timestamp_ms=wall + 3_600_000)
    assert world.log.leaves() == before
    world.log.append([world.entry(world.old, at=world.clock + 3_600_000)],
                     timestamp_ms=world.clock + 3_600_000)  # ahead of the next reading
    honest = world.entry(world.old, at=world.clock + 60_000)
    index = world.log.append([honest], timestamp_ms=world.clock + 60_000).first_index
    assert decode_leaf(world.log.leaf(index)).integrated_ms == world.clock + 3_600_000
