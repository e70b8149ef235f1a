"""The C extension mpc.hazmat._x25519: X25519 and Elligator 2 batches on both paths.

The vector and cross-checks run on the portable path and on the dispatched one
(AVX-512 IFMA on a CPU that has it, see `ifma_available()`), against published
vectors, libsodium and a pure-Python reference.
"""

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nacl.bindings as sodium
import nacl.exceptions
import pytest

from mpc.errors import MalformedInput
from mpc.hazmat import _x25519, group

P = group.FIELD_PRIME
A = 486662
VECTORS = Path(__file__).parent / "vectors"
RFC7748 = json.loads((VECTORS / "x25519_rfc7748.json").read_text())
RFC9380 = json.loads((VECTORS / "x25519_rfc9380_elligator2.json").read_text())

X25519_PATHS = {"dispatched": _x25519.x25519_batch, "portable": _x25519.x25519_batch_portable}
ELL2_PATHS = {
    "dispatched": _x25519.elligator2_u_batch,
    "portable": _x25519.elligator2_u_batch_portable,
}
# Canonical u whose X25519 result is zero: the points of order 1, 2, 4 and 8 on the
# curve and its twist (libsodium's blocklist minus its entries >= p).
SMALL_ORDER = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    P - 1,
]


def le(n: int) -> bytes:
    return n.to_bytes(32, "little")


def be_hex(h: str) -> int:
    return int(h, 16)


def ell2_reference(t: int) -> int:
    """RFC 9380 section 6.7.1 map_to_curve_elligator2 for curve25519 (Z = 2), x only."""
    x1 = -A * pow(1 + 2 * t * t, P - 2, P) % P
    if x1 == 0:
        x1 = -A % P
    gx1 = (x1**3 + A * x1 * x1 + x1) % P
    return x1 if pow(gx1, (P - 1) // 2, P) in (0, 1) else (-x1 - A) % P


def x_double(x: int) -> int:
    """u(2Q) from u(Q) on curve25519 (x-only doubling)."""
    return (x * x - 1) ** 2 * pow(4 * x * (x * x + A * x + 1), P - 2, P) % P


def times_eight(x: int) -> int:
    return x_double(x_double(x_double(x)))


def legacy_x25519_many(scalar: bytes, us: bytes, offset: int = 0) -> bytes:
    """What group.x25519_many did before the extension: libsodium, one point per call."""
    out = []
    for i in range(0, len(us), 32):
        u = us[i : i + 32]
        if int.from_bytes(u, "little") >= P:
            raise MalformedInput(f"point {offset + i // 32}: non-canonical u-coordinate")
        try:
            out.append(sodium.crypto_scalarmult(scalar, u))
        except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError):
            raise MalformedInput(f"point {offset + i // 32}: small-order point") from None
    return b"".join(out)


def outcome(fn, *args):
    try:
        return fn(*args)
    except MalformedInput as err:
        return str(err)


def test_ifma_is_reported():
    assert isinstance(_x25519.ifma_available(), bool)


# ---------------------------------------------------------------- X25519


@pytest.mark.parametrize("path", X25519_PATHS)
def test_rfc7748_single_vectors(path):
    batch = X25519_PATHS[path]
    for v in RFC7748["single"]:
        scalar, u = bytes.fromhex(v["scalar"]), bytearray.fromhex(v["u"])
        if u[31] & 0x80:
            # RFC 7748 ignores bit 255; this API refuses it, so the masked u must give the output.
            with pytest.raises(ValueError) as refused:
                batch(scalar, bytes(u))
            assert refused.value.args == (0, "non-canonical u-coordinate")
            u[31] &= 0x7F
        assert batch(scalar, bytes(u)).hex() == v["output"]
    # both in one batch, next to each other
    scalar = bytes.fromhex(RFC7748["single"][0]["scalar"])
    u = bytes.fromhex(RFC7748["single"][0]["u"])
    assert batch(scalar, u * 9) == bytes.fromhex(RFC7748["single"][0]["output"]) * 9


@pytest.mark.parametrize("path", X25519_PATHS)
def test_rfc7748_iterated_vectors(path):
    batch = X25519_PATHS[path]
    k = u = le(9)
    for i in range(1, 1001):
        k, u = batch(k, u), k
        if str(i) in RFC7748["iterated"]:
            assert k.hex() == RFC7748["iterated"][str(i)]


@pytest.mark.parametrize("path", X25519_PATHS)
def test_random_batches_match_libsodium(path):
    batch = X25519_PATHS[path]
    rng = random.Random(7748)
    total = 0
    for n in (0, 1, 7, 8, 9, 15, 16, 17, 100):
        for _ in range(6):
            scalar = rng.randbytes(32)
            us = []
            for j in range(n):
                if j % 3 == 0:  # a point on the curve
                    us.append(sodium.crypto_scalarmult_base(rng.randbytes(32)))
                else:  # any canonical u: on the curve or on its twist
                    us.append(le(rng.randrange(2, P - 1)))
            expected = b"".join(sodium.crypto_scalarmult(scalar, u) for u in us)
            assert batch(scalar, b"".join(us)) == expected
            total += len(us)
    assert total > 1000


def test_group_x25519_many_keeps_the_libsodium_semantics():
    rng = random.Random(25519)
    scalar = rng.randbytes(32)
    candidates = [*SMALL_ORDER, P, P + 1, P + 18, 2**255 - 1]
    candidates += [u + 2**255 for u in (*SMALL_ORDER, 9, rng.randrange(P))]  # bit 255 set
    candidates += [9, 2, P - 2, rng.randrange(P)]
    for u in candidates:
        for position in (0, 3, 8, 12):
            us = [le(rng.randrange(2, P - 1)) for _ in range(13)]
            us[position] = u.to_bytes(32, "little")
            packed = b"".join(us)
            mine = outcome(group.x25519_many, scalar, packed, 40)
            assert mine == outcome(legacy_x25519_many, scalar, packed, 40), (u, position)
            if int.from_bytes(us[position], "little") in SMALL_ORDER:
                assert mine == f"point {40 + position}: small-order point"
            elif u >= P:
                assert mine == f"point {40 + position}: non-canonical u-coordinate"


@pytest.mark.parametrize("path", X25519_PATHS)
def test_the_first_bad_index_is_named(path):
    batch = X25519_PATHS[path]
    scalar = os.urandom(32)
    good = [le(random.randrange(2, P - 1)) for _ in range(20)]
    us = list(good)
    us[11], us[5] = le(P), le(0)
    with pytest.raises(ValueError) as refused:
        batch(scalar, b"".join(us))
    assert refused.value.args == (5, "small-order point")
    us[3] = le(2**255 + 9)
    with pytest.raises(ValueError) as refused:
        batch(scalar, b"".join(us))
    assert refused.value.args == (3, "non-canonical u-coordinate")
    for u in SMALL_ORDER:
        with pytest.raises(ValueError, match="small-order"):
            batch(scalar, b"".join([*good[:9], le(u)]))


@pytest.mark.parametrize("path", X25519_PATHS)
def test_malformed_arguments(path):
    batch = X25519_PATHS[path]
    with pytest.raises(ValueError, match="scalar"):
        batch(bytes(31), le(9))
    with pytest.raises(ValueError, match="multiple of 32"):
        batch(bytes(32), bytes(33))
    with pytest.raises(TypeError):
        batch(bytes(32), "not bytes")
    with pytest.raises(MalformedInput, match="multiple of 32"):
        group.x25519_many(bytes(32), bytes(40))
    assert batch(bytes(32), b"") == b""
    assert batch(bytearray(32), memoryview(le(9))) == sodium.crypto_scalarmult(bytes(32), le(9))


def test_threads_share_the_extension_safely():
    # The GIL is released during a batch; concurrent batches must not interfere.
    rng = random.Random(3)
    jobs = [
        (rng.randbytes(32), b"".join(le(rng.randrange(2, P - 1)) for _ in range(40)))
        for _ in range(8)
    ]
    expected = [_x25519.x25519_batch_portable(k, us) for k, us in jobs]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda job: _x25519.x25519_batch(*job), jobs)) == expected


# ---------------------------------------------------------------- Elligator 2


@pytest.mark.parametrize("vector", RFC9380["vectors"], ids=lambda v: v["msg"][:8] or "empty")
@pytest.mark.parametrize("path", ELL2_PATHS)
def test_rfc9380_curve25519_nu_vectors(path, vector):
    dst = RFC9380["dst"].encode()
    msg = vector["msg"].encode()
    (t,) = group.hash_to_field(msg, dst, 1)
    assert t == be_hex(vector["u0"])
    packed = group.hash_to_field_packed([msg], dst)
    assert packed == le(t)
    u = int.from_bytes(ELL2_PATHS[path](packed), "little")
    assert u == be_hex(vector["Q_x"])  # map_to_curve before cofactor clearing
    assert times_eight(u) == be_hex(vector["P_x"])  # the RFC's P = 8Q
    if path == "dispatched":
        assert group.elligator2_u_many([msg], dst) == le(u)


@pytest.mark.parametrize("path", ELL2_PATHS)
def test_elligator2_matches_the_python_reference_and_libsodium(path):
    rng = random.Random(9380)
    ts = [0, 1, 2, P - 1, (P - 1) // 2] + [rng.randrange(P) for _ in range(2000)]
    us = ELL2_PATHS[path](b"".join(le(t) for t in ts))
    for i, t in enumerate(ts):
        u = int.from_bytes(us[32 * i : 32 * i + 32], "little")
        assert u == ell2_reference(t), t
        if i % 4 == 0 and u != 0:
            # libsodium's from_uniform is the same map, to edwards25519, then times 8:
            # its y gives the Montgomery u = (1 + y) / (1 - y) of 8Q.
            y = int.from_bytes(sodium.crypto_core_ed25519_from_uniform(le(t)), "little")
            y &= (1 << 255) - 1
            assert times_eight(u) == (1 + y) * pow(1 - y, P - 2, P) % P, t


@pytest.mark.parametrize("path", ELL2_PATHS)
def test_elligator2_batch_lengths_and_refusals(path):
    batch = ELL2_PATHS[path]
    rng = random.Random(5)
    for n in (0, 1, 7, 8, 9, 17):
        ts = [rng.randrange(P) for _ in range(n)]
        assert batch(b"".join(le(t) for t in ts)) == b"".join(le(ell2_reference(t)) for t in ts)
    with pytest.raises(ValueError) as refused:
        batch(le(3) + le(P) + le(2**255))
    assert refused.value.args == (1, "field element not below p")
    with pytest.raises(ValueError, match="multiple of 32"):
        batch(bytes(31))


def test_hash_to_field_packed_equals_hash_to_field():
    rng = random.Random(48)
    msgs = [rng.randbytes(rng.randrange(0, 300)) for _ in range(200)]
    for dst in (b"short", b"COGOV-PSI-V02", b"x" * 300):  # the last one is an oversize DST
        expected = b"".join(le(group.hash_to_field(m, dst, 1)[0]) for m in msgs)
        assert group.hash_to_field_packed(msgs, dst) == expected


def ladder(k: int, u: int) -> tuple[int, int]:
    """k·Q for u = u(Q), projective (X, Z), unclamped k (RFC 7748 ladder in Python)."""
    x2, z2, x3, z3 = 1, 0, u, 1
    for bit in bin(k)[2:]:
        if bit == "1":
            x2, z2, x3, z3 = x3, z3, x2, z2
        a, b, c, d = x2 + z2, x2 - z2, x3 + z3, x3 - z3
        da, cb, aa, bb = d * a, c * b, a * a, b * b
        x3, z3 = (da + cb) ** 2 % P, u * (da - cb) ** 2 % P
        x2, z2 = aa * bb % P, (aa - bb) * (aa + 121665 * (aa - bb)) % P
        if bit == "1":
            x2, z2, x3, z3 = x3, z3, x2, z2
    return x2, z2


def test_keyed_hash_commutes_and_clears_the_cofactor():
    """a·(b·H) = b·(a·H); H has a small-order part, a·H (clamped a) has none."""
    msgs = [f"id-{i}".encode() for i in range(40)]
    a, b = os.urandom(32), os.urandom(32)
    h = group.elligator2_u_many(msgs, b"test-dst")
    ab = group.x25519_many(a, group.x25519_many(b, h))
    assert ab == group.x25519_many(b, group.x25519_many(a, h))
    keyed = group.x25519_many(a, h)
    outside = 0
    for i in range(0, len(h), 32):
        u, au = (int.from_bytes(x[i : i + 32], "little") for x in (h, keyed))
        assert ladder(group.GROUP_ORDER, au)[1] == 0  # order L: in the prime-order subgroup
        outside += ladder(group.GROUP_ORDER, u)[1] != 0
        assert keyed[i : i + 32] == sodium.crypto_scalarmult(a, h[i : i + 32])
    assert outside > 20  # most images have a component of order 2, 4 or 8
