"""The blinded OPRF chain through real nodes: insurer -> regulator -> operator -> authority."""

import sqlite3

import pyarrow.parquet as pq
import pytest

from mpc import xid
from parties.domains.api import DOMAIN_TOKENS, EVALUATE, LOOKUP_TOKENS, RelayRequest, TokenLookup
from parties.domains.client import domain_tokens
from parties.domains.keys import K1_NAME
from parties.domains.service import RATE_ENV
from parties.node import open_node
from parties.runtime.errors import FlowNotAllowed, RemoteError
from parties.runtime.routes import Kind
from tests.test_circulation import start

# A small budget so the test can exhaust it: 1500 ids at once, 20 more per second.
RATE = "1500/20"


@pytest.fixture(scope="module")
def ing(tmp_path_factory):
    ingested = start(tmp_path_factory, {RATE_ENV: RATE}, cli_ingest=True)
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


def test_malformed_points_are_refused_before_any_key_is_applied(ing):
    with ing.client("insurer-a") as insurer, pytest.raises(RemoteError) as bad:
        insurer.call("regulator", DOMAIN_TOKENS, RelayRequest(points=["00" * 32]))
    assert bad.value.http_status == 422 and bad.value.error == "MalformedInput"


def test_only_insurers_call_the_relay_and_only_the_regulator_the_operator(ing):
    with ing.client("hospital-1") as hospital, pytest.raises(FlowNotAllowed):
        hospital.request("regulator", "POST", DOMAIN_TOKENS.path, kind=Kind.OPRF, json={})
    with ing.client("insurer-b") as insurer, pytest.raises(RemoteError) as direct:
        insurer.request("operator", "POST", EVALUATE.path, kind=Kind.OPRF, check_flow=False,
                        json={"data_user": "insurer-a", "points": ["00" * 32]})
    assert direct.value.http_status == 403


def test_requests_over_the_rate_limit_are_refused_and_logged(ing):
    blinded, _ = xid.blind([f"probe-{i}" for i in range(1000)])
    body = RelayRequest(points=[p.hex() for p in blinded])
    refused = None
    with ing.client("insurer-b") as insurer:
        for _ in range(4):
            try:
                insurer.call("regulator", DOMAIN_TOKENS, body)
            except RemoteError as exc:
                refused = exc
                break
    assert refused is not None, "the budget of 1500 ids must run out within 4000"
    assert refused.http_status == 429 and refused.error == "RateLimited"
    with sqlite3.connect(ing.db("operator")) as conn:
        logged = conn.execute(
            "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'query_refused'").fetchone()[0]
        counted = conn.execute(
            "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'oprf_evaluated'").fetchone()[0]
        refusals = conn.execute(
            "SELECT error FROM refusals WHERE route = ?", (EVALUATE.path,)).fetchall()
    assert logged >= 1 and counted >= 1 and ("RateLimited",) in refusals
    # The regulator passed the refusal on as its own typed one, recorded and logged.
    with sqlite3.connect(ing.db("regulator")) as conn:
        relayed = conn.execute("SELECT caller, error FROM refusals WHERE route = ?",
                               (DOMAIN_TOKENS.path,)).fetchall()
    assert ("insurer-b", "RateLimited") in relayed
    assert '"oprf_refused"' in ing.fed.state.node("regulator").log.read_text()
    # The other insurer's budget is its own.
    with ing.client("insurer-a") as insurer:
        assert len(domain_tokens(insurer, _ids(ing, 3))) == 3
