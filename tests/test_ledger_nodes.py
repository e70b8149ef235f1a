"""The log through real nodes: entries from several nodes, witnesses, offline checks."""

import json
import sqlite3
import time

import pytest
from typer.testing import CliRunner

from governance.ledger import make_event, public_key_hex, sign_event
from governance.ledger.checkpoint import cosign_line
from parties.ledger.api import (
    APPEND_ENTRIES,
    CHECKPOINT,
    GOSSIP,
    POLL,
    WITNESSED_HEAD,
    EntryBatch,
    LogAlreadyStarted,
)
from parties.ledger.client import append_entry, signed_entry
from parties.ledger.first_checkpoint import pin_first_checkpoint
from parties.ledger.pin import load_pin
from parties.node import open_node
from parties.runtime.client import NodeClient
from parties.runtime.errors import RemoteError
from parties.runtime.pki import federation_signing_keys
from parties.runtime.routes import Kind
from scenarios.cli import app
from tests.federation import Federation

runner = CliRunner()


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    fed = Federation(
        tmp_path_factory.mktemp("ledger"),
        nodes=["health-authority", "operator", "regulator", "insurer-a"],
    )
    pin_first_checkpoint(open_node(fed.state, fed.topology, "operator"))  # as `pki init`
    fed.up()
    ha = open_node(fed.state, fed.topology, "health-authority")
    regulator = open_node(fed.state, fed.topology, "regulator")
    for i in range(5):
        append_entry(ha, "data_registered", {"dataset": f"visits-{i}", "rows": 100 + i})
    append_entry(regulator, "contract_signed", {"contract_id": "c-1"})
    yield fed
    fed.down()


def _cli(fed: Federation, *args: str):
    return runner.invoke(
        app, [*args, "--state", str(fed.state.root), "--topology", str(fed.topology_path)]
    )


def test_verify_checks_entries_head_and_witnesses(logged):
    result = _cli(logged, "ledger", "verify")
    assert result.exit_code == 0, result.output
    assert "log verified: 7 entries" in result.output  # log_started, then six
    assert "health-authority" in result.output and "regulator" in result.output


def test_witnesses_gossip_their_cosigned_heads(logged):
    for node in ("regulator", "health-authority"):
        with NodeClient(logged.state, logged.topology, node) as client:
            client.call(node, POLL)
    with NodeClient(logged.state, logged.topology, "regulator") as client:
        shown = client.call("health-authority", WITNESSED_HEAD)
        assert shown.cosignature.witness == "health-authority"
        assert shown.head.tree_size >= 6
        assert client.call("regulator", GOSSIP) == ["health-authority"]
    with NodeClient(logged.state, logged.topology, "health-authority") as client:
        assert client.call("health-authority", GOSSIP) == ["regulator"]
    # A witness's head is public to the federation (the transparency API): an insurer, with
    # no flow to the health authority, reads it there.
    with NodeClient(logged.state, logged.topology, "insurer-a") as client:
        assert client.call("health-authority", WITNESSED_HEAD).cosignature.witness == (
            "health-authority")
    for node in ("regulator", "health-authority"):
        conn = sqlite3.connect(logged.state.node(node).db)
        try:
            assert conn.execute("SELECT COUNT(*) FROM witness_incidents").fetchone()[0] == 0
        finally:
            conn.close()


def test_a_node_cannot_append_another_nodes_entry(logged):
    ha = open_node(logged.state, logged.topology, "health-authority")
    forged = signed_entry(ha, "data_registered", {"dataset": "x"})
    forged_doc = forged.model_dump(mode="json")
    forged_doc["event"]["actor"] = "regulator"
    with NodeClient(logged.state, logged.topology, "health-authority") as client, \
            pytest.raises(RemoteError) as refused:
        client.request("operator", "POST", APPEND_ENTRIES.path, kind=Kind.LEDGER,
                       json=[forged_doc])
    assert refused.value.http_status == 403


def test_a_proof_bundle_carries_its_cosigned_checkpoint_and_checks_offline(logged, tmp_path):
    for node in ("regulator", "health-authority"):
        with NodeClient(logged.state, logged.topology, node) as client:
            client.call(node, POLL)
    bundle = tmp_path / "proof.json"
    result = _cli(logged, "ledger", "prove", "3", "--out", str(bundle))
    assert result.exit_code == 0, result.output
    checked = _cli(logged, "ledger", "check-proof", str(bundle))
    assert checked.exit_code == 0, checked.output
    assert "entry 3 is in the log" in checked.output
    assert "health-authority" in checked.output and "regulator" in checked.output
    doc = json.loads(bundle.read_text())
    # The adversary: the operator's bundle with a witness's cosignature line swapped for one
    # by a key that is no witness's (an insurer's, under the witness's name).
    insurer = open_node(logged.state, logged.topology, "insurer-a")
    text, _, lines = doc["checkpoint"].partition("\n\n")
    forged = [line for line in lines.splitlines() if not line.startswith("\u2014 regulator ")]
    forged.append(cosign_line(text + "\n", "regulator", insurer.signing_key, 1).rstrip("\n"))
    bundle.write_text(json.dumps({**doc, "checkpoint": text + "\n\n" + "\n".join(forged)
                                  + "\n"}))
    refused = _cli(logged, "ledger", "check-proof", str(bundle))
    assert refused.exit_code == 1 and "regulator" in refused.output
    # Another entry under the same proof.
    bundle.write_text(json.dumps({**doc, "index": 2}))
    assert _cli(logged, "ledger", "check-proof", str(bundle)).exit_code == 1


def test_the_first_checkpoint_is_pinned_and_the_witnesses_start_from_it(logged):
    pin = load_pin(logged.state.node("insurer-a"))
    assert pin is not None and pin.tree_head.tree_size == 1
    assert load_pin(logged.state.node("regulator")) == pin
    for node in ("regulator", "health-authority"):
        conn = sqlite3.connect(logged.state.node(node).db)
        try:
            first = conn.execute("SELECT tree_size, root_hash FROM witness_heads"
                                 " ORDER BY tree_size LIMIT 1").fetchone()
        finally:
            conn.close()
        assert first == (1, pin.tree_head.root_hash)
    with pytest.raises(LogAlreadyStarted):  # pinned once, on the empty log
        pin_first_checkpoint(open_node(logged.state, logged.topology, "operator"))


def test_a_log_rewritten_from_its_start_is_refused_by_a_witness_started_from_the_pin(
        logged, tmp_path):
    """The operator, with its own key, shows a witness with no history of its own (a new
    one, or one whose store was lost) a log it rebuilt from the start, with a valid
    consistency proof within that rebuilt log. Trusting the first head seen, the witness
    would cosign it; started from the pin it refuses and records the fork."""
    from governance.ledger import LogInconsistent, Witness
    from governance.ledger.merkle import MemoryTree, leaf_hash
    from governance.ledger.tree_head import sign_tree_head
    from parties.ledger.pin import start_from_pin
    from parties.runtime.pki import load_signing_key
    from parties.runtime.store import connect

    key = load_signing_key(logged.state, "operator")
    forged = MemoryTree(leaf_hash(b"rebuilt entry %d" % i) for i in range(8))
    head = sign_tree_head("operator", 8, forged.root(), int(time.time() * 1000), key)
    regulator = load_signing_key(logged.state, "regulator")
    def witness(db: str) -> Witness:
        return Witness(connect(tmp_path / db, explicit_transactions=True), "regulator",
                       regulator, {"operator": key.public_key()})

    witness("tofu.db").cosign(head)  # trust on first use: the rebuilt log passes
    pinned = witness("pinned.db")
    start_from_pin(pinned, "operator", load_pin(logged.state.node("regulator")))
    with pytest.raises(LogInconsistent):
        pinned.cosign(head, forged.consistency_proof(1))
    assert pinned.incidents()[0]["reason"].startswith("consistency proof fails")


def _tamper(fed: Federation, how: str) -> None:
    db = sqlite3.connect(fed.state.node("operator").db)
    with db:
        if how == "byte":
            leaf = bytearray(db.execute("SELECT leaf FROM ledger_entries WHERE leaf_index=2")
                             .fetchone()[0])
            leaf[len(leaf) // 2] ^= 0x01
            db.execute("UPDATE ledger_entries SET leaf=? WHERE leaf_index=2", (bytes(leaf),))
        elif how == "delete":
            db.execute("DELETE FROM ledger_entries WHERE leaf_index=2")
        elif how == "swap":
            a, b = (db.execute("SELECT leaf FROM ledger_entries WHERE leaf_index=?", (i,))
                    .fetchone()[0] for i in (1, 2))
            db.execute("UPDATE ledger_entries SET leaf=? WHERE leaf_index=1", (b,))
            db.execute("UPDATE ledger_entries SET leaf=? WHERE leaf_index=2", (a,))
    db.close()


@pytest.mark.parametrize("how", ["byte", "delete", "swap"])
def test_tampered_store_fails_verification_and_says_where(tmp_path, how):
    fed = Federation(tmp_path, nodes=["health-authority", "operator", "regulator"])
    fed.up()
    try:
        ha = open_node(fed.state, fed.topology, "health-authority")
        for i in range(4):
            append_entry(ha, "data_registered", {"dataset": f"v{i}", "rows": i})
        assert _cli(fed, "ledger", "verify").exit_code == 0
    finally:
        fed.down()
    _tamper(fed, how)
    result = _cli(fed, "ledger", "verify", "--no-witness-now")
    assert result.exit_code == 1
    assert "FAILED" in result.output
    assert "entry 1" in result.output or "entry 2" in result.output


def _flat(result) -> str:
    return " ".join(result.output.split())  # the console wraps long lines


def _poll_witnesses(fed: Federation) -> None:
    for node in ("regulator", "health-authority"):
        with NodeClient(fed.state, fed.topology, node) as client:
            client.call(node, POLL)


def test_an_insurer_audits_the_log_with_public_keys_only(logged):
    """From the insurer's node: the cosigned C2SP checkpoint, each witness's head asked of
    the witness itself, the incidents, every entry against the root."""
    _poll_witnesses(logged)
    with NodeClient(logged.state, logged.topology, "insurer-a") as client:
        text = client.call("operator", CHECKPOINT).decode()
    assert "\n\n\u2014 " in text and text.count("\u2014 ") == 3  # log + 2 witnesses
    result = _cli(logged, "ledger", "audit", "--as", "insurer-a")
    assert result.exit_code == 0, result.output
    assert "cosigned by health-authority, regulator" in _flat(result)


def test_an_operator_that_drops_cosignatures_or_rewrites_its_tail_fails_the_audit(logged):
    """The operator edits its own store: it drops the witnesses' cosignature rows (to show a
    head they never saw), or rewrites the last entry. The insurer's audit fails either way."""
    _poll_witnesses(logged)
    db = sqlite3.connect(logged.state.node("operator").db)
    try:
        with db:
            saved = db.execute("SELECT * FROM ledger_cosignatures").fetchall()
            db.execute("DELETE FROM ledger_cosignatures WHERE witness = 'health-authority'")
        dropped = _cli(logged, "ledger", "audit", "--as", "insurer-a")
        assert dropped.exit_code != 0 and "missing: health-authority" in _flat(dropped)
        with db:
            db.executemany("INSERT OR REPLACE INTO ledger_cosignatures VALUES (?, ?, ?)", saved)
            last, leaf = db.execute("SELECT leaf_index, leaf FROM ledger_entries"
                                    " ORDER BY leaf_index DESC LIMIT 1").fetchone()
            forged = bytes(leaf).replace(b"c-1", b"c-9")
            assert forged != bytes(leaf)
            db.execute("UPDATE ledger_entries SET leaf = ? WHERE leaf_index = ?", (forged, last))
        rewritten = _cli(logged, "ledger", "audit", "--as", "insurer-a")
        assert rewritten.exit_code != 0 and "do not hash to the checkpoint" in _flat(rewritten)
        with db:
            db.execute("UPDATE ledger_entries SET leaf = ? WHERE leaf_index = ?", (leaf, last))
    finally:
        db.close()
    assert _cli(logged, "ledger", "audit", "--as", "insurer-a").exit_code == 0


@pytest.mark.slow
def test_renewal_and_rotation_keep_the_whole_history_verifiable(tmp_path):
    """Renewal issues a new TLS key and certificate but keeps the signing key; a rotation
    (`ledger rotate-key`) logs `signing_key_rotated` signed by the old and the new key and
    certifies the new one. Every entry signed before either still verifies, from the
    operator's store and from an insurer with public material only; the rotated-out key
    can no longer append. Control: a new signing key outside the log (`pki issue`) makes the
    node's entries fail, which shows verify really checks them."""
    fed = Federation(tmp_path, nodes=["health-authority", "operator", "regulator", "insurer-a"])
    fed.up()
    try:
        ha = open_node(fed.state, fed.topology, "health-authority")
        for i in range(3):
            append_entry(ha, "data_registered", {"dataset": f"r{i}", "rows": i})
        old_key = ha.signing_key
        assert _cli(fed, "ledger", "verify").exit_code == 0  # the witnesses cosign
        before = (fed.state.node("health-authority").cert.read_bytes(),
                  federation_signing_keys(fed.state, ["health-authority"]))
        renewed = _cli(fed, "pki", "renew", "health-authority")
        assert renewed.exit_code == 0, renewed.output
        assert fed.state.node("health-authority").cert.read_bytes() != before[0]
        assert federation_signing_keys(fed.state, ["health-authority"]) == before[1]
        assert _cli(fed, "ledger", "verify", "--no-witness-now").exit_code == 0
        rotated = _cli(fed, "ledger", "rotate-key", "--node", "health-authority")
        assert rotated.exit_code == 0, rotated.output
        assert federation_signing_keys(fed.state, ["health-authority"]) != before[1]
    finally:
        fed.down()
    fed.up()  # every node loads the new certificate; health-authority its new key
    try:
        ha = open_node(fed.state, fed.topology, "health-authority")
        append_entry(ha, "data_registered", {"dataset": "after-rotation", "rows": 7})
        # the thief of the old key, with the node's TLS identity, appends as the node
        stale = sign_event(make_event("data_registered", "health-authority", "rq-stale",
                                      {"dataset": "forged", "rows": 1}), old_key)
        with NodeClient(fed.state, fed.topology, "health-authority") as client, \
                pytest.raises(RemoteError) as refused:
            client.call("operator", APPEND_ENTRIES, EntryBatch([stale]))
        assert refused.value.http_status == 400
        verified = _cli(fed, "ledger", "verify")
        assert verified.exit_code == 0, verified.output
        _poll_witnesses(fed)
        audited = _cli(fed, "ledger", "audit", "--as", "insurer-a")
        assert audited.exit_code == 0, audited.output
        # the node bounds its old key at the rotation (nothing it signed before is
        # disowned), signed with its new key: the history still verifies
        at = int(_flat(rotated).split("(log entry ")[1].split(")")[0])
        revoked = _cli(fed, "ledger", "revoke-key", "--node", "health-authority", "--key",
                       public_key_hex(old_key), "--invalid-from", str(at))
        assert revoked.exit_code == 0, revoked.output
        assert _cli(fed, "ledger", "verify").exit_code == 0
    finally:
        fed.down()
    assert _cli(fed, "pki", "issue", "health-authority").exit_code == 0
    unlinked = _cli(fed, "ledger", "verify", "--no-witness-now")
    assert unlinked.exit_code == 1 and "FAILED" in unlinked.output
