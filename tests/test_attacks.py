"""The attack catalogue, as tests: each attack is refused with a typed error and logged.

Every case runs against real node processes over mutual TLS. "Logged" is checked
where the federation keeps it: the refusal record in the refusing node's store
(`refusals`), the node's JSON-lines log, the `query_refused` entry in the
operator's Merkle log, a witness incident, or a `tls_refused` line.
"""

import shutil
import sqlite3
import uuid
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.consent import revoke_consent
from governance.ledger import (
    MerkleLog,
    SignedTreeHead,
    decode_leaf,
    make_event,
    sign_event,
    verify_log,
)
from governance.meters import sign_request
from governance.packages import (
    PackageHashMismatch,
    approve_package,
    package_hash,
    verify_approval,
)
from parties.agreements.api import REGISTER_CONSENT, REVOKE_CONSENT
from parties.agreements.books import contract_book
from parties.claims.api import (
    CHECK,
    COMPUTE,
    NOT_CHECKABLE,
    REQUEST_SIGNATURE_HEADER,
    ClaimCheckRequest,
    signed_request,
)
from parties.claims.client import ClaimBatchFailed
from parties.domains.api import EVALUATE, LEVEL1_STEP
from parties.domains.budget import IDS_PER_DAY_ENV
from parties.domains.client import domain_tokens
from parties.ledger.api import APPEND_ENTRIES, POLL, EntryBatch
from parties.ledger.client import append_entry, signed_entry
from parties.node import open_node
from parties.runtime import pki
from parties.runtime.api import PING
from parties.runtime.client import NodeClient
from parties.runtime.errors import NodeUnavailable, RemoteError
from parties.runtime.node_log import REQUEST_ID_HEADER
from parties.runtime.pki import federation_signing_keys, load_signing_key
from parties.runtime.routes import Kind
from parties.runtime.supervisor import start_node, stop_node, wait_healthy
from tests.attack_helpers import (
    ClaimWorld,
    events,
    ledger_entries,
    refusal_rows,
    table_counts,
    wait_for,
)
from tests.federation import REPO, Federation

MODE = "ss"
# A small daily OPRF budget so enumeration trips it (the honest claims need far fewer ids).
IDS_PER_DAY = 2000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = ClaimWorld(tmp_path_factory.mktemp("attacks"), env={IDS_PER_DAY_ENV: str(IDS_PER_DAY)})
    try:
        w.ingest()
        w.sign_contracts()
        yield w
    finally:
        w.down()


def _refused_entries(w: ClaimWorld, reason: str) -> list[dict]:
    """Payloads of the `query_refused` log entries with this reason."""
    found = []
    for kind, _, leaf in ledger_entries(w.fed):
        if kind == "query_refused":
            payload = dict(decode_leaf(leaf).entry.event.payload)
            if payload.get("reason") == reason:
                found.append(payload)
    return found


def _log_id(w: ClaimWorld, rid: str, insurer: str = "insurer-a") -> str:
    return w.fed.log_id(insurer, "regulator", rid)


def _answered(w: ClaimWorld, rid: str) -> int:
    log_id = _log_id(w, rid)
    return sum(1 for kind, r, _ in ledger_entries(w.fed)
               if kind == "query_answered" and r == log_id)


def _one_claim(w: ClaimWorld, i: int, insurer: str = "insurer-a"):
    return w.claims_of(insurer).iloc[[i]].reset_index(drop=True)


# --- replay ---------------------------------------------------------------------------


def _prepared(world: ClaimWorld, client, rid: str, n: int = 2):
    claims = world.claims_of("insurer-a", n)
    consents = {nid: world.consent(nid) for nid in claims["national_id"]}
    client.register_consents(consents.values())
    return client.prepare(claims, consents, MODE, rid)


def test_replayed_request_gets_the_same_answer_and_a_reused_id_is_refused(world):
    rid = f"replay-{uuid.uuid4().hex}"
    with world.client() as client:
        prepared = _prepared(world, client, rid)
        first = client.send(prepared)
        assert wait_for(lambda: _answered(world, rid) >= 1, timeout=15)
        replayed = client.send(prepared)  # the very same bytes, the same request id
        assert replayed.model_dump() == first.model_dump()
        assert len(client.decode(prepared, replayed)) == 2
        # The same id for another request (k changed, signed anew by the insurer) is
        # refused, not answered.
        tampered = prepared.body.replace(b'"k":4', b'"k":3')
        assert tampered != prepared.body
        signature = sign_request(load_signing_key(world.fed.state, "insurer-a"), signed_request(
            prepared.log_id, "insurer-a", ClaimCheckRequest.model_validate_json(tampered)))
        with pytest.raises(RemoteError) as reused:
            client._http.request("regulator", CHECK.method, CHECK.path, kind=CHECK.kind,
                                 content=tampered, headers={"Content-Type": "application/json",
                                                            REQUEST_ID_HEADER: rid,
                                                            REQUEST_SIGNATURE_HEADER: signature})
    assert reused.value.http_status == 409 and reused.value.error == "RequestIdReused"
    assert (prepared.log_id, CHECK.path, "RequestIdReused") in [
        r[:3] for r in refusal_rows(world.fed, "regulator")]
    assert any(e["request_id"] == prepared.log_id and e["error"] == "RequestIdReused"
               for e in events(world.fed, "regulator", "refused"))
    assert _answered(world, rid) == 1  # the replay was not billed again


def test_replay_racing_the_metering_is_billed_once(world):
    """Replays that arrive while the first answer's metering is still in flight."""
    rid = f"race-{uuid.uuid4().hex}"
    with world.client() as client:
        prepared = _prepared(world, client, rid)
        client.send(prepared)
        for _ in range(10):  # replays while the first answer's metering is in flight
            client.send(prepared)
    assert wait_for(lambda: _answered(world, rid) >= 1, timeout=15)
    wait_for(lambda: _answered(world, rid) > 1, timeout=3)
    assert _answered(world, rid) == 1


def test_replayed_revoked_consent_is_refused_and_logged(world):
    claim = _one_claim(world, 2)
    nid = claim["national_id"][0]
    consent = world.consent(nid)
    with world.client() as client:
        client.register_consents([consent])
        client.check(claim, {nid: consent}, MODE)  # valid once
        revocation = revoke_consent(consent, world.consent_key(nid), datetime.now(UTC))
        with NodeClient(world.fed.state, world.fed.topology, "regulator") as admin:
            admin.call("regulator", REVOKE_CONSENT, revocation)
        client.register_consents([consent])  # the insurer replays the same document
        with pytest.raises(ClaimBatchFailed) as refused:
            client.check(claim, {nid: consent}, MODE)
    assert refused.value.http_status == 403 and refused.value.error == "ConsentRevoked"
    assert wait_for(lambda: _refused_entries(world, "ConsentRevoked"))
    assert (CHECK.path, "ConsentRevoked") in [
        r[1:3] for r in refusal_rows(world.fed, "regulator")]


def test_consent_given_to_one_insurer_replayed_by_another_is_refused(world):
    nid = _one_claim(world, 3)["national_id"][0]
    consent = world.consent(nid, "insurer-a")
    with world.client("insurer-b") as other, pytest.raises(RemoteError) as refused:
        other.register_consents([consent])
    assert refused.value.error == "ConsentMismatch" and refused.value.http_status == 403
    assert (REGISTER_CONSENT.path, "ConsentMismatch") in [
        r[1:3] for r in refusal_rows(world.fed, "regulator")]


def test_concurrent_quota_reservations_at_the_regulator_do_not_collide(world):
    """The serving node's contract book, used from concurrent threads the way its request
    threads use it: each asks `contract_book(ctx)` (a burst through the node hits the
    same path, less reliably)."""
    import threading

    from mpc.claim.constants import RECORD_COLUMNS, VERDICT_OUTPUTS

    regulator = open_node(world.fed.state, world.fed.topology, "regulator")
    failures: list[str] = []
    try:
        go = threading.Barrier(8)

        def reserve() -> None:
            book = contract_book(regulator)
            go.wait()
            for _ in range(25):
                try:
                    book.authorize("claim-check-insurer-b-2026", "insurer-b", RECORD_COLUMNS,
                                   VERDICT_OUTPUTS, datetime.now(UTC), 1)
                except Exception as exc:  # any collision is the defect
                    failures.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=reserve) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        regulator.store.close()
    assert not failures, failures[:3]


# --- one person's consent for another --------------------------------------------------


def test_consent_of_one_person_presented_for_another_is_refused(world):
    """The insurer holds a valid, registered consent of `other` and presents it for a claim
    about `named`: the consent's key (its only binding to a person) is not the key delivered
    for the person behind `named`'s token, so the operator refuses it uniformly."""
    claim = _one_claim(world, 4)
    named = claim["national_id"][0]
    other = next(n for n in world.claims["national_id"] if n != named)
    consent_of_other = world.consent(other)
    before = len(_refused_entries(world, "ClaimNotCheckable"))
    with world.client() as client:
        client.register_consents([consent_of_other])
        with pytest.raises(ClaimBatchFailed) as refused:
            client.check(claim, {named: consent_of_other}, MODE)
    # The uniform refusal: the insurer is not told that the key was the problem.
    assert refused.value.error == "ClaimNotCheckable" and refused.value.http_status == 403
    assert refused.value.detail == NOT_CHECKABLE
    rid = _log_id(world, refused.value.request_id)
    assert wait_for(lambda: len(_refused_entries(world, "ClaimNotCheckable")) > before)
    assert any(r[0] == rid and r[1] == COMPUTE.path and r[2] == "ClaimNotCheckable"
               and "consent_key_mismatch" in r[3]
               for r in refusal_rows(world.fed, "operator"))


# --- enumeration and linkage -----------------------------------------------------------


def test_token_enumeration_trips_the_daily_budget_and_is_logged(world):
    guesses = [f"32050519{i:010d}" for i in range(1000)]
    refused = None
    with NodeClient(world.fed.state, world.fed.topology, "insurer-b", timeout=120) as insurer:
        for _ in range(4):
            try:
                domain_tokens(insurer, guesses)
            except RemoteError as exc:
                refused = exc
                break
    assert refused is not None, f"a budget of {IDS_PER_DAY} ids must run out within 4000"
    assert refused.http_status == 429 and refused.error == "OprfBudgetSpent"
    assert (EVALUATE.path, "OprfBudgetSpent") in [
        r[1:3] for r in refusal_rows(world.fed, "operator")]
    assert (LEVEL1_STEP.path, "OprfBudgetSpent") in [
        r[1:3] for r in refusal_rows(world.fed, "health-authority")]
    assert wait_for(lambda: [e for k, _, e in ledger_entries(world.fed)
                             if k == "oprf_budget_tripped"
                             and decode_leaf(e).entry.event.payload["data_user"] == "insurer-b"])
    world.cli("govern", "reset-oprf-budget", "insurer-b")  # later tests use insurer-b


def test_insurer_b_presenting_insurer_a_domain_tokens_is_refused(world):
    claims = world.claims_of("insurer-a", 2).copy()
    nids = list(claims["national_id"])
    with world.client("insurer-a") as a:
        tokens_of_a = a.tokens(nids)
    claims["insurer"] = "insurer-b"
    consents = {nid: world.consent(nid, "insurer-b") for nid in nids}
    with world.client("insurer-b") as b:
        b.register_consents(consents.values())
        b._tokens.update(zip(nids, tokens_of_a, strict=True))  # the linkage attempt
        # Sent as prepared (`check` would retry once with b's own, freshly fetched tokens).
        with pytest.raises(RemoteError) as refused:
            b.send(b.prepare(claims, consents, MODE, "linkage-attempt"))
    assert refused.value.error == "ClaimNotCheckable" and refused.value.http_status == 403
    assert wait_for(lambda: [p for p in _refused_entries(world, "ClaimNotCheckable")
                             if p.get("party") == "insurer-b"])
    assert (_log_id(world, "linkage-attempt", "insurer-b"), COMPUTE.path,
            "ClaimNotCheckable") in [
        r[:3] for r in refusal_rows(world.fed, "operator") if "unknown_token" in r[3]]


# --- the log ---------------------------------------------------------------------------


def test_forged_log_entries_are_refused_and_change_nothing(world):
    fed = world.fed
    ha = open_node(fed.state, fed.topology, "health-authority")
    try:
        good = signed_entry(ha, "data_registered", {"dataset": "forgery-probe", "rows": 1})
    finally:
        ha.store.close()
    bad_signature = good.model_dump(mode="json")
    bad_signature["signature"] = ("0" if good.signature[0] != "0" else "1") + good.signature[1:]
    altered = good.model_dump(mode="json")
    altered["event"]["payload"]["rows"] = 1_000_000  # content changed after signing
    as_other = good.model_dump(mode="json")
    as_other["event"]["actor"] = "regulator"
    before = table_counts(fed.state.node("operator").db)
    refusals = []
    with NodeClient(fed.state, fed.topology, "health-authority") as client:
        for forged in (bad_signature, altered, as_other):
            with pytest.raises(RemoteError) as refused:
                client.request("operator", "POST", APPEND_ENTRIES.path, kind=Kind.LEDGER,
                               json=[forged])
            refusals.append((refused.value.http_status, refused.value.error))
    assert refusals == [(400, "EntrySignatureInvalid"), (400, "EntrySignatureInvalid"),
                        (403, "IdentityMismatch")]
    after = table_counts(fed.state.node("operator").db)
    assert after["ledger_entries"] == before["ledger_entries"]
    assert after["refusals"] == before["refusals"] + 3
    assert [r[2] for r in refusal_rows(fed, "operator")[-3:]] == [
        "EntrySignatureInvalid", "EntrySignatureInvalid", "IdentityMismatch"]


def test_retried_log_append_is_not_stored_twice(world):
    fed = world.fed
    ha = open_node(fed.state, fed.topology, "health-authority")
    try:
        entry = signed_entry(ha, "data_registered", {"dataset": "retried-once", "rows": 7})
    finally:
        ha.store.close()
    rid = entry.event.request_id
    with NodeClient(fed.state, fed.topology, "health-authority") as client:
        for _ in range(2):
            client.call("operator", APPEND_ENTRIES, EntryBatch([entry]))
    assert sum(1 for _, r, _ in ledger_entries(fed) if r == rid) == 1


def test_entry_forged_inside_the_store_fails_offline_verification(world, tmp_path):
    copy = tmp_path / "operator.db"
    source = sqlite3.connect(world.fed.state.node("operator").db)
    target = sqlite3.connect(copy)
    source.backup(target)
    source.close()
    with target:
        leaf = bytes(target.execute("SELECT leaf FROM ledger_entries WHERE leaf_index = 1")
                     .fetchone()[0])
        target.execute("UPDATE ledger_entries SET leaf = ? WHERE leaf_index = 1",
                       (leaf.replace(b'"actor":"', b'"actor":"x', 1),))
    leaves = [bytes(r[0]) for r in target.execute(
        "SELECT leaf FROM ledger_entries ORDER BY leaf_index")]
    row = target.execute("SELECT tree_size, log_id, root_hash, timestamp_ms, signature"
                         " FROM ledger_tree_heads ORDER BY tree_size DESC LIMIT 1").fetchone()
    target.close()
    head = SignedTreeHead(tree_size=row[0], log_id=row[1], root_hash=bytes(row[2]).hex(),
                          timestamp_ms=row[3], signature=bytes(row[4]).hex())
    keys = federation_signing_keys(world.fed.state, [n.name for n in world.fed.topology.nodes])
    report = verify_log(leaves[: head.tree_size], head, [], keys)
    assert not report.ok and report.bad_entries == [1]


def test_split_view_is_caught_by_the_witness_and_recorded(tmp_path):
    """The operator rewrites its log and shows the witness a head that contradicts the one
    the witness countersigned: the witness refuses (`LogInconsistent`) and records it."""
    fed = Federation(tmp_path, nodes=["health-authority", "operator", "regulator"])
    fed.up()
    try:
        ha = open_node(fed.state, fed.topology, "health-authority")
        for i in range(3):
            append_entry(ha, "data_registered", {"dataset": f"honest-{i}", "rows": i})
        ha.store.close()
        with NodeClient(fed.state, fed.topology, "regulator") as admin:
            cosigned = admin.call("regulator", POLL)
        assert cosigned is None or cosigned.tree_size >= 3
        witnessed = wait_for(lambda: _witnessed_size(fed), timeout=10)
        assert witnessed and witnessed >= 3

        # The operator forks: same key, another history, longer than the witnessed one.
        stop_node(fed.state, "operator", grace=5)
        db = sqlite3.connect(fed.state.node("operator").db, isolation_level=None)
        db.executescript("DELETE FROM ledger_entries; DELETE FROM ledger_nodes;"
                         " DELETE FROM ledger_tree_heads;")
        key = load_signing_key(fed.state, "operator")
        forked = MerkleLog(db, "operator", key, {})
        forked.append([sign_event(make_event("data_registered", "operator", f"fork-{i}",
                                             {"dataset": f"forged-{i}", "rows": i}), key)
                       for i in range(witnessed + 2)])
        db.close()
        start_node(fed.state, fed.topology_path, "operator")
        assert wait_healthy(fed.state, fed.topology, ["operator"])["operator"] == "ok"
        fed.admin_login()

        with NodeClient(fed.state, fed.topology, "regulator") as admin, \
                pytest.raises(RemoteError) as refused:
            admin.call("regulator", POLL)
        assert refused.value.http_status == 409 and refused.value.error == "LogInconsistent"
        conn = sqlite3.connect(fed.state.node("regulator").db)
        incidents = conn.execute("SELECT reason FROM witness_incidents").fetchall()
        conn.close()
        # (a gossip round may also have caught it, as a split view between the witnesses)
        assert any("consistency proof fails" in reason for (reason,) in incidents)
        assert events(fed, "regulator", "log_inconsistent")
        assert (POLL.path, "LogInconsistent") in [
            r[1:3] for r in refusal_rows(fed, "regulator")]
    finally:
        fed.down()


def _witnessed_size(fed: Federation) -> int | None:
    conn = sqlite3.connect(fed.state.node("regulator").db)
    try:
        row = conn.execute("SELECT MAX(tree_size) FROM witness_heads").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return row[0]


# --- certificates ----------------------------------------------------------------------


def test_revoked_certificate_is_refused_at_the_handshake_and_logged(world):
    fed = world.fed
    with NodeClient(fed.state, fed.topology, "hospital-2") as client:
        assert client.send("health-authority", PING).status_code == 200
    before = len(events(fed, "health-authority", "tls_refused"))
    pki.revoke_node(fed.state, "hospital-2")
    with NodeClient(fed.state, fed.topology, "hospital-2") as client, \
            pytest.raises(NodeUnavailable):
        client.send("health-authority", PING)
    refused = wait_for(lambda: events(fed, "health-authority", "tls_refused")[before:])
    assert refused and "revoked" in refused[-1]["reason"].lower()


# --- the secure room --------------------------------------------------------------------

CLAIM_PACKAGE = REPO / "scenarios" / "claim_check" / "claim_package"


def _swapped_copy(tmp_path):
    owner = Ed25519PrivateKey.generate()
    approval = approve_package(CLAIM_PACKAGE, owner, "health-authority")
    swapped = tmp_path / "swapped"
    shutil.copytree(CLAIM_PACKAGE, swapped, ignore=shutil.ignore_patterns("__pycache__"))
    with open(swapped / "verdict.py", "a") as handle:
        handle.write("\n# swapped after approval\n")
    return owner, approval, swapped


def test_package_swapped_after_approval_is_refused(tmp_path):
    from governance.synthetic import write_library
    from parties.secure_room.room import run_package

    owner, approval, swapped = _swapped_copy(tmp_path)
    assert verify_approval(CLAIM_PACKAGE, approval, owner.public_key()) == package_hash(
        CLAIM_PACKAGE)
    with pytest.raises(PackageHashMismatch):
        verify_approval(swapped, approval, owner.public_key())
    import pandas as pd

    library = tmp_path / "authorized"
    write_library(library, "authorized", {
        "visits": pd.DataFrame(), "claims": pd.DataFrame(), "policies": pd.DataFrame()})
    with pytest.raises(PackageHashMismatch):
        run_package(swapped, library, approval=approval, owner_public_key=owner.public_key())


def test_package_swapped_after_approval_is_refused_by_the_owner_node_and_logged(world, tmp_path):
    """The owner (health authority) approved the claim package; the operator asks it to run a
    copy changed after the approval on the authorized data: refused before any row is read."""
    from parties.secure_room.api import PRODUCTION_RUN, ProductionRunRequest
    from parties.secure_room.wire import package_to_wire

    fed = world.fed
    owner_key = load_signing_key(fed.state, "health-authority")
    approval = approve_package(CLAIM_PACKAGE, owner_key, "health-authority")
    # The owner's genuine signed approval, stored as its review step stores it.
    with sqlite3.connect(fed.state.node("health-authority").db) as db:
        db.execute("INSERT OR REPLACE INTO pa_approvals (sha256, name, version, approval)"
                   " VALUES (?, ?, ?, ?)", (approval.package_sha256, approval.package_name,
                                            approval.package_version,
                                            approval.model_dump_json()))
    _, _, swapped = _swapped_copy(tmp_path)
    with NodeClient(fed.state, fed.topology, "operator") as client, \
            pytest.raises(RemoteError) as refused:
        client.call("health-authority", PRODUCTION_RUN,
                    ProductionRunRequest(files=package_to_wire(swapped), requester="regulator",
                                         contract_id="package-run-claim-check-2026"))
    assert (refused.value.http_status, refused.value.error) == (409, "PackageHashMismatch")
    logged = [dict(decode_leaf(leaf).entry.event.payload)
              for kind, _, leaf in ledger_entries(fed) if kind == "package_run_refused"]
    assert any(p["error"] == "PackageHashMismatch"
               and p["package_sha256"] == package_hash(swapped) for p in logged)
    assert (PRODUCTION_RUN.path, "PackageHashMismatch") in [
        r[1:3] for r in refusal_rows(fed, "health-authority")]


def test_refused_attacks_left_no_partial_state(world):
    """After the whole catalogue, the regulator's request book holds no pending request and
    no quota reservation of a refused request."""
    conn = sqlite3.connect(world.fed.state.node("regulator").db)
    try:
        pending = conn.execute(
            "SELECT COUNT(*) FROM claim_requests WHERE status = 'pending'").fetchone()[0]
        held = conn.execute(
            "SELECT COUNT(*) FROM claim_requests WHERE status != 'answered'"
            " AND usage_id IS NOT NULL").fetchone()[0]
    finally:
        conn.close()
    assert pending == 0 and held == 0
