"""Rotation of a domain key k2[d] at the operator, on real node processes.

The federation has ingested generated data (`cogov govern ingest`), which created
the claim_check domains of insurer-a and insurer-b.
"""

import sqlite3

import pandas as pd
import pyarrow.parquet as pq
import pytest

from governance.ledger.events import decode_leaf
from mpc import xid
from parties.errors import RemoteError
from parties.insurer_oprf import domain_tokens
from parties.server import open_node
from parties.services.health_authority import K1_NAME
from parties.services.key_rotation import rotate_domain_key
from tests.attack_helpers import ledger_entries, read_only, rows_checksum
from tests.test_circulation import start


@pytest.fixture(scope="module")
def ing(tmp_path_factory):
    ingested = start(tmp_path_factory, cli_ingest=True)
    yield ingested
    ingested.fed.down()


def _domains(ing) -> dict[str, dict]:
    with ing.client("operator") as client:
        return {d["data_user"]: d for d in client.get("operator", "/v1/domains",
                                                       kind="admin").json()}


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
    a, b = domains["insurer-a"]["domain_id"], domains["insurer-b"]["domain_id"]
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
        old = client.post("operator", f"/v1/domains/{a}/lookup", kind="admin",
                          json={"tokens": [t.hex() for t in before]}).json()
        new = client.post("operator", f"/v1/domains/{a}/lookup", kind="admin",
                          json={"tokens": [t.hex() for t in after]}).json()
    assert old["matched"] == 0 and new["matched"] == len(set(after))
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
        again = client.post("operator", f"/v1/domains/{a}/rotate", kind="admin").json()
    assert (again["old_version"], again["new_version"], again["tokens"]) == (2, 3, len(stored_a))
    with ing.client("insurer-a") as insurer:
        third = domain_tokens(insurer, sample)
    assert set(third) <= set(_tokens(ing, a)["token"]) and set(third).isdisjoint(after)


def test_failed_rotation_rolls_back_tokens_and_key_together(ing, monkeypatch):
    a = _domains(ing)["insurer-a"]["domain_id"]
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
        pool = op.extras.get("xid_pool")
        if pool is not None:
            pool.close()
        op.store.close()
    assert _state(ing) == state


def test_rotation_of_an_unknown_or_deleted_domain_is_refused_and_changes_nothing(ing):
    b = _domains(ing)["insurer-b"]["domain_id"]
    ing.cli("domain", "delete", b, "--yes")
    state = _state(ing)
    with ing.client("operator") as client:
        with pytest.raises(RemoteError) as unknown:
            client.post("operator", "/v1/domains/dom-0123456789abcdef/rotate", kind="admin")
        with pytest.raises(RemoteError) as deleted:
            client.post("operator", f"/v1/domains/{b}/rotate", kind="admin")
        with pytest.raises(RemoteError) as malformed:
            client.post("operator", "/v1/domains/not-a-domain/rotate", kind="admin")
    assert (unknown.value.http_status, unknown.value.error) == (404, "UnknownDomain")
    assert (deleted.value.http_status, deleted.value.error) == (410, "DomainDeleted")
    assert malformed.value.http_status == 422
    with ing.client("regulator") as client, pytest.raises(RemoteError) as not_admin:
        client.post("operator", f"/v1/domains/{b}/rotate", kind="admin", check_flow=False)
    assert not_admin.value.http_status == 403
    assert _state(ing) == state
