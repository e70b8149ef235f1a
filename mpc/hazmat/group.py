"""The edwards25519 prime-order group through libsodium (PyNaCl); batch X25519 in C.

Points are 32-byte edwards25519 encodings; batches are "packed": the
concatenation of n fixed-size items, so a million points is one 32 MB bytes
object that pickles cheaply to a worker process.

Hash to the group (used for xID tokens) is RFC 9380's `edwards25519_XMD:SHA-512_ELL2_RO_`,
exactly, outputs and test vectors included::

    u0, u1 = hash_to_field(msg, count=2)      # RFC 9380 §5.2, expand_message_xmd SHA-512, L=48
    H(msg) = map(u0) + map(u1)                  # map = clear_cofactor(map_to_curve(u))

`map` is Elligator 2 onto curve25519, the RFC's rational map to edwards25519
and cofactor clearing (x 8). libsodium's `crypto_core_ed25519_from_uniform`
computes that point up to the sign of x, which it takes from bit 255 of its
input (PyNaCl's libsodium does not export `from_string_ro`). The extension
computes the RFC's sign (`edwards_sign_batch`: the Montgomery y with the
RFC's sgn0 rule, then sgn0 of sqrt(-486664)·x/y, GIL released) and sets that
bit, so libsodium returns the RFC's point. Before this, the bit was always 0
and H matched the RFC only up to sign: `HASH_VERSION` names the construction
tokens were derived with (`mpc.xid`).

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


def hash_to_field_packed(msgs: Sequence[bytes], dst: bytes, count: int = 1) -> bytes:
    """`hash_to_field(m, dst, count)` for every message, packed as 32-byte little-endian
    elements (`count` per message, in order).

    expand_message_xmd's first SHA-512 block (Z_pad) is the same for every message: hashed
    once, copied.
    """
    if len(dst) > 255:
        dst = hashlib.sha512(b"H2C-OVERSIZE-DST-" + dst).digest()
    length = _FIELD_ELEMENT_BYTES * count
    blocks = -(-length // _SHA512_OUT)
    dst_prime = dst + bytes([len(dst)])
    b0_tail = length.to_bytes(2, "big") + b"\x00" + dst_prime
    z_pad = hashlib.sha512(bytes(_SHA512_BLOCK))
    sha512, p, step = hashlib.sha512, FIELD_PRIME, _FIELD_ELEMENT_BYTES
    out = []
    for m in msgs:
        h = z_pad.copy()
        h.update(m + b0_tail)
        b0 = h.digest()
        bi = sha512(b0 + b"\x01" + dst_prime).digest()
        uniform = bi
        for i in range(2, blocks + 1):
            mixed = bytes(x ^ y for x, y in zip(b0, bi, strict=True))
            bi = sha512(mixed + bytes([i]) + dst_prime).digest()
            uniform += bi
        for j in range(count):
            value = int.from_bytes(uniform[j * step : (j + 1) * step], "big") % p
            out.append(value.to_bytes(32, "little"))
    return b"".join(out)


def elligator2_u_many(msgs: Sequence[bytes], dst: bytes) -> bytes:
    """Curve25519 u-coordinates of RFC 9380 `map_to_curve(hash_to_field(m))`, packed.

    That is encode_to_curve of suite curve25519_XMD:SHA-512_ELL2_NU_ without
    `clear_cofactor`: the points lie anywhere on curve25519, not only in the
    prime-order subgroup. Fit for X25519 (whose clamped scalar clears the
    cofactor), not for libsodium's edwards25519 functions.
    """
    return _x25519.elligator2_u_batch(hash_to_field_packed(msgs, dst))


def map_to_curve_many(fields: bytes) -> bytes:
    """RFC 9380 clear_cofactor(map_to_curve(u)) for packed field elements, packed points."""
    try:
        signed = _x25519.edwards_sign_batch(fields)
    except ValueError as err:
        if len(err.args) != 2:
            raise
        raise MalformedInput(f"field element {err.args[0]}: {err.args[1]}") from None
    from_uniform = _na.crypto_core_ed25519_from_uniform
    return b"".join([from_uniform(signed[i : i + 32]) for i in range(0, len(signed), 32)])


def map_to_curve(u: int) -> bytes:
    """RFC 9380 clear_cofactor(map_to_curve(u)) of field element `u` on edwards25519."""
    return map_to_curve_many(u.to_bytes(32, "little"))


def hash_to_curve(msg: bytes, dst: bytes) -> bytes:
    """RFC 9380 hash_to_curve, suite edwards25519_XMD:SHA-512_ELL2_RO_."""
    return hash_to_curve_many([msg], dst)


def encode_to_curve(msg: bytes, dst: bytes) -> bytes:
    """RFC 9380 encode_to_curve, suite edwards25519_XMD:SHA-512_ELL2_NU_."""
    return map_to_curve_many(hash_to_field_packed([msg], dst))


def hash_to_curve_many(msgs: Sequence[bytes], dst: bytes) -> bytes:
    """`hash_to_curve(m, dst)` for every message, packed."""
    mapped = map_to_curve_many(hash_to_field_packed(msgs, dst, 2))
    add_points = _na.crypto_core_ed25519_add
    return b"".join([add_points(mapped[i : i + 32], mapped[i + 32 : i + 64])
                     for i in range(0, len(mapped), 64)])


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
