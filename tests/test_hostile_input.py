"""Hostile input against real nodes: oversized and slow clients are cut off, and malformed
entries, tokens, ciphertexts, shares and batches are refused with typed errors that
change nothing.

Property-based cases (hypothesis) send generated garbage through mutual TLS as the
caller the topology allows, and compare the target's store (row count of every
table, the refusal record and log tables aside) before and after each request.
"""

import hashlib
import json
import secrets
import struct
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from governance.ledger.signing import sign_document
from mpc.hazmat import group
from mpc.hazmat.group import is_valid_point
from parties.agreements.api import REGISTER_CONSENT
from parties.claims.api import (
    COMPUTE,
    KEEP_HE_CONTEXT,
    SHARE_TABLE,
    SHARE_TABLE_DOMAIN_HEADER,
)
from parties.domains.api import CREATE_DOMAIN, DOMAIN_TOKENS, LEVEL1_STEP, SharedDomainRequest
from parties.domains.batch import SIGNATURE_DOMAIN
from parties.ingest.api import EXPORT_BATCHES
from parties.ledger.api import APPEND_ENTRIES
from parties.runtime.api import PING
from parties.runtime.mtls_server import HANDSHAKE_TIMEOUT_S, HEADER_TIMEOUT_S
from parties.runtime.node_log import NODE_HEADER
from parties.runtime.pki import load_signing_key
from tests.attack_helpers import (
    REFUSAL_TABLES,
    closed_by_peer,
    events,
    node_address,
    open_tls,
    refusal_rows,
    table_counts,
    tls_context_for,
    wait_for,
)
from tests.federation import Federation

NODES = ["hospital-1", "health-authority", "operator", "regulator", "insurer-a"]
MiB = 1024 * 1024
FUZZ = settings(max_examples=20, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


class Callers:
    """One kept-alive mTLS client per calling node."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self._clients: dict[str, httpx.Client] = {}

    def request(self, caller: str, target: str, method: str, path: str, **kw) -> httpx.Response:
        client = self._clients.get(caller)
        if client is None:
            client = self._clients[caller] = httpx.Client(
                verify=tls_context_for(self.fed.state, caller), timeout=60)
        headers = {NODE_HEADER: caller, **kw.pop("headers", {})}
        return client.request(method, self.fed.topology.node(target).url + path,
                              headers=headers, **kw)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("hostile"), nodes=NODES)
    fed.up()
    try:
        callers = Callers(fed)
        # insurer-a's shared domain exists, so OPRF requests reach the point checks.
        from parties.runtime.client import NodeClient

        with NodeClient(fed.state, fed.topology, "operator") as client:
            client.call("operator", CREATE_DOMAIN,
                        SharedDomainRequest(scenario="claim_check", data_user="insurer-a"))
        fed.callers = callers
        yield fed
        callers.close()
    finally:
        fed.down()


def _typed(response: httpx.Response, *errors: str, statuses=range(400, 500)) -> str:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) >= {"error", "detail"}, body
    if errors:
        assert body["error"] in errors, body
    return body["error"]


def _unchanged(fed: Federation, node: str):
    """Context: the node's store has the same rows in every table afterwards."""

    class Guard:
        def __enter__(self):
            self.before = table_counts(fed.state.node(node).db, skip=REFUSAL_TABLES)

        def __exit__(self, *exc):
            if exc[0] is None:
                after = table_counts(fed.state.node(node).db, skip=REFUSAL_TABLES)
                assert after == self.before, f"{node} store changed on a refused request"

    return Guard()


# --- first, while no key exists yet ------------------------------------------------------


def _signed_points(fed: Federation, points: list[bytes]) -> dict:
    """An insurer-a batch of arbitrary point bytes, signed in the batch format (written out
    here, so a valid signature reaches the point checks whatever the bytes are)."""
    body = {"data_user": "insurer-a", "scenario": "claim_check", "request_id": "fuzz",
            "batch_id": secrets.token_hex(16), "expires_at": int(time.time()) + 60,
            "points": [p.hex() for p in points]}
    signed = {k: v for k, v in body.items() if k != "points"}
    signed["points_sha256"] = hashlib.sha256(b"".join(points)).hexdigest()
    key = load_signing_key(fed.state, "insurer-a")
    return {**body, "signature": sign_document(key, SIGNATURE_DOMAIN, signed)}


def test_refused_level1_request_writes_no_key(fed):
    """A validly signed batch whose operator step carries a small-order point."""
    step = {"key_id": "domain:dom-0000000000000000", "key_version": 1,
            "points": ["00" * 32], "proof": "00" * 64}
    body = {"batch": _signed_points(fed, [group.base_mult(5)]), "domain_step": step,
            "domain_commitment": group.base_mult(7).hex()}
    with _unchanged(fed, "health-authority"):
        response = fed.callers.request("operator", "health-authority", "POST",
                                       LEVEL1_STEP.path, json=body)
        _typed(response, "MalformedInput")


# --- cut-offs ---------------------------------------------------------------------------


def test_100_mib_body_is_refused_with_413_before_it_is_read(fed):
    body = b"\x00" * (100 * MiB)
    for caller, target, method, path in (
        ("insurer-a", "regulator", "POST", REGISTER_CONSENT.path),    # a JSON route
        ("hospital-1", "health-authority", "PUT",
         EXPORT_BATCHES.batch.url(stream="s-1", idx=0)),  # a batch route
    ):
        started = time.monotonic()
        with _unchanged(fed, target):
            response = fed.callers.request(caller, target, method, path, content=body,
                                           headers={"Content-Type": "application/json"})
        seconds = time.monotonic() - started
        _typed(response, "BodyTooLarge", statuses=(413,))
        assert response.headers.get("connection") == "close"
        assert seconds < 20, seconds  # liveness bound: refused on the header, not after reading
        assert (path, "BodyTooLarge") in [r[1:3] for r in refusal_rows(fed, target)]
    # The node still serves.
    assert fed.callers.request("insurer-a", "regulator", "GET", PING.path).status_code == 200


def test_chunked_body_without_length_is_refused(fed):
    def chunks():
        for _ in range(4):
            yield b"{" * 1024

    response = fed.callers.request("insurer-a", "regulator", "POST", REGISTER_CONSENT.path,
                                   content=chunks(),
                                   headers={"Content-Type": "application/json"})
    _typed(response, "LengthRequired", statuses=(411,))


def test_slowloris_and_stalled_handshake_are_dropped(fed):
    """Headers sent a byte at a time, and a TCP connection that never starts TLS, are both
    closed within their bounds (run side by side)."""
    results: dict[str, float | None] = {}

    def slowloris() -> None:
        sock = open_tls(fed, "insurer-a", "regulator")
        started = time.monotonic()
        request = b"GET /v1/ping HTTP/1.1\r\nHost: regulator\r\nX-Cogov-Node: insurer-a\r\n"
        try:
            for byte in request * 10:
                sock.send(bytes([byte]))
                if closed_by_peer(sock, within=0.5) is not None:
                    break
        except OSError:
            pass
        results["slowloris"] = time.monotonic() - started
        sock.close()

    def stalled() -> None:
        import socket

        sock = socket.create_connection(node_address(fed, "regulator"), timeout=5)
        results["handshake"] = closed_by_peer(sock, within=HANDSHAKE_TIMEOUT_S + 10)
        sock.close()

    threads = [threading.Thread(target=slowloris), threading.Thread(target=stalled)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results["slowloris"] < HEADER_TIMEOUT_S + 5, results
    assert results["handshake"] is not None
    assert results["handshake"] < HANDSHAKE_TIMEOUT_S + 5, results
    dropped = wait_for(lambda: events(fed, "regulator", "connection_dropped"))
    assert "request headers" in dropped[-1]["reason"]
    refused = wait_for(lambda: [e for e in events(fed, "regulator", "tls_refused")
                                if "handshake" in e["reason"]])
    assert refused
    assert fed.callers.request("insurer-a", "regulator", "GET", PING.path).status_code == 200


# --- malformed log entries --------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8,
)
entry_like = st.fixed_dictionaries({
    "event": st.fixed_dictionaries({
        "kind": st.sampled_from(["data_registered", "query_answered", "nope", ""]),
        "actor": st.sampled_from(["health-authority", "regulator", "x"]),
        "timestamp_ms": st.integers(min_value=-5, max_value=2**60),
        "request_id": st.text(max_size=10),
        "payload": st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    }),
    "signature": st.text(alphabet="0123456789abcdef", min_size=0, max_size=130),
})


@FUZZ
@given(body=st.one_of(st.lists(entry_like, min_size=1, max_size=3), json_values))
def test_malformed_log_entries_are_refused_and_append_nothing(fed, body):
    with _unchanged(fed, "operator"):
        response = fed.callers.request("health-authority", "operator", "POST",
                                       APPEND_ENTRIES.path, json=body)
        _typed(response)


# --- malformed tokens (OPRF points) ------------------------------------------------------


@FUZZ
@given(points=st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=4))
def test_malformed_oprf_points_are_refused_before_any_key_is_applied(fed, points):
    all_valid = all(len(p) == 32 and is_valid_point(p) for p in points)
    with _unchanged(fed, "operator"):
        response = fed.callers.request("insurer-a", "regulator", "POST",
                                       DOMAIN_TOKENS.path, json=_signed_points(fed, points))
    if all_valid:
        assert response.status_code in (200, 429), response.text
    else:
        _typed(response)


# --- malformed ciphertexts and shares ----------------------------------------------------


def _framed(head: dict, payload: bytes) -> bytes:
    data = json.dumps(head).encode()
    return struct.pack("!I", len(data)) + data + payload


COMPUTE_HEAD = {"contract_id": "c-1", "insurer": "insurer-a", "mode": "ss", "k": 4,
                "n_claims": 1, "consent_of_claim": ["consent-x"], "consents": []}


@FUZZ
@given(body=st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=300).map(lambda b: _framed(COMPUTE_HEAD, b)),
    st.binary(min_size=48, max_size=300).map(lambda b: _framed(
        {**COMPUTE_HEAD, "mode": "he", "he_context": "ab" * 32}, b)),
))
def test_malformed_claim_ciphertexts_are_refused_by_the_operator(fed, body):
    with _unchanged(fed, "operator"):
        response = fed.callers.request("regulator", "operator", COMPUTE.method, COMPUTE.path,
                                       content=body,
                                       headers={"Content-Type": "application/octet-stream"})
        _typed(response, "MalformedInput", "ValueError")


@settings(max_examples=8, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(context=st.binary(max_size=2000))
def test_malformed_he_contexts_are_refused(fed, context):
    with _unchanged(fed, "operator"):
        response = fed.callers.request(
            "regulator", "operator", KEEP_HE_CONTEXT.method, KEEP_HE_CONTEXT.path,
            content=context, headers={"Content-Type": "application/octet-stream"})
        _typed(response, "MalformedInput")


def _share_blob(kind: int, dims: list[int], payload: bytes) -> bytes:
    from mpc.claim import ss_shares

    return (ss_shares.MAGIC + struct.pack("!BB", kind, len(dims))
            + struct.pack(f"!{len(dims)}Q", *dims) + payload)


share_blobs = st.one_of(
    st.binary(max_size=100),
    st.builds(_share_blob, st.integers(0, 255), st.lists(st.integers(0, 2**40), max_size=3),
              st.binary(max_size=200)),
    st.builds(_share_blob, st.just(2), st.lists(st.integers(0, 8), min_size=1, max_size=3),
              st.binary(max_size=200)),
)


@FUZZ
@given(blob=share_blobs)
def test_malformed_share_tables_are_refused(fed, blob):
    from mpc.claim import ss_shares

    response = fed.callers.request("operator", "regulator", SHARE_TABLE.method,
                                   SHARE_TABLE.url(table_id="fuzz1"), content=blob,
                                   headers={SHARE_TABLE_DOMAIN_HEADER: "d-fuzz"})
    if response.status_code == 200:  # a well-formed int64 [rows, 3] table is kept, by design
        table = ss_shares.unpack(blob, ss_shares.KIND_ROWS)
        assert table.ndim == 2 and table.shape[1] == 3
    else:
        _typed(response, "MalformedInput")


# --- malformed Arrow batches and consents -----------------------------------------------


@FUZZ
@given(data=st.binary(max_size=300), lie=st.booleans())
def test_malformed_export_batches_are_refused(fed, data, lie):
    import hashlib

    digest = hashlib.sha256(data + (b"x" if lie else b"")).hexdigest()
    with _unchanged(fed, "health-authority"):
        response = fed.callers.request("hospital-1", "health-authority", "PUT",
                                       EXPORT_BATCHES.batch.url(stream="fuzz-stream", idx=0),
                                       content=data,
                                       headers={"X-Batch-Digest": digest})
        _typed(response, "MalformedBatch", "RequestValidationError", "ValueError")


@FUZZ
@given(document=json_values)
def test_malformed_consents_are_refused(fed, document):
    with _unchanged(fed, "regulator"):
        response = fed.callers.request("insurer-a", "regulator", "POST",
                                       REGISTER_CONSENT.path, json=document)
        _typed(response)
