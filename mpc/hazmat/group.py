"""The edwards25519 prime-order group through libsodium (PyNaCl); batch X25519 in C.

Points are 32-byte edwards25519 encodings; batches are "packed": the
concatenation of n fixed-size items, so a million points is one 32 MB bytes
object that pickles cheaply to a worker process.

Hash to the group (used for xID tokens)::

    u0, u1 = hash_to_field(msg, count=2)      # RFC 9380 §5.2, expand_message_xmd SHA-512, L=48
    H(msg) = map(u0) + map(u1)                  # map = libsodium crypto_core_ed25519_from_uniform

`map` is Elligator 2 onto curve25519 followed by the birational map to
edwards25519 and cofactor clearing (x 8), i.e. RFC 9380's `map_to_curve` and
`clear_cofactor` for the edwards25519 suites. The one difference from RFC 9380
is the sign: libsodium's `from_uniform` takes the sign of x from the top bit of
its input (0 here), where RFC 9380 derives it from the square test. Each map
output therefore equals RFC 9380's cofactor-cleared Q up to sign (the tests
check this against the RFC's published u0, u1, Q0, Q1), and H is the RFC 9380
random-oracle construction with a sign-normalised map: still two independent
Elligator 2 images added, which is what the indifferentiability argument
needs (the map is regular and invertible), but its outputs differ from the
RFC's final P. `from_uniform` is used (not `from_hash`, which PyNaCl does not
wrap and whose input layout changed between libsodium releases) because its
semantics have been stable across libsodium versions.

The PSI works on curve25519 u-coordinates instead, with the extension
`mpc.hazmat._x25519` (batches of eight in AVX-512 IFMA lanes where the CPU has
them, portable C otherwise, GIL released)::

    t = hash_to_field(msg, count=1)            # as above
    u = u-coordinate of map_to_curve(t)        # RFC 9380 §6.7.1 Elligator 2 on curve25519
    X25519(k, u)                               # RFC 7748, clamped k

`elligator2_u_many` computes u for a batch of messages and `x25519_many` the
ladders. There is no cofactor clearing: the clamped X25519 scalar is a
multiple of 8, so the ladder does it (see `mpc.psi`).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

import nacl.bindings as _na
import nacl.exceptions as _nacl_errors

from mpc.errors import MalformedInput

try:
    from mpc.hazmat import _x25519
except ImportError as err:  # pragma: no cover - a checkout whose extension was never built
    raise ImportError(
        "mpc.hazmat._x25519 is not built: run `make` or `pip install --no-deps -e .`"
    ) from err

FIELD_PRIME = 2**255 - 19
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493
POINT_BYTES = 32
SCALAR_BYTES = 32
IDENTITY = bytes([1]) + bytes(31)

_SHA512_BLOCK = 128
_SHA512_OUT = 64
_FIELD_ELEMENT_BYTES = 48  # RFC 9380 L = ceil((255 + 128) / 8)
_SODIUM_FAILURES = (_nacl_errors.RuntimeError, _nacl_errors.ValueError, _nacl_errors.TypeError)


# ---------------------------------------------------------------- hashing


def expand_message_xmd(msg: bytes, dst: bytes, length: int) -> bytes:
    """RFC 9380 §5.3.1 with SHA-512."""
    if len(dst) > 255:
        dst = hashlib.sha512(b"H2C-OVERSIZE-DST-" + dst).digest()
    blocks = -(-length // _SHA512_OUT)
    if blocks > 255 or length > 65535:
        raise ValueError("expand_message_xmd: requested length too large")
    dst_prime = dst + bytes([len(dst)])
    b0 = hashlib.sha512(
        bytes(_SHA512_BLOCK) + msg + length.to_bytes(2, "big") + b"\x00" + dst_prime
    ).digest()
    b0_int = int.from_bytes(b0, "big")
    bi = hashlib.sha512(b0 + b"\x01" + dst_prime).digest()
    out = [bi]
    for i in range(2, blocks + 1):
        mixed = (b0_int ^ int.from_bytes(bi, "big")).to_bytes(_SHA512_OUT, "big")
        bi = hashlib.sha512(mixed + bytes([i]) + dst_prime).digest()
        out.append(bi)
    return b"".join(out)[:length]


def hash_to_field(msg: bytes, dst: bytes, count: int) -> list[int]:
    """RFC 9380 §5.2 for GF(2^255 - 19): `count` field elements."""
    data = expand_message_xmd(msg, dst, _FIELD_ELEMENT_BYTES * count)
    step = _FIELD_ELEMENT_BYTES
    return [
        int.from_bytes(data[i * step : (i + 1) * step], "big") % FIELD_PRIME for i in range(count)
    ]


def hash_to_field_packed(msgs: Sequence[bytes], dst: bytes) -> bytes:
    """`hash_to_field(m, dst, 1)` for every message, packed as 32-byte little-endian elements.

    expand_message_xmd for L = 48 needs one output block (b_1), and its first
    SHA-512 block (Z_pad) is the same for every message: hashed once, copied.
    """
    if len(dst) > 255:
        dst = hashlib.sha512(b"H2C-OVERSIZE-DST-" + dst).digest()
    dst_prime = dst + bytes([len(dst)])
    b0_tail = _FIELD_ELEMENT_BYTES.to_bytes(2, "big") + b"\x00" + dst_prime
    b1_tail = b"\x01" + dst_prime
    z_pad = hashlib.sha512(bytes(_SHA512_BLOCK))
    sha512, p = hashlib.sha512, FIELD_PRIME
    out = []
    for m in msgs:
        h = z_pad.copy()
        h.update(m + b0_tail)
        uniform = sha512(h.digest() + b1_tail).digest()[:_FIELD_ELEMENT_BYTES]
        out.append((int.from_bytes(uniform, "big") % p).to_bytes(32, "little"))
    return b"".join(out)


def elligator2_u_many(msgs: Sequence[bytes], dst: bytes) -> bytes:
    """Curve25519 u-coordinates of RFC 9380 `map_to_curve(hash_to_field(m))`, packed.

    That is encode_to_curve of suite curve25519_XMD:SHA-512_ELL2_NU_ without
    `clear_cofactor`: the points lie anywhere on curve25519, not only in the
    prime-order subgroup. Fit for X25519 (whose clamped scalar clears the
    cofactor), not for libsodium's edwards25519 functions.
    """
    return _x25519.elligator2_u_batch(hash_to_field_packed(msgs, dst))


def map_to_curve(u: int) -> bytes:
    """Elligator 2 image of field element `u`, cofactor cleared, x made even."""
    return _na.crypto_core_ed25519_from_uniform(u.to_bytes(32, "little"))


def hash_to_curve(msg: bytes, dst: bytes) -> bytes:
    """Random-oracle hash of `msg` to the prime-order subgroup (see module doc)."""
    u0, u1 = hash_to_field(msg, dst, 2)
    return _na.crypto_core_ed25519_add(map_to_curve(u0), map_to_curve(u1))


def encode_to_curve(msg: bytes, dst: bytes) -> bytes:
    """Single-map (RFC 9380 NU) encoding of `msg` to the prime-order subgroup."""
    (u,) = hash_to_field(msg, dst, 1)
    return map_to_curve(u)


def hash_to_curve_many(msgs: Sequence[bytes], dst: bytes) -> bytes:
    return b"".join([hash_to_curve(m, dst) for m in msgs])


# ---------------------------------------------------------------- scalars


def random_scalar() -> int:
    """Uniform non-zero scalar modulo the group order."""
    while True:
        s = secrets.randbits(512) % GROUP_ORDER
        if s:
            return s


def scalar_to_bytes(s: int) -> bytes:
    return (s % GROUP_ORDER).to_bytes(SCALAR_BYTES, "little")


def scalar_from_bytes(data: bytes) -> int:
    """Decode a canonical non-zero scalar, refusing anything else."""
    if not isinstance(data, bytes | bytearray) or len(data) != SCALAR_BYTES:
        raise MalformedInput("scalar must be 32 bytes")
    s = int.from_bytes(data, "little")
    if not 0 < s < GROUP_ORDER:
        raise MalformedInput("scalar must be canonical and non-zero")
    return s


def invert_many(values: Sequence[int], modulus: int) -> list[int]:
    """Batch modular inversion (Montgomery's trick): one pow, three products per item."""
    n = len(values)
    if n == 0:
        return []
    prefix = [0] * n
    acc = 1
    for i, v in enumerate(values):
        acc = acc * v % modulus
        prefix[i] = acc
    inv = pow(acc, -1, modulus)
    out = [0] * n
    for i in range(n - 1, 0, -1):
        out[i] = inv * prefix[i - 1] % modulus
        inv = inv * values[i] % modulus
    out[0] = inv
    return out


# ---------------------------------------------------------------- points


def pack(items: Sequence[bytes], size: int = POINT_BYTES) -> bytes:
    """Concatenate fixed-size items, refusing any of the wrong type or length."""
    for i, item in enumerate(items):
        if not isinstance(item, bytes | bytearray) or len(item) != size:
            raise MalformedInput(f"item {i}: expected {size} bytes")
    return b"".join(bytes(item) for item in items)


def unpack(packed: bytes, size: int = POINT_BYTES) -> list[bytes]:
    if len(packed) % size:
        raise MalformedInput(f"packed length {len(packed)} is not a multiple of {size}")
    return [packed[i : i + size] for i in range(0, len(packed), size)]


def is_valid_point(point: bytes) -> bool:
    """Canonical, on the curve, in the prime-order subgroup, not of small order."""
    try:
        return bool(_na.crypto_core_ed25519_is_valid_point(point))
    except _SODIUM_FAILURES:
        return False


def scalarmult(scalar: bytes, point: bytes) -> bytes:
    """scalar·point; libsodium refuses non-canonical, small-order and off-subgroup points."""
    try:
        return _na.crypto_scalarmult_ed25519_noclamp(scalar, point)
    except _SODIUM_FAILURES:
        raise MalformedInput("not a valid prime-order group element") from None


def scalarmult_many(scalar: bytes, points: bytes, offset: int = 0) -> bytes:
    """scalar·P for every point of a packed batch; the error names the bad index."""
    mult = _na.crypto_scalarmult_ed25519_noclamp
    out = []
    try:
        for i in range(0, len(points), POINT_BYTES):
            out.append(mult(scalar, points[i : i + POINT_BYTES]))
    except _SODIUM_FAILURES:
        index = offset + len(out)
        raise MalformedInput(f"point {index}: not a valid prime-order group element") from None
    return b"".join(out)


def scalarmult_pairs(scalars: bytes, points: bytes, offset: int = 0) -> bytes:
    """s_i·P_i for aligned packed batches of scalars and points."""
    mult = _na.crypto_scalarmult_ed25519_noclamp
    out = []
    try:
        for i in range(0, len(points), POINT_BYTES):
            out.append(mult(scalars[i : i + SCALAR_BYTES], points[i : i + POINT_BYTES]))
    except _SODIUM_FAILURES:
        index = offset + len(out)
        raise MalformedInput(f"point {index}: not a valid prime-order group element") from None
    return b"".join(out)


def base_mult(scalar: int) -> bytes:
    """scalar·B for the standard base point; the identity for scalar ≡ 0."""
    scalar %= GROUP_ORDER
    if scalar == 0:
        return IDENTITY
    return _na.crypto_scalarmult_ed25519_base_noclamp(scalar_to_bytes(scalar))


def add(p: bytes, q: bytes) -> bytes:
    try:
        return _na.crypto_core_ed25519_add(p, q)
    except _SODIUM_FAILURES:
        raise MalformedInput("not a point on edwards25519") from None


def sub(p: bytes, q: bytes) -> bytes:
    try:
        return _na.crypto_core_ed25519_sub(p, q)
    except _SODIUM_FAILURES:
        raise MalformedInput("not a point on edwards25519") from None


def sum_points(points: bytes) -> bytes:
    """Sum of a packed batch (the identity for an empty one)."""
    acc = IDENTITY
    for i in range(0, len(points), POINT_BYTES):
        acc = add(acc, points[i : i + POINT_BYTES])
    return acc


def project_to_subgroup(point: bytes) -> bytes:
    """The prime-order component of any curve point: (8^-1 mod L)·(8·P).

    Kills a small-order component a peer may have hidden in a point, without
    refusing it (a refusal would itself leak whether that component summed to 0).
    """
    doubled = point
    for _ in range(3):
        doubled = add(doubled, doubled)
    if doubled == IDENTITY:
        return IDENTITY
    return scalarmult(scalar_to_bytes(pow(8, -1, GROUP_ORDER)), doubled)


def x25519_many(scalar: bytes, us: bytes, offset: int = 0) -> bytes:
    """X25519(scalar, u) for a packed batch of canonical u-coordinates (RFC 7748, clamped).

    Refuses u >= p (non-canonical, which includes bit 255 set) and inputs
    whose result is all zero (small order: u in {0, 1, p - 1} and the two
    u-coordinates of points of order 8), naming the first bad index plus `offset`. Curve25519
    is twist-secure and the clamped scalar is a multiple of the cofactor, so no
    other check is needed. Computed by `mpc.hazmat._x25519` without the GIL.
    """
    if len(us) % POINT_BYTES:
        raise MalformedInput(f"packed length {len(us)} is not a multiple of {POINT_BYTES}")
    try:
        return _x25519.x25519_batch(scalar, us)
    except ValueError as err:
        if len(err.args) != 2:  # a malformed scalar, not a refused point
            raise
        index, reason = err.args
        raise MalformedInput(f"point {offset + index}: {reason}") from None
