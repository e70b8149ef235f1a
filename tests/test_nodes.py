"""Real node processes on loopback: mutual TLS, identities, flows, lifecycle."""

import datetime as dt
import ssl
import time

import httpx
import pytest

from parties.runtime import pki, supervisor
from parties.runtime.api import PING
from parties.runtime.client import NodeClient
from parties.runtime.errors import FlowNotAllowed, IdentityMismatch, RemoteError
from parties.runtime.node_log import NODE_HEADER, read_log
from parties.runtime.routes import Kind
from parties.runtime.state import StateDir
from parties.runtime.tls import client_context
from tests.federation import Federation


def _events(fed: Federation, node: str, event: str) -> list[dict]:
    return [e for e in read_log(fed.state.node(node).log) if e["event"] == event]


def _wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def test_allowed_cross_domain_call_succeeds_and_carries_request_id(small_federation):
    fed = small_federation
    with NodeClient(fed.state, fed.topology, "health-authority", log=None) as client:
        response = client.send("operator", PING, headers={"X-Request-ID": "rid-allowed-1"})
    body = response.json()
    assert body["caller"] == "health-authority" and body["trust_domain"] == "gov-net"
    # The operator knows the request by the log id derived from it, and answers it.
    rid = fed.log_id("health-authority", "operator", "rid-allowed-1")
    assert response.headers["X-Request-ID"] == rid
    assert any(e["request_id"] == rid for e in _events(fed, "operator", "request"))


def test_flow_missing_from_topology_is_refused_with_403_and_logged(small_federation):
    fed = small_federation
    with NodeClient(fed.state, fed.topology, "hospital-1") as client:
        with pytest.raises(FlowNotAllowed):
            client.send("insurer-a", PING)  # refused before sending
        with pytest.raises(RemoteError) as refused:
            client.send("insurer-a", PING, check_flow=False,
                        headers={"X-Request-ID": "rid-forbidden-1"})
    assert refused.value.http_status == 403
    assert refused.value.error == "FlowNotAllowed"
    logged = _events(fed, "insurer-a", "refused")
    rid = fed.log_id("hospital-1", "insurer-a", "rid-forbidden-1")
    assert any(e["request_id"] == rid and e["error"] == "FlowNotAllowed"
               for e in logged)


def _raw_get(fed: Federation, ctx: ssl.SSLContext, target: str, headers=None) -> httpx.Response:
    url = fed.topology.node(target).url + PING.path
    with httpx.Client(verify=ctx, timeout=5) as http:
        return http.get(url, headers=headers or {})


def _client_without_certificate(fed: Federation) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(fed.state.ca.cert)
    return ctx


def _tls_refusals(fed: Federation, node: str) -> list[dict]:
    return _events(fed, node, "tls_refused")


def test_client_without_certificate_is_refused_and_logged(small_federation):
    fed = small_federation
    before = len(_tls_refusals(fed, "operator"))
    with pytest.raises(httpx.TransportError):
        _raw_get(fed, _client_without_certificate(fed), "operator")
    refusals = _wait_for(lambda: _tls_refusals(fed, "operator")[before:])
    assert refusals and "certificate" in refusals[-1]["reason"].lower()


def test_certificate_from_another_ca_is_refused(small_federation, tmp_path):
    fed = small_federation
    rogue = StateDir(tmp_path / "rogue")
    pki.init_ca(rogue, "rogue")
    pki.issue_node_certificate(rogue, "health-authority", "127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(fed.state.ca.cert)  # trusts the real server ...
    ctx.load_cert_chain(rogue.node("health-authority").cert, rogue.node("health-authority").key)
    before = len(_tls_refusals(fed, "operator"))
    with pytest.raises(httpx.TransportError):
        _raw_get(fed, ctx, "operator")
    refusals = _wait_for(lambda: _tls_refusals(fed, "operator")[before:])
    assert refusals
    assert "unable to get local issuer" in refusals[-1]["reason"].lower()


def _context_for(state: StateDir, cert_dir_name: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(state.ca.cert)
    paths = state.node(cert_dir_name)
    ctx.load_cert_chain(paths.cert, paths.key)
    return ctx


def test_expired_certificate_is_refused(small_federation, tmp_path):
    fed = small_federation
    # A certificate for a name of the topology, issued by the real CA, already expired.
    copy = StateDir(tmp_path / "expired")
    copy.ca.root.mkdir(parents=True)
    for f in ("ca.key", "ca.crt", "crl.pem", "issued.json"):
        (copy.ca.root / f).write_bytes((fed.state.ca.root / f).read_bytes())
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    pki.issue_node_certificate(copy, "hospital-1", "127.0.0.1", not_before=long_ago,
                               validity=dt.timedelta(days=1))
    before = len(_tls_refusals(fed, "health-authority"))
    with pytest.raises(httpx.TransportError):
        _raw_get(fed, _context_for(copy, "hospital-1"), "health-authority")
    refusals = _wait_for(lambda: _tls_refusals(fed, "health-authority")[before:])
    assert refusals and "expired" in refusals[-1]["reason"].lower()


def test_certificate_for_a_name_outside_the_topology_is_refused(small_federation, tmp_path):
    fed = small_federation
    copy = StateDir(tmp_path / "stranger")
    copy.ca.root.mkdir(parents=True)
    for f in ("ca.key", "ca.crt", "crl.pem", "issued.json"):
        (copy.ca.root / f).write_bytes((fed.state.ca.root / f).read_bytes())
    pki.issue_node_certificate(copy, "mallory", "127.0.0.1")
    response = _raw_get(fed, _context_for(copy, "mallory"), "operator")
    assert response.status_code == 403 and response.json()["error"] == "UnknownNode"


def test_subject_not_the_node_it_claims_to_be_is_refused(small_federation):
    fed = small_federation
    ctx = client_context(fed.state, "hospital-1")
    response = _raw_get(fed, ctx, "health-authority", headers={NODE_HEADER: "operator"})
    assert response.status_code == 403
    assert response.json()["error"] == IdentityMismatch.__name__
    refused = _events(fed, "health-authority", "refused")
    assert refused[-1]["error"] == "IdentityMismatch"


def test_openapi_document_is_served(small_federation):
    fed = small_federation
    with NodeClient(fed.state, fed.topology, "operator") as client:
        doc = client.request("operator", "GET", "/openapi.json", kind=Kind.PING).json()
    assert PING.path in doc["paths"]


def test_up_twice_starts_no_second_copy(small_federation):
    fed = small_federation
    pids = {n.name: supervisor.running_pid(fed.state, n.name) for n in fed.topology.nodes}
    fed.up()
    again = {n.name: supervisor.running_pid(fed.state, n.name) for n in fed.topology.nodes}
    assert pids == again and all(pids.values())


def test_store_is_sqlite_in_wal_mode_with_migrations(small_federation):
    import sqlite3

    db = small_federation.state.node("operator").db
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    versions = dict(conn.execute(
        "SELECT component, MAX(version) FROM schema_migrations GROUP BY component"))
    assert versions["node"] >= 1
    conn.close()


def test_revoked_certificate_is_refused_then_down_leaves_no_process(tmp_path):
    fed = Federation(tmp_path, nodes=["hospital-1", "health-authority"])
    fed.up()
    try:
        with NodeClient(fed.state, fed.topology, "hospital-1") as client:
            assert client.send("health-authority", PING).status_code == 200
        pki.revoke_node(fed.state, "hospital-1")
        with NodeClient(fed.state, fed.topology, "hospital-1") as client, \
                pytest.raises(Exception) as refused:
            client.send("health-authority", PING)
        assert "NodeUnavailable" in type(refused.value).__name__
        reasons = _wait_for(lambda: _tls_refusals(fed, "health-authority"))
        assert reasons and "revoked" in reasons[-1]["reason"].lower()
    finally:
        pids = [supervisor.running_pid(fed.state, n.name) for n in fed.topology.nodes]
        outcome = fed.down()
    assert set(outcome.values()) <= {"stopped", "killed"}
    assert all(pids)
    assert not [pid for pid in pids if supervisor._alive(pid)]
