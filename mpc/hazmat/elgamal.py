"""Exponential ("lifted") ElGamal on edwards25519: additively homomorphic, small plaintexts.

Enc_Y(t) = (r·B, t·B + r·Y) with Y = y·B. Ciphertexts add component-wise;
decryption yields t·B and a bounded discrete log (baby-step giant-step)
recovers t, so the plaintext range must be bounded (see `discrete_log`).
Semantic security rests on DDH in the prime-order subgroup.

The key owner encrypts its own values with one fewer variable-base
multiplication: t·B + r·Y = (t + r·y)·B, two fixed-base multiplications per value.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from mpc.errors import MalformedInput
from mpc.hazmat import group

CIPHERTEXT_BYTES = 2 * group.POINT_BYTES
ZERO_CIPHERTEXT = group.IDENTITY + group.IDENTITY

#: discrete logs are searched over at most this many values (table 2^20 points, ~1 M adds)
MAX_LOG_RANGE = 2**40


def keygen() -> tuple[int, bytes]:
    """(secret y, public Y = y·B)."""
    y = group.random_scalar()
    return y, group.base_mult(y)


def encrypt_own(secret: int, values: Sequence[int]) -> bytes:
    """Encryptions of `values` under the caller's own key, packed (64 bytes each)."""
    out = []
    for t in values:
        r = group.random_scalar()
        out.append(group.base_mult(r) + group.base_mult(t + r * secret))
    return b"".join(out)


def encrypt(public: bytes, value: int) -> bytes:
    """Enc_Y(value) with fresh randomness; refuses an invalid public key."""
    r = group.random_scalar()
    mask = group.scalarmult(group.scalar_to_bytes(r), public)
    return group.base_mult(r) + group.add(group.base_mult(value), mask)


def add(a: bytes, b: bytes) -> bytes:
    return group.add(a[:32], b[:32]) + group.add(a[32:], b[32:])


def sum_all(ciphertexts: bytes) -> bytes:
    """Homomorphic sum of a packed batch (an encryption of 0 with r = 0 for an empty one)."""
    if len(ciphertexts) % CIPHERTEXT_BYTES:
        raise MalformedInput("packed ciphertexts must be 64 bytes each")
    c1 = group.sum_points(b"".join(ciphertexts[i : i + 32] for i in range(0, len(ciphertexts), 64)))
    c2 = group.sum_points(
        b"".join(ciphertexts[i + 32 : i + 64] for i in range(0, len(ciphertexts), 64))
    )
    return c1 + c2


def sum_selected(ciphertexts: bytes, selected: bytes, offset: int = 0) -> bytes:
    """Sum of the ciphertexts whose flag in `selected` is 1; every one is decoded.

    Decoding the unselected ones too (as a no-op addition) makes a malformed
    ciphertext fail the same way whether or not it was selected.
    """
    if len(ciphertexts) != CIPHERTEXT_BYTES * len(selected):
        raise MalformedInput("one selection flag per ciphertext")
    acc1 = acc2 = group.IDENTITY
    for k, flag in enumerate(selected):
        i = k * CIPHERTEXT_BYTES
        c1, c2 = ciphertexts[i : i + 32], ciphertexts[i + 32 : i + 64]
        try:
            if flag:
                acc1, acc2 = group.add(acc1, c1), group.add(acc2, c2)
            else:
                group.add(group.IDENTITY, c1), group.add(group.IDENTITY, c2)
        except MalformedInput:
            raise MalformedInput(f"ciphertext {offset + k}: not a pair of curve points") from None
    return acc1 + acc2


def project(ciphertext: bytes) -> bytes:
    """Both components projected onto the prime-order subgroup (see group.project_to_subgroup)."""
    return group.project_to_subgroup(ciphertext[:32]) + group.project_to_subgroup(ciphertext[32:])


def decrypt_to_point(secret: int, ciphertext: bytes) -> bytes:
    """t·B for a ciphertext of t; refuses malformed components."""
    if len(ciphertext) != CIPHERTEXT_BYTES:
        raise MalformedInput("a ciphertext is 64 bytes")
    c1, c2 = ciphertext[:32], ciphertext[32:]
    if c1 == group.IDENTITY:
        raise MalformedInput("ciphertext randomness is the identity")
    return group.sub(c2, group.scalarmult(group.scalar_to_bytes(secret), c1))


def discrete_log(point: bytes, low: int, high: int) -> int:
    """The t in [low, high] with t·B = point (baby-step giant-step), or MalformedInput."""
    span = high - low
    if span < 0 or span >= MAX_LOG_RANGE:
        raise MalformedInput(f"discrete-log range of {span} values is not supported")
    # A power-of-two table size lets nearby ranges share one cached table.
    table_size = 1 << max(4, math.isqrt(span).bit_length())
    table = _baby_steps(table_size)
    giant = group.base_mult(table_size)
    target = group.sub(point, group.base_mult(low))
    for i in range(span // table_size + 1):
        j = table.get(target)
        if j is not None and i * table_size + j <= span:
            return low + i * table_size + j
        target = group.sub(target, giant)
    raise MalformedInput("the value does not decrypt within the agreed range")


@functools.lru_cache(maxsize=2)
def _baby_steps(size: int) -> dict[bytes, int]:
    """{j·B: j} for j in [0, size)."""
    table = {group.IDENTITY: 0}
    base = group.base_mult(1)
    point = group.IDENTITY
    for j in range(1, size):
        point = group.add(point, base)
        table[point] = j
    return table
