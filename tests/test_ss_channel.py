"""The mTLS channel, its wire format, and the dealer's input checks."""

from __future__ import annotations

import socket
import ssl
import threading

import numpy as np
import pytest
import torch

from mpc.certificates import make_pki, tls_contexts
from mpc.claim import ss_shares
from mpc.errors import MalformedInput
from mpc.ss.channel import ChannelError, MtlsChannel
from mpc.ss.dealer import _Tuples
from mpc.ss.prng import StreamGenerator, new_seed
from mpc.ss.wire import FRAME_TENSORS, decode_tensors, encode_tensors


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def _open_all(materials: dict, names: list[str], timeout: float = 10.0) -> dict:
    """Open one channel per name concurrently; returns name -> channel or exception."""
    listeners = {n: _listener() for n in names}
    addresses = {n: ("127.0.0.1", listeners[n].getsockname()[1]) for n in names}
    out: dict = {}

    def run(name):
        server, client = tls_contexts(materials[name])
        try:
            out[name] = MtlsChannel.open(name, addresses, server, client, timeout,
                                         listener=listeners[name])
        except Exception as exc:
            out[name] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return out


def test_frames_travel_over_tls13_between_named_parties():
    pki = make_pki(["alice", "bob", "carol"])
    channels = _open_all(pki, ["alice", "bob", "carol"])
    try:
        assert all(isinstance(c, MtlsChannel) for c in channels.values()), channels
        a, b = channels["alice"], channels["bob"]
        payload = encode_tensors([torch.arange(10_000), torch.tensor([True, False])])
        a.send("bob", FRAME_TENSORS, payload)
        got = decode_tensors(b.recv("alice", FRAME_TENSORS, timeout=5))
        assert torch.equal(got[0], torch.arange(10_000))
        assert got[1].tolist() == [True, False]
        info = a.connection_info()
        assert {p: i["tls_version"] for p, i in info.items()} == {"bob": "TLSv1.3",
                                                                  "carol": "TLSv1.3"}
        assert info["bob"]["peer_names"] == ["bob"]
        assert a.stats()["bob"]["sent"] == len(payload) + 9
        with pytest.raises(ChannelError, match="expected frame kind"):
            b.send("alice", 2, b"{}")
            a.recv("bob", FRAME_TENSORS, timeout=5)
    finally:
        for c in channels.values():
            if isinstance(c, MtlsChannel):
                c.close()


def test_closed_peer_is_reported():
    pki = make_pki(["alice", "bob"])
    channels = _open_all(pki, ["alice", "bob"])
    channels["bob"].close()
    with pytest.raises(ChannelError, match="closed"):
        channels["alice"].recv("bob", FRAME_TENSORS, timeout=5)
    channels["alice"].close()


def test_a_certificate_for_another_name_is_refused():
    pki = make_pki(["alice", "bob", "mallory"])
    # mallory holds a valid federation certificate, but not bob's: it tries to be bob
    forged = dict(pki)
    forged["bob"] = pki["mallory"]
    channels = _open_all(forged, ["alice", "bob"], timeout=3)
    assert isinstance(channels["alice"], ChannelError)
    assert isinstance(channels["bob"], ChannelError)


def test_a_certificate_from_another_ca_is_refused():
    pki = make_pki(["alice"])
    stranger = make_pki(["bob"], ca_name="other-ca")
    channels = _open_all({**pki, **stranger}, ["alice", "bob"], timeout=3)
    assert isinstance(channels["alice"], ChannelError)
    assert isinstance(channels["bob"], ChannelError)


def test_contexts_must_require_client_certificates():
    pki = make_pki(["alice"])
    _, client = tls_contexts(pki["alice"])
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ChannelError, match="require"):
        MtlsChannel.open("alice", {"alice": ("127.0.0.1", 1)}, lax, client)


@pytest.mark.parametrize("blob", [b"", b"\x01", b"\x01\x09\x01" + b"\x00" * 8,
                                  encode_tensors([torch.arange(4)]) + b"x",
                                  encode_tensors([torch.arange(4)])[:-1]])
def test_garbage_tensor_frames_are_refused(blob):
    with pytest.raises(MalformedInput):
        decode_tensors(blob)


def test_share_blobs_are_checked():
    values = np.arange(12, dtype=np.int64).reshape(4, 3)
    s0, s1 = ss_shares.split(values)
    assert (ss_shares.combine(s0, s1) == values).all()
    blob = ss_shares.pack(ss_shares.KIND_CLAIMS, s0)
    assert (ss_shares.unpack(blob, ss_shares.KIND_CLAIMS, (4, 3)) == s0).all()
    for bad, kind, shape in [
        (b"garbage", ss_shares.KIND_CLAIMS, None),
        (blob[:-3], ss_shares.KIND_CLAIMS, None),
        (blob, ss_shares.KIND_RESULT, None),
        (blob, ss_shares.KIND_CLAIMS, (3, 3)),
    ]:
        with pytest.raises(MalformedInput):
            ss_shares.unpack(bad, kind, shape)


@pytest.mark.parametrize("request_", [
    None, {"fn": "steal"}, {"fn": "additive", "args": [[2], [2]]},
    {"fn": "additive", "args": [[2], [2], "__import__"]},
    {"fn": "square", "args": [[-1]]}, {"fn": "square", "args": [[1 << 20, 1 << 20]]},
    {"fn": "B2A", "args": ["3"]},
])
def test_dealer_refuses_malformed_requests(request_):
    with pytest.raises(MalformedInput):
        _Tuples([bytes(range(32)), bytes(range(32, 64))]).answer(request_)


def test_dealer_triples_are_consistent():
    """The dealer's correction share completes a valid Beaver triple."""
    from crypten.common.rng import generate_random_ring_element

    seeds = [new_seed(), new_seed()]
    tuples = _Tuples(seeds)
    c0 = tuples.answer({"fn": "additive", "args": [[5], [5], "mul"]})
    gens = [StreamGenerator(s) for s in seeds]
    a = [generate_random_ring_element((5,), generator=g) for g in gens]
    b = [generate_random_ring_element((5,), generator=g) for g in gens]
    c1 = generate_random_ring_element((5,), generator=gens[1])
    assert torch.equal(c0 + c1, (a[0] + a[1]) * (b[0] + b[1]))
