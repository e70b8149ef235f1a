"""The blinded OPRF chain through real nodes: insurer -> regulator -> operator -> authority."""

import sqlite3
import time
from contextlib import contextmanager

import pyarrow.parquet as pq
import pytest

from mpc import xid
from mpc.hazmat import group
from parties.claims.client import Client
from parties.domains.api import (
    DEFAULT_SCENARIO,
    DOMAIN_TOKENS,
    EVALUATE,
    LEVEL1_STEP,
    LOOKUP_TOKENS,
    Level1Request,
    OprfProofInvalid,
    SignedBatch,
    TokenLookup,
)
from parties.domains.batch import sign_batch
from parties.domains.budget import IDS_PER_DAY_ENV
from parties.domains.client import domain_tokens
from parties.domains.commitment_book import CommitmentBook, verify_answer
from parties.domains.keys import K1_NAME
from parties.domains.service import proven_step
from parties.node import open_node
from parties.runtime import supervisor
from parties.runtime.errors import FlowNotAllowed, RemoteError
from parties.runtime.pki import load_signing_key
from parties.runtime.routes import Kind
from tests.attack_helpers import events, refusal_rows
from tests.test_circulation import start

# A small daily budget so the enumeration test can exhaust it.
IDS_PER_DAY = "1500"


@pytest.fixture(scope="module")
def ing(tmp_path_factory):
    ingested = start(tmp_path_factory, {IDS_PER_DAY_ENV: IDS_PER_DAY}, cli_ingest=True)
    yield ingested
    ingested.fed.down()


def _ids(ing, n: int) -> list[str]:
    gt = pq.read_table(ing.data / "ground_truth" / "visits.parquet",
                       columns=["national_id"]).to_pandas()
    return gt["national_id"].drop_duplicates().head(n).tolist()


def _direct(ing, data_user: str, ids: list[str]) -> list[bytes]:
    """k2[d]·k1·H(id) computed from the keys, read from the nodes' own secrets."""
    ha = open_node(ing.fed.state, ing.fed.topology, "health-authority")
    op = open_node(ing.fed.state, ing.fed.topology, "operator")
    try:
        (domain_id,) = op.store.conn.execute(
            "SELECT domain_id FROM domains WHERE data_user = ? AND deleted_at IS NULL",
            (data_user,)).fetchone()
        k1 = ha.secrets.xid_key(K1_NAME)
        k2 = op.secrets.xid_key(f"domain:{domain_id}")
        return xid.rekey(k2, xid.tokenize(k1, ids))
    finally:
        ha.store.close()
        op.store.close()


def test_blinded_path_equals_the_direct_path(ing):
    ids = _ids(ing, 40)
    with ing.client("insurer-a") as insurer:
        through_nodes = domain_tokens(insurer, ids)
    assert through_nodes == _direct(ing, "insurer-a", ids)
    # ... and names the visits the domain holds for those persons.
    with ing.client("operator") as client:
        found = client.call("operator", LOOKUP_TOKENS,
                            TokenLookup(tokens=[t.hex() for t in through_nodes]),
                            params={"domain_id": _domain(ing, "insurer-a")})
    assert found.matched == len(ids)


def _domain(ing, data_user: str) -> str:
    with sqlite3.connect(ing.db("operator")) as conn:
        return conn.execute("SELECT domain_id FROM domains WHERE data_user = ? AND deleted_at"
                            " IS NULL", (data_user,)).fetchone()[0]


def test_each_insurer_gets_its_own_domain_tokens(ing):
    ids = _ids(ing, 20)
    with ing.client("insurer-a") as a, ing.client("insurer-b") as b:
        ta, tb = domain_tokens(a, ids), domain_tokens(b, ids)
    assert set(ta).isdisjoint(tb)
    assert tb == _direct(ing, "insurer-b", ids)


def test_no_key_holder_sees_an_id(ing):
    ids = _ids(ing, 5)
    with ing.client("insurer-a") as insurer:
        domain_tokens(insurer, ids)
    for node in ("regulator", "operator", "health-authority"):
        log = ing.fed.state.node(node).log.read_text()
        db = b"".join(p.read_bytes() for p in ing.fed.state.node(node).root.glob("node.db*"))
        for nid in ids:
            assert nid not in log and nid.encode() not in db


def _batch(ing, signer: str, points: list[bytes], *, data_user: str | None = None,
           **kw) -> SignedBatch:
    """A batch naming `data_user` (the signer by default), signed with `signer`'s node key."""
    key = load_signing_key(ing.fed.state, signer)
    return sign_batch(key, data_user or signer, points, "attack-test", **kw)


def _blinded(ing, n: int) -> list[bytes]:
    return xid.blind(_ids(ing, n))[0]


def _refused(call) -> RemoteError:
    with pytest.raises(RemoteError) as refused:
        call()
    return refused.value


def _refusals_by_caller(ing, node: str, route: str) -> list[tuple[str, str]]:
    with sqlite3.connect(ing.db(node)) as conn:
        return conn.execute("SELECT caller, error FROM refusals WHERE route = ?",
                            (route,)).fetchall()


def _served_batches(ing) -> set[str]:
    with sqlite3.connect(ing.db("health-authority")) as conn:
        return {r[0] for r in conn.execute("SELECT batch_id FROM oprf_batches")}


def test_malformed_points_are_refused_before_any_key_is_applied(ing):
    with ing.client("insurer-a") as insurer:
        bad = _refused(lambda: insurer.call("regulator", DOMAIN_TOKENS,
                                            _batch(ing, "insurer-a", [bytes(32)])))
    assert bad.http_status == 422 and bad.error == "MalformedInput"


def test_only_insurers_call_the_relay_and_only_the_regulator_the_operator(ing):
    batch = _batch(ing, "insurer-a", _blinded(ing, 2)).model_dump()
    with ing.client("hospital-1") as hospital, pytest.raises(FlowNotAllowed):
        hospital.request("regulator", "POST", DOMAIN_TOKENS.path, kind=Kind.OPRF, json=batch)
    with ing.client("insurer-b") as insurer, pytest.raises(RemoteError) as direct:
        insurer.request("operator", "POST", EVALUATE.path, kind=Kind.OPRF, check_flow=False,
                        json=batch)
    assert direct.value.http_status == 403


def _domain_key(ing, data_user: str) -> xid.XidKey:
    """k2[d] of `data_user`'s shared domain, as the operator holds it."""
    op = open_node(ing.fed.state, ing.fed.topology, "operator")
    try:
        return op.secrets.xid_key(f"domain:{_domain(ing, data_user)}")
    finally:
        op.store.close()


def _level1_request(batch: SignedBatch, key: xid.XidKey, inputs: list[bytes],
                    proof_from: list[bytes] | None = None) -> Level1Request:
    """The operator's request for `batch`: `key` applied to `inputs`, proven on
    `proof_from` (the inputs by default) against `key`'s commitment."""
    step = proven_step(key, inputs)
    if proof_from is not None:
        step = step.model_copy(update={"proof": proven_step(key, proof_from).proof})
    return Level1Request(batch=batch, domain_step=step, domain_commitment=key.commitment().hex())


def test_operator_cannot_have_k1_applied_to_points_of_its_choice(ing):
    """The operator, with its own certificate, signing key and k2 keys, wants k1 on
    H(id) of a person it would re-identify. It signs the point itself, forges an insurer's
    signature, swaps a point of a signed batch, or relays an insurer's signed batch B with
    a step Z' it did not compute as k·B (k2·H(id) in place of k2·B[0], H(id) itself proven
    as 1·H(id), a proof replayed from another batch): every form is refused and logged, a
    refused batch stays unserved, and a served one is never served twice."""
    target = xid.hash_to_group([_ids(ing, 1)[0]])
    k2 = _domain_key(ing, "insurer-a")
    unit = xid.XidKey("operator-chosen", 1, group.scalar_to_bytes(1))
    ha_refusals = len(refusal_rows(ing.fed, "health-authority"))
    own = _batch(ing, "operator", target)  # signed by the operator as itself
    as_insurer = _batch(ing, "operator", target, data_user="insurer-a")  # forged signer
    served = _batch(ing, "insurer-a", _blinded(ing, 3))
    swapped = served.model_copy(update={"points": [target[0].hex(), *served.points[1:]]})
    fresh = _batch(ing, "insurer-a", _blinded(ing, 3))
    signed = [bytes.fromhex(p) for p in fresh.points]
    chosen = [target[0], *signed[1:]]
    other = [bytes.fromhex(p) for p in _batch(ing, "insurer-a", _blinded(ing, 3)).points]
    with ing.client("regulator") as regulator:  # the honest batch is served, once
        regulator.call("operator", EVALUATE, served)
    requests = [
        _level1_request(own, k2, target),
        _level1_request(as_insurer, k2, target),
        _level1_request(swapped, k2, [bytes.fromhex(p) for p in swapped.points]),
        _level1_request(fresh, k2, chosen),  # Z' of its choosing, proven on what it used
        _level1_request(fresh, unit, chosen),  # Z' = H(id) "proven" under K = G
        _level1_request(fresh, k2, signed, proof_from=other),  # a replayed proof
        _level1_request(served, k2, [bytes.fromhex(p) for p in served.points]),
    ]
    with ing.client("operator") as operator:
        refusals = [_refused(lambda r=r: operator.call("health-authority", LEVEL1_STEP, r))
                    for r in requests]
    assert [(r.http_status, r.error) for r in refusals] == [
        (403, "BatchSignatureInvalid"), (403, "BatchSignatureInvalid"),
        (403, "BatchSignatureInvalid"), (403, "OprfProofInvalid"), (403, "OprfProofInvalid"),
        (403, "OprfProofInvalid"), (409, "BatchReplayed")]
    batches = _served_batches(ing)
    assert served.batch_id in batches
    assert not {own.batch_id, as_insurer.batch_id, fresh.batch_id} & batches
    rows = refusal_rows(ing.fed, "health-authority")[ha_refusals:]
    assert [(r[1], r[2]) for r in rows] == [(LEVEL1_STEP.path, r.error) for r in refusals]
    logged = events(ing.fed, "health-authority", "oprf_batch_refused")
    assert {own.batch_id, as_insurer.batch_id, fresh.batch_id, served.batch_id} <= {
        e["batch_id"] for e in logged}
    assert all(e["relay"] == "operator" for e in logged)
    with sqlite3.connect(ing.db("operator")) as conn:
        entries = conn.execute("SELECT COUNT(*) FROM ledger_entries WHERE kind = "
                               "'query_refused'").fetchone()[0]
    assert entries >= len(requests)
    # The refusals consumed nothing: the fresh batch, relayed honestly, is served.
    with ing.client("regulator") as regulator:
        answer = regulator.call("operator", EVALUATE, fresh)
    assert len(answer.level1_step.points) == 3 and fresh.batch_id in _served_batches(ing)


@contextmanager
def _swapped_key(ing, node: str, name: str):
    """`node` silently applies another scalar under key `name`'s id and version: what a
    wrong or tagging key holder does. Its published commitment stays the real key's."""
    handle = open_node(ing.fed.state, ing.fed.topology, node)
    real = handle.secrets.xid_key(name)
    try:
        handle.secrets.replace_xid_key(name, xid.XidKey(
            real.key_id, real.version, group.scalar_to_bytes(group.random_scalar())))
        yield
    finally:
        handle.secrets.replace_xid_key(name, real)
        handle.store.close()


def test_a_key_holder_applying_a_wrong_key_is_caught_by_the_insurer(ing):
    """The operator tags insurer-a with another k2 (insurer-b's stays honest), then the
    authority applies another k1: each time insurer-a's proof check refuses the answer
    (typed, in its node log) and no token is returned or cached."""
    ids = _ids(ing, 4)
    cases = (("operator", f"domain:{_domain(ing, 'insurer-a')}", "operator's step"),
             ("health-authority", K1_NAME, "health authority's step"))
    for node, name, blamed in cases:
        with _swapped_key(ing, node, name):
            with ing.client("insurer-a") as a, pytest.raises(OprfProofInvalid) as caught:
                domain_tokens(a, ids)
            assert blamed in str(caught.value)
            with Client("insurer-a", state=ing.fed.state, topology=ing.fed.topology) as sdk:
                with pytest.raises(OprfProofInvalid):
                    sdk.tokens(ids)
                assert sdk._tokens == {}
            if node == "operator":  # only insurer-a was tagged
                with ing.client("insurer-b") as b:
                    assert domain_tokens(b, ids) == _direct(ing, "insurer-b", ids)
    refused = events(ing.fed, "insurer-a", "oprf_proof_refused")
    assert len(refused) >= 4 and all(e["points"] == len(ids) for e in refused)
    with ing.client("insurer-a") as a:  # honest key holders again: the tokens verify
        assert domain_tokens(a, ids) == _direct(ing, "insurer-a", ids)


def test_forged_replayed_or_foreign_answers_are_refused_by_the_insurer(ing):
    """A relay (the regulator) hands insurer-a an answer of another batch, a proof with a
    bit flipped, a step naming a key version the log never saw, or insurer-b's genuine
    answer (another domain's key): each is refused before unblinding."""
    ids = _ids(ing, 3)
    with ing.client("insurer-a") as a, ing.client("insurer-b") as b:
        book = CommitmentBook(a)
        blinded, _ = xid.blind(ids)
        answer = a.call("regulator", DOMAIN_TOKENS, _batch(ing, "insurer-a", blinded))
        assert len(verify_answer(book, blinded, answer, scenario=DEFAULT_SCENARIO)) == 3
        later, _ = xid.blind(ids)
        proof = answer.level1_step.proof
        bad_proof = f"{int(proof[:2], 16) ^ 1:02x}" + proof[2:]  # the challenge's low bit
        flipped = answer.model_copy(update={"level1_step": answer.level1_step.model_copy(
            update={"proof": bad_proof})})
        unpublished = answer.model_copy(update={"domain_step": answer.domain_step.model_copy(
            update={"key_version": answer.domain_step.key_version + 1})})
        b_blinded, _ = xid.blind(ids)
        foreign = b.call("regulator", DOMAIN_TOKENS, _batch(ing, "insurer-b", b_blinded))
        for points, forged in ((later, answer), (blinded, flipped), (blinded, unpublished),
                               (b_blinded, foreign)):
            with pytest.raises(OprfProofInvalid):
                verify_answer(book, points, forged, scenario=DEFAULT_SCENARIO)


def test_the_insurer_never_obtains_the_level1_pseudonym(ing):
    """Cross-insurer unlinkability rests on no insurer learning P1 = k1·H(id). insurer-a
    runs the chain with its own blinding scalars and keeps everything on the wire (B, Z',
    Z, both proofs, the commitments K1 and K2[d] from the log). Unblinding any wire point
    gives k2[d]·H(id) or its token k1·k2[d]·H(id), never P1; P1 follows from them only with
    k2[d]^-1, the operator's secret (shown with the operator's key). In the old order
    (k1 first) the insurer's unblinded first step would have been P1 itself."""
    nid = _ids(ing, 1)
    with ing.client("insurer-a") as a:
        book = CommitmentBook(a)
        blinded, state = xid.blind(nid)
        answer = a.call("regulator", DOMAIN_TOKENS, _batch(ing, "insurer-a", blinded))
        verify_answer(book, blinded, answer, scenario=DEFAULT_SCENARIO)
    stepped = answer.domain_step.points + answer.level1_step.points
    wire = [*blinded, *(bytes.fromhex(p) for p in stepped),
            book.commitment(answer.domain_step, "operator", scenario=DEFAULT_SCENARIO,
                            data_user="insurer-a"),
            book.commitment(answer.level1_step, "health-authority")]
    r_inverse = state._inverses[:32]  # the insurer's own secret
    derived = {group.scalarmult(r_inverse, w) for w in wire if w != group.base_mult(1)}
    ha = open_node(ing.fed.state, ing.fed.topology, "health-authority")
    try:
        p1 = xid.tokenize(ha.secrets.xid_key(K1_NAME), nid)[0]
    finally:
        ha.store.close()
    assert p1 not in derived and p1 not in wire
    k2 = _domain_key(ing, "insurer-a")
    domain_pseudonym = group.scalarmult(r_inverse, bytes.fromhex(answer.domain_step.points[0]))
    assert domain_pseudonym == xid.evaluate_blinded(k2, xid.hash_to_group(nid))[0]
    k2_inverse = group.scalar_to_bytes(pow(group.scalar_from_bytes(k2._scalar), -1,
                                           group.GROUP_ORDER))
    token = group.scalarmult(r_inverse, bytes.fromhex(answer.level1_step.points[0]))
    assert group.scalarmult(k2_inverse, token) == p1  # what the insurer would need: k2^-1


def test_regulator_cannot_obtain_another_insurers_domain_tokens(ing):
    """The regulator names insurer-b's domain for points of its choice, or reuses or edits
    a batch insurer-b signed: refused by the operator (and the authority), logged."""
    chosen = _blinded(ing, 4)
    forged = _batch(ing, "regulator", chosen, data_user="insurer-b")
    itself = _batch(ing, "regulator", chosen)
    with ing.client("insurer-b") as b:
        captured = _batch(ing, "insurer-b", _blinded(ing, 2))
        b.call("regulator", DOMAIN_TOKENS, captured)
    edited = captured.model_copy(update={"points": [p.hex() for p in chosen[:2]]})
    with ing.client("regulator") as regulator:
        refusals = [_refused(lambda x=x: regulator.call("operator", EVALUATE, x))
                    for x in (forged, itself, edited, captured)]
    assert [(r.http_status, r.error) for r in refusals] == [
        (403, "BatchSignatureInvalid"), (403, "BatchSignatureInvalid"),
        (403, "BatchSignatureInvalid"), (409, "BatchReplayed")]
    errors = [(r[1], r[2]) for r in refusal_rows(ing.fed, "operator") if r[1] == EVALUATE.path]
    assert errors.count((EVALUATE.path, "BatchSignatureInvalid")) >= 3
    assert (EVALUATE.path, "BatchReplayed") in errors
    assert (LEVEL1_STEP.path, "BatchReplayed") in [
        (r[1], r[2]) for r in refusal_rows(ing.fed, "health-authority")]
    # An insurer cannot have the relay name another insurer either.
    with ing.client("insurer-a") as a:
        other = _refused(lambda: a.call("regulator", DOMAIN_TOKENS,
                                        _batch(ing, "insurer-a", chosen, data_user="insurer-b")))
        named = _refused(lambda: a.call("regulator", DOMAIN_TOKENS, forged))
    assert (other.error, named.error) == ("BatchSignatureInvalid", "BatchSignatureInvalid")
    assert ("insurer-a", "BatchSignatureInvalid") in _refusals_by_caller(ing, "regulator",
                                                                        DOMAIN_TOKENS.path)


def test_expired_and_overlong_batches_are_refused(ing):
    with ing.client("insurer-a") as a:
        stale = _refused(lambda: a.call("regulator", DOMAIN_TOKENS, _batch(
            ing, "insurer-a", _blinded(ing, 2), now=time.time() - 600)))
        overlong = _refused(lambda: a.call("regulator", DOMAIN_TOKENS, _batch(
            ing, "insurer-a", _blinded(ing, 2), ttl_s=3600)))
    assert (stale.http_status, stale.error) == (403, "BatchExpired")
    assert (overlong.http_status, overlong.error) == (403, "BatchExpired")


def _restart_authority(ing, monkeypatch, while_down=None) -> None:
    monkeypatch.setenv(IDS_PER_DAY_ENV, IDS_PER_DAY)
    supervisor.stop_node(ing.fed.state, "health-authority", grace=5)
    if while_down:
        while_down()
    supervisor.start_node(ing.fed.state, ing.fed.topology_path, "health-authority")
    status = supervisor.wait_healthy(ing.fed.state, ing.fed.topology, ["health-authority"])
    assert status["health-authority"] == "ok", status


def test_enumeration_past_the_daily_cap_stays_refused_after_a_restart(ing, monkeypatch):
    """insurer-b enumerates guessed ids: the batch that crosses the daily cap trips an
    incident; every later batch is refused, across a restart of the authority, until an
    administrator resets the budget."""
    guesses = [f"32050519{i:010d}" for i in range(1000)]
    refused = None
    with ing.client("insurer-b") as insurer:
        for _ in range(3):
            try:
                domain_tokens(insurer, guesses)
            except RemoteError as exc:
                refused = exc
                break
    assert refused is not None, f"a budget of {IDS_PER_DAY} ids must run out within 3000"
    assert refused.http_status == 429 and refused.error == "OprfBudgetSpent"
    with ing.client("insurer-b") as insurer:  # even a small batch, once tripped
        assert _refused(lambda: domain_tokens(insurer, _ids(ing, 2))).error == "OprfBudgetSpent"
    with sqlite3.connect(ing.db("health-authority")) as conn:
        incidents = conn.execute("SELECT data_user, cap FROM oprf_budget_incidents"
                                 " WHERE reset_at IS NULL").fetchall()
    assert incidents == [("insurer-b", int(IDS_PER_DAY))]
    with sqlite3.connect(ing.db("operator")) as conn:
        kinds = [r[0] for r in conn.execute("SELECT kind FROM ledger_entries")]
    assert "oprf_budget_tripped" in kinds and "oprf_level1_applied" in kinds
    # The regulator and the operator pass the refusal on as the same typed error.
    assert ("insurer-b", "OprfBudgetSpent") in _refusals_by_caller(ing, "regulator",
                                                                  DOMAIN_TOKENS.path)

    _restart_authority(ing, monkeypatch)
    with ing.client("insurer-b") as insurer:
        assert _refused(lambda: domain_tokens(insurer, _ids(ing, 2))).error == "OprfBudgetSpent"
    with ing.client("insurer-a") as insurer:  # the other insurer's budget is its own
        assert len(domain_tokens(insurer, _ids(ing, 3))) == 3

    out = ing.cli("govern", "reset-oprf-budget", "insurer-b")
    assert "reset" in out
    with ing.client("insurer-b") as insurer:
        assert domain_tokens(insurer, _ids(ing, 3)) == _direct(ing, "insurer-b", _ids(ing, 3))
    listed = ing.cli("govern", "oprf-budgets")
    assert "insurer-b" in listed and "open" in listed


def _trip(ing, insurer: str) -> None:
    guesses = [f"32050520{i:010d}" for i in range(1000)]
    with ing.client(insurer) as client, pytest.raises(RemoteError) as refused:
        for _ in range(3):
            domain_tokens(client, guesses)
    assert refused.value.error == "OprfBudgetSpent"


def test_a_tripped_budget_opens_again_on_the_next_utc_day(ing, monkeypatch):
    _trip(ing, "insurer-a")

    def yesterday() -> None:  # the node is down: move its book back one day
        with sqlite3.connect(ing.db("health-authority")) as conn:
            for table in ("oprf_usage", "oprf_budget_incidents", "oprf_batches"):
                conn.execute(f"UPDATE {table} SET day = date(day, '-1 day')")

    _restart_authority(ing, monkeypatch, while_down=yesterday)
    with ing.client("insurer-a") as insurer:
        assert len(domain_tokens(insurer, _ids(ing, 3))) == 3
