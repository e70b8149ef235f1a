"""Shared-domain anonymization at the operator, leak tracing and crypto-shredding.

Real node processes; the data goes through `cogov govern ingest` first.
"""

import os
import sqlite3

import pandas as pd
import pyarrow.parquet as pq
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mpc import xid
from parties.domains.api import (
    CREATE_DOMAIN,
    LIST_DOMAINS,
    LOOKUP_TOKENS,
    TRACE_LEAK,
    LeakedTokens,
    SharedDomain,
    SharedDomainRequest,
    TokenLookup,
)
from parties.domains.client import domain_tokens
from parties.domains.keys import K1_NAME
from parties.node import open_node
from parties.runtime.errors import RemoteError
from parties.runtime.node_log import read_log
from parties.runtime.routes import Kind
from parties.runtime.secrets import KeyDestroyed
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
    return pd.DataFrame(rows, columns=["visit_ref", "token"])


def _keys(ing, *domain_ids: str) -> tuple[xid.XidKey, list[xid.XidKey]]:
    ha = open_node(ing.fed.state, ing.fed.topology, "health-authority")
    op = open_node(ing.fed.state, ing.fed.topology, "operator")
    try:
        return (ha.secrets.xid_key(K1_NAME),
                [op.secrets.xid_key(f"domain:{d}") for d in domain_ids])
    finally:
        ha.store.close()
        op.store.close()


def test_tokens_of_two_domains_never_match_and_follow_the_keys(ing):
    gt = pq.read_table(ing.data / "ground_truth" / "visits.parquet").to_pandas()
    domains = _domains(ing)
    a, b = domains["insurer-a"].domain_id, domains["insurer-b"].domain_id
    ta, tb = _tokens(ing, a), _tokens(ing, b)
    assert len(ta) == len(tb) == len(gt)
    assert set(ta["token"]).isdisjoint(set(tb["token"]))
    persons = gt["national_id"].nunique()
    assert ta["token"].nunique() == tb["token"].nunique() == persons
    # Every stored token is k2[d]·k1·H(id) of a real person, and a domain sees each person once.
    k1, (ka, kb) = _keys(ing, a, b)
    ids = gt["national_id"].unique().tolist()
    p1 = xid.tokenize(k1, ids)
    assert set(xid.rekey(ka, p1)) == set(ta["token"])
    assert set(xid.rekey(kb, p1)) == set(tb["token"])


def test_leak_of_ten_tokens_in_noise_names_the_domain_and_data_user(ing, tmp_path):
    domains = _domains(ing)
    b = domains["insurer-b"].domain_id
    leaked = list(dict.fromkeys(_tokens(ing, b)["token"]))[:10]
    noise = [os.urandom(32) for _ in range(90)]
    rows = [t.hex() for t in leaked] + [n.hex() for n in noise]
    file = tmp_path / "leak.csv"
    pd.DataFrame({"xid": rows, "amount": range(100)}).sample(frac=1, random_state=3).to_csv(
        file, index=False)
    out = ing.cli("govern", "trace-leak", str(file))
    assert "insurer-b" in out and b in out and "insurer-a" not in out
    with ing.client("operator") as client:
        trace = client.call("operator", TRACE_LEAK, LeakedTokens(tokens=rows))
    assert [a.data_user for a in trace.attributed] == ["insurer-b"]
    assert trace.attributed[0].matched == 10
    assert trace.attributed[0].share == pytest.approx(0.1)
    assert trace.report.unmatched == 90
    with sqlite3.connect(ing.db("operator")) as conn:
        assert conn.execute(
            "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'leak_traced'").fetchone()[0] >= 2


def test_domain_requests_are_validated(ing):
    with ing.client("operator") as client:
        with pytest.raises(RemoteError) as stranger:
            client.call("operator", CREATE_DOMAIN,
                        SharedDomainRequest(scenario="claim_check", data_user="hospital-1"))
        with pytest.raises(RemoteError) as twice:
            client.call("operator", CREATE_DOMAIN,
                        SharedDomainRequest(scenario="claim_check", data_user="insurer-a"))
    assert stranger.value.http_status == 422 and stranger.value.error == "NotADataUser"
    assert twice.value.http_status == 409 and twice.value.error == "DomainExists"
    with ing.client("regulator") as client, pytest.raises(RemoteError) as not_admin:
        client.request("operator", "GET", LIST_DOMAINS.path, kind=Kind.ADMIN, check_flow=False)
    assert not_admin.value.http_status == 403


def test_deleted_domain_is_shredded_for_good(ing):
    domains = _domains(ing)
    a = domains["insurer-a"].domain_id
    sample = _tokens(ing, a)["token"].head(5).tolist()
    ids = pq.read_table(ing.data / "ground_truth" / "visits.parquet",
                        columns=["national_id"]).to_pandas()["national_id"].head(3).tolist()
    with ing.client("insurer-a") as insurer:
        before = domain_tokens(insurer, ids)
    # The attacker's backup from before the shred: the store and the KEK of that day.
    root = ing.fed.state.node("operator").root
    old_kek = (root / "kek.key").read_bytes()
    backup = ing.fed.state.root / "operator-backup.db"
    with sqlite3.connect(f"file:{ing.db('operator')}?mode=ro", uri=True) as live, \
            sqlite3.connect(backup) as copy:
        live.backup(copy)
    out = ing.cli("domain", "delete", a, "--yes")
    assert "destroyed" in out
    # The KEK rotated with the shred: the backup's sealed key opens under the old KEK only.
    with sqlite3.connect(backup) as copy:
        (sealed,) = copy.execute("SELECT sealed FROM xid_keys WHERE name = ?",
                                 (f"domain:{a}",)).fetchone()
    sealed, name = bytes(sealed), f"domain:{a}".encode()
    assert AESGCM(old_kek).decrypt(sealed[:12], sealed[12:], name)  # the control
    new_kek = (root / "kek.key").read_bytes()
    assert new_kek != old_kek and not (root / "kek.key.next").exists()
    with pytest.raises(InvalidTag):
        AESGCM(new_kek).decrypt(sealed[:12], sealed[12:], name)
    assert [e for e in read_log(ing.fed.state.node("operator").log)
            if e["event"] == "kek_rotated"]
    # The key is gone from the operator's store and cannot be brought back.
    op = open_node(ing.fed.state, ing.fed.topology, "operator")
    try:
        with pytest.raises(KeyDestroyed):
            op.secrets.xid_key(f"domain:{a}")
        with pytest.raises(KeyDestroyed):
            op.secrets.xid_key(f"domain:{a}", create=True)
    finally:
        op.store.close()
    assert _tokens(ing, a).empty
    with ing.client("insurer-a") as insurer, pytest.raises(RemoteError) as oprf:
        domain_tokens(insurer, ids)
    assert oprf.value.http_status == 410 and oprf.value.error == "DomainDeleted"
    with ing.client("operator") as client, pytest.raises(RemoteError) as lookup:
        client.call("operator", LOOKUP_TOKENS, TokenLookup(tokens=[t.hex() for t in sample]),
                    params={"domain_id": a})
    assert lookup.value.http_status == 410
    with sqlite3.connect(ing.db("operator")) as conn:
        events = conn.execute(
            "SELECT kind FROM ledger_entries WHERE kind IN ('key_destroyed', 'domain_deleted',"
            " 'query_refused')").fetchall()
    assert ("key_destroyed",) in events and ("domain_deleted",) in events
    # A new domain for the same data user has a new key: the old tokens do not come back.
    ing.cli("domain", "create", "--data-user", "insurer-a")
    with ing.client("insurer-a") as insurer:
        after = domain_tokens(insurer, ids)
    assert set(after).isdisjoint(before)
    listed = ing.cli("domain", "list", "--all")
    assert a[:10] in listed
