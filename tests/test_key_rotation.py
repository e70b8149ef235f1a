"""Rotation of a shared domain's key k2[d] at the operator and of k1 at the authority, on real
nodes.

The federation has ingested generated data (`cogov govern ingest`), which created
the claim_check shared domains of insurer-a and insurer-b.
"""

import sqlite3

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from governance.errors import GovernanceError
from governance.ledger.events import decode_leaf
from mpc import xid
from parties.domains.api import (
    LEVEL1_COMMIT,
    LEVEL1_MAPPING,
    LIST_DOMAINS,
    LOOKUP_TOKENS,
    ROTATE_DOMAIN_KEY,
    ROTATE_LEVEL1,
    RekeyCommit,
    SharedDomain,
    TokenLookup,
)
from parties.domains.client import domain_tokens
from parties.domains.keys import K1_NAME
from parties.domains.level1_rotation import K1_PENDING, mapping_digest, rotate_level1_key
from parties.domains.rotation import rotate_domain_key
from parties.node import open_node
from parties.runtime.batches import send_batches
from parties.runtime.errors import RemoteError
from parties.runtime.routes import Kind
from tests.attack_helpers import ledger_entries, read_only, rows_checksum
from tests.test_circulation import start


@pytest.fixture(scope="module")
def ing(tmp_path_factory):
    ingested = start(tmp_path_factory, cli_ingest=True)
    yield ingested
    ingested.fed.down()


def _domains(ing) -> dict[str, SharedDomain]:
    with ing.client("operator") as client:
        return {d.data_user: d for d in client.call("operator", LIST_DOMAINS)}


def _tokens(ing, domain_id: str) -> pd.DataFrame:
    with sqlite3.connect(ing.db("operator")) as conn:
        rows = conn.execute("SELECT visit_ref, token FROM domain_tokens WHERE domain_id = ?",
                            (domain_id,)).fetchall()
    return pd.DataFrame(rows, columns=["visit_ref", "token"]).sort_values("visit_ref")


def _persons(frame: pd.DataFrame) -> set[frozenset]:
    """The visits grouped by person (by token), independent of the token values."""
    return {frozenset(g["visit_ref"]) for _, g in frame.groupby("token")}


def _state(ing) -> tuple[str, str, int]:
    """Checksums of the operator's tokens and sealed keys, and its count of key_rotated."""
    conn = read_only(ing.db("operator"))
    try:
        tokens = rows_checksum(conn.execute("SELECT * FROM domain_tokens").fetchall())
        keys = rows_checksum(conn.execute("SELECT * FROM xid_keys").fetchall())
    finally:
        conn.close()
    rotated = sum(1 for kind, _, _ in ledger_entries(ing.fed) if kind == "key_rotated")
    return tokens, keys, rotated


def _national_ids(ing) -> list[str]:
    gt = pq.read_table(ing.data / "ground_truth" / "visits.parquet",
                       columns=["national_id"]).to_pandas()
    return gt["national_id"].unique().tolist()


def test_rotation_rekeys_stored_tokens_and_the_oprf_yields_the_new_ones(ing):
    domains = _domains(ing)
    a, b = domains["insurer-a"].domain_id, domains["insurer-b"].domain_id
    ids = _national_ids(ing)
    sample = ids[:6]
    stored_a, stored_b = _tokens(ing, a), _tokens(ing, b)
    with ing.client("insurer-a") as insurer:
        before = domain_tokens(insurer, sample)
    assert set(before) <= set(stored_a["token"])

    out = ing.cli("domain", "rotate", a)
    assert "rotated" in out and "version 1 -> 2" in out

    rotated_a = _tokens(ing, a)
    with ing.client("insurer-a") as insurer:
        after = domain_tokens(insurer, sample)
    # The OPRF path gives the new tokens, and they are what the operator stores.
    assert set(after) <= set(rotated_a["token"])
    assert set(after).isdisjoint(before)
    # Tokens from before the rotation match nothing any more.
    assert set(stored_a["token"]).isdisjoint(rotated_a["token"])
    with ing.client("operator") as client:
        old = client.call("operator", LOOKUP_TOKENS, TokenLookup(tokens=[t.hex() for t in before]),
                          params={"domain_id": a})
        new = client.call("operator", LOOKUP_TOKENS, TokenLookup(tokens=[t.hex() for t in after]),
                          params={"domain_id": a})
    assert old.matched == 0 and new.matched == len(set(after))
    # Same visits, same grouping by person; only the token values moved.
    assert list(rotated_a["visit_ref"]) == list(stored_a["visit_ref"])
    assert _persons(rotated_a) == _persons(stored_a)
    # Independent path: every stored token is k2'·k1·H(id) under the new key version.
    ha = open_node(ing.fed.state, ing.fed.topology, "health-authority")
    op = open_node(ing.fed.state, ing.fed.topology, "operator")
    try:
        k1, k2 = ha.secrets.xid_key(K1_NAME), op.secrets.xid_key(f"domain:{a}")
    finally:
        ha.store.close()
        op.store.close()
    assert k2.version == 2
    assert set(xid.rekey(k2, xid.tokenize(k1, ids))) == set(rotated_a["token"])
    # The other domain is untouched.
    assert _tokens(ing, b).equals(stored_b)
    # Logged, with ids and counters only.
    payloads = [decode_leaf(leaf).entry.event for kind, _, leaf in ledger_entries(ing.fed)
                if kind == "key_rotated"]
    assert len(payloads) == 1 and payloads[0].actor == "operator"
    assert payloads[0].payload == {
        "domain": a, "key_id": f"domain:{a}", "old_version": 1, "new_version": 2,
        "tokens": len(stored_a), "persons": stored_a["token"].nunique(),
    }
    # A second rotation through the route moves on to version 3.
    with ing.client("operator") as client:
        again = client.call("operator", ROTATE_DOMAIN_KEY, params={"domain_id": a})
    assert (again.old_version, again.new_version, again.tokens) == (2, 3, len(stored_a))
    with ing.client("insurer-a") as insurer:
        third = domain_tokens(insurer, sample)
    assert set(third) <= set(_tokens(ing, a)["token"]) and set(third).isdisjoint(after)


def test_failed_rotation_rolls_back_tokens_and_key_together(ing, monkeypatch):
    a = _domains(ing)["insurer-a"].domain_id
    state = _state(ing)
    op = open_node(ing.fed.state, ing.fed.topology, "operator")
    key = op.secrets.xid_key(f"domain:{a}")

    def broken_seal(name, key):
        raise OSError("disk failed while sealing the new key")

    # The failure strikes at the last statement of the unit, after every token was updated.
    monkeypatch.setattr(op.secrets, "_seal", broken_seal)
    try:
        with pytest.raises(OSError):
            rotate_domain_key(op, a)
        assert op.secrets.xid_key(f"domain:{a}") == key
    finally:
        op.close()
    assert _state(ing) == state


def test_rotation_of_an_unknown_or_deleted_domain_is_refused_and_changes_nothing(ing):
    b = _domains(ing)["insurer-b"].domain_id
    ing.cli("domain", "delete", b, "--yes")
    state = _state(ing)
    with ing.client("operator") as client:
        with pytest.raises(RemoteError) as unknown:
            client.call("operator", ROTATE_DOMAIN_KEY, params={"domain_id": "dom-0123456789abcdef"})
        with pytest.raises(RemoteError) as deleted:
            client.call("operator", ROTATE_DOMAIN_KEY, params={"domain_id": b})
        with pytest.raises(RemoteError) as malformed:
            client.call("operator", ROTATE_DOMAIN_KEY, params={"domain_id": "not-a-domain"})
    assert (unknown.value.http_status, unknown.value.error) == (404, "UnknownDomain")
    assert (deleted.value.http_status, deleted.value.error) == (410, "DomainDeleted")
    assert malformed.value.http_status == 422
    with ing.client("regulator") as client, pytest.raises(RemoteError) as not_admin:
        client.request("operator", "POST", ROTATE_DOMAIN_KEY.url(domain_id=b), kind=Kind.ADMIN,
                       check_flow=False)
    assert not_admin.value.http_status == 403
    assert _state(ing) == state


# --- the level-1 key k1, at the health authority -------------------------------------------------


def _operator_level1(ing) -> tuple[dict[bytes, bytes], dict[bytes, tuple]]:
    """The operator's visit_ref -> p1 and p1 -> its consent public keys, (insurer, key)
    pairs sorted."""
    conn = read_only(ing.db("operator"))
    try:
        visits = {bytes(r): bytes(p) for r, p in conn.execute(
            "SELECT visit_ref, p1 FROM circ_visits")}
        persons: dict[bytes, tuple] = {}
        for p, i, k in conn.execute(
                "SELECT p1, insurer, public_key FROM circ_persons ORDER BY p1, insurer"):
            persons[bytes(p)] = (*persons.get(bytes(p), ()), (i, bytes(k)))
    finally:
        conn.close()
    return visits, persons


def _operator_state(ing) -> str:
    conn = read_only(ing.db("operator"))
    try:
        return rows_checksum([
            *conn.execute("SELECT * FROM circ_visits").fetchall(),
            *conn.execute("SELECT * FROM circ_persons").fetchall(),
            *conn.execute("SELECT * FROM domain_tokens").fetchall(),
            *conn.execute("SELECT domain_id, token_epoch FROM domains").fetchall(),
        ])
    finally:
        conn.close()


def test_level1_rotation_moves_the_authority_the_operator_and_every_live_domain(ing):
    a = _domains(ing)["insurer-a"].domain_id  # insurer-b's shared domain was deleted above
    ids = _national_ids(ing)
    sample = ids[:6]
    tokens_before = _tokens(ing, a)
    visits_before, persons_before = _operator_level1(ing)
    with ing.client("insurer-a") as insurer:
        oprf_before = domain_tokens(insurer, sample)

    out = ing.cli("govern", "rotate-k1")
    assert "k1 rotated: version 1 -> 2" in out

    ha = open_node(ing.fed.state, ing.fed.topology, "health-authority")
    op = open_node(ing.fed.state, ing.fed.topology, "operator")
    try:
        k1, k2 = ha.secrets.xid_key(K1_NAME), op.secrets.xid_key(f"domain:{a}")
        with pytest.raises(GovernanceError):
            ha.secrets.xid_key(K1_PENDING)  # spent once the rotation committed
        ha_p1 = {bytes(p) for (p,) in ha.store.conn.execute("SELECT p1 FROM ha_visits")}
    finally:
        ha.store.close()
        op.store.close()
    assert k1.version == 2
    expected_p1 = set(xid.tokenize(k1, ids))
    # The authority and the operator hold k1'·H(id) for every person, and nothing older.
    assert ha_p1 == expected_p1
    visits_after, persons_after = _operator_level1(ing)
    assert visits_after.keys() == visits_before.keys()
    assert set(visits_after.values()) == expected_p1
    assert set(persons_after).isdisjoint(persons_before)
    assert sorted(persons_after.values()) == sorted(persons_before.values())
    # The same visits still belong to one person; each person keeps its consumer key.
    old_to_new = {visits_before[r]: visits_after[r] for r in visits_before}
    assert len(set(old_to_new.values())) == len(old_to_new)
    assert all(persons_after[new] == persons_before[old] for old, new in old_to_new.items()
               if old in persons_before)
    # Every token of the live domain is k2·k1'·H(id); the visit grouping is unchanged.
    tokens_after = _tokens(ing, a)
    assert set(tokens_after["token"]) == set(xid.rekey(k2, xid.tokenize(k1, ids)))
    assert list(tokens_after["visit_ref"]) == list(tokens_before["visit_ref"])
    assert _persons(tokens_after) == _persons(tokens_before)
    assert set(tokens_after["token"]).isdisjoint(tokens_before["token"])
    # The OPRF chain now yields the new tokens.
    with ing.client("insurer-a") as insurer:
        oprf_after = domain_tokens(insurer, sample)
    assert set(oprf_after) <= set(tokens_after["token"]) and set(oprf_after).isdisjoint(oprf_before)
    # Logged on both sides, with counters only.
    entries = [decode_leaf(leaf).entry.event for kind, _, leaf in ledger_entries(ing.fed)
               if kind in ("key_rotated", "tokens_rederived")]
    authority = [e for e in entries if e.actor == "health-authority"]
    operator = [e for e in entries if e.kind == "tokens_rederived"]
    assert len(authority) == 1 and len(operator) == 1
    assert authority[0].payload["key_id"] == K1_NAME
    assert (authority[0].payload["old_version"], authority[0].payload["new_version"]) == (1, 2)
    assert operator[0].actor == "operator" and operator[0].payload["domains"] == 1
    assert operator[0].payload["persons"] == len(persons_before.keys() | visits_before.values())


def test_level1_commit_that_is_short_or_incomplete_is_refused_and_changes_nothing(ing):
    visits, persons = _operator_level1(ing)
    held = sorted(set(visits.values()) | set(persons))
    moved = xid.rotate_tokens(xid.XidKey.generate("x"), xid.XidKey.generate("x", 2), held)
    before = _operator_state(ing)
    with ing.client("health-authority") as client:
        # Every pair but one: the mapping must cover every person the operator holds.
        pairs = list(zip(held[1:], moved[1:], strict=True))
        send_batches(client, "operator", LEVEL1_MAPPING, "k1-test-missing",
                     pa.table({"old_p1": pa.array([o for o, _ in pairs], pa.binary(32)),
                               "new_p1": pa.array([n for _, n in pairs], pa.binary(32))}),
                     batch_rows=50)
        commit = RekeyCommit(old_version=2, new_version=3, pairs=len(pairs),
                             digest=mapping_digest(pairs))
        missing = {"stream": "k1-test-missing"}
        with pytest.raises(RemoteError) as incomplete:
            client.call("operator", LEVEL1_COMMIT, commit, params=missing)
        # A count that differs from what was staged.
        with pytest.raises(RemoteError) as short:
            client.call("operator", LEVEL1_COMMIT,
                        commit.model_copy(update={"pairs": len(pairs) + 1}), params=missing)
    assert (incomplete.value.http_status, incomplete.value.error) == (409, "RotationRefused")
    assert "without a new p1" in incomplete.value.detail
    assert short.value.error == "RotationRefused"
    assert _operator_state(ing) == before
    conn = read_only(ing.db("operator"))
    try:
        refused = conn.execute("SELECT error FROM refusals WHERE route LIKE '%level1%'").fetchall()
    finally:
        conn.close()
    assert refused.count(("RotationRefused",)) >= 2


def test_level1_commit_is_idempotent_and_only_the_authority_may_send_one(ing):
    (stream,) = [decode_leaf(leaf).entry.event.payload["stream"]
                 for kind, _, leaf in ledger_entries(ing.fed) if kind == "tokens_rederived"]
    before = _operator_state(ing)
    commit = RekeyCommit(old_version=1, new_version=2, pairs=0, digest="0" * 64)
    with ing.client("health-authority") as client:
        again = client.call("operator", LEVEL1_COMMIT, commit, params={"stream": stream})
    assert (again.stream, again.old_version, again.new_version) == (stream, 1, 2)
    assert _operator_state(ing) == before
    with ing.client("regulator") as client, pytest.raises(RemoteError) as not_authority:
        client.request("operator", "POST", LEVEL1_COMMIT.url(stream=stream), kind=Kind.INGEST,
                       json=commit.model_dump(), check_flow=False)
    assert not_authority.value.http_status == 403
    with ing.client("operator") as client, pytest.raises(RemoteError) as not_admin:
        client.request("health-authority", "POST", ROTATE_LEVEL1.path, kind=Kind.ADMIN,
                       check_flow=False)
    assert not_admin.value.http_status == 403


def test_level1_rotation_resumes_when_the_authority_died_after_the_operator_committed(
        ing, monkeypatch):
    ha = open_node(ing.fed.state, ing.fed.topology, "health-authority")
    try:
        def crash(name, key):
            raise OSError("the authority died before its own commit")

        monkeypatch.setattr(ha.secrets, "replace_xid_key", crash)
        with pytest.raises(OSError):
            rotate_level1_key(ha)
        # The operator moved to k1 version 3; the authority still holds version 2 and the
        # pending version 3.
        assert ha.secrets.xid_key(K1_NAME).version == 2
        assert ha.secrets.xid_key(K1_PENDING).version == 3
    finally:
        ha.close()
    rederived = [kind for kind, _, _ in ledger_entries(ing.fed) if kind == "tokens_rederived"]
    assert len(rederived) == 2

    out = ing.cli("govern", "rotate-k1")  # the rerun resumes the same rotation
    assert "version 2 -> 3" in out

    a = _domains(ing)["insurer-a"].domain_id
    ha = open_node(ing.fed.state, ing.fed.topology, "health-authority")
    op = open_node(ing.fed.state, ing.fed.topology, "operator")
    try:
        k1, k2 = ha.secrets.xid_key(K1_NAME), op.secrets.xid_key(f"domain:{a}")
        ha_p1 = {bytes(p) for (p,) in ha.store.conn.execute("SELECT p1 FROM ha_visits")}
    finally:
        ha.store.close()
        op.store.close()
    ids = _national_ids(ing)
    assert k1.version == 3
    assert ha_p1 == set(_operator_level1(ing)[0].values()) == set(xid.tokenize(k1, ids))
    assert set(_tokens(ing, a)["token"]) == set(xid.rekey(k2, xid.tokenize(k1, ids)))
    # The operator applied the mapping once; the authority logged the rotation once.
    entries = [decode_leaf(leaf).entry.event for kind, _, leaf in ledger_entries(ing.fed)
               if kind in ("key_rotated", "tokens_rederived")]
    assert [e.kind for e in entries].count("tokens_rederived") == 2
    assert [(e.payload["old_version"], e.payload["new_version"]) for e in entries
            if e.actor == "health-authority"] == [(1, 2), (2, 3)]
