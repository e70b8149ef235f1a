"""Additive shares in CrypTen's ring (int64, wrapping mod 2^64, integer encoding).

Whoever holds a value splits it here: the health authority its visit rows, the
insurer its claims (one share per computing node; the node layer seals each to its
node). The insurer also adds the two result shares back together. A share alone is
uniformly random: a fresh 64-bit value from the OS CSPRNG.

Share blobs are `MAGIC | kind (u8) | ndim (u8) | dims (u64 each) | int64 data`.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from mpc.claim.errors import MalformedInput

MAGIC = b"CGSS1"
KIND_CLAIMS = 1
KIND_ROWS = 2
KIND_RESULT = 3
_KINDS = {KIND_CLAIMS: "claims", KIND_ROWS: "rows", KIND_RESULT: "result"}
MAX_ELEMENTS = 1 << 27


def split(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two int64 arrays, each uniformly random, that add up to `values` mod 2^64."""
    plain = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)
    mask = np.frombuffer(os.urandom(8 * plain.size), dtype=np.uint64).reshape(plain.shape)
    return (plain - mask).view(np.int64), mask.view(np.int64)


def combine(share0: np.ndarray, share1: np.ndarray) -> np.ndarray:
    """The value two shares encode (int64, wrapping)."""
    if share0.shape != share1.shape:
        raise MalformedInput(f"share shapes differ: {share0.shape} vs {share1.shape}")
    total = share0.astype(np.int64).view(np.uint64) + share1.astype(np.int64).view(np.uint64)
    return total.view(np.int64)


def pack(kind: int, share: np.ndarray) -> bytes:
    share = np.ascontiguousarray(share, dtype="<i8")
    head = struct.pack(f"!BB{share.ndim}Q", kind, share.ndim, *share.shape)
    return MAGIC + head + share.tobytes()


def unpack(data: bytes, kind: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The share array in a blob; refuses a wrong kind, shape or length."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[:5]) != MAGIC:
        raise MalformedInput("not a share blob")
    try:
        got_kind, ndim = struct.unpack_from("!BB", data, 5)
        dims = struct.unpack_from(f"!{ndim}Q", data, 7)
    except struct.error as exc:
        raise MalformedInput("truncated share blob") from exc
    if got_kind != kind:
        raise MalformedInput(
            f"expected a {_KINDS.get(kind)} share blob, got {_KINDS.get(got_kind, got_kind)}")
    if shape is not None and tuple(dims) != tuple(shape):
        raise MalformedInput(f"share blob has shape {dims}, expected {tuple(shape)}")
    n = int(np.prod(dims, dtype=np.float64))
    if n > MAX_ELEMENTS:
        raise MalformedInput("share blob too large")
    offset = 7 + 8 * ndim
    if len(data) != offset + 8 * n:
        raise MalformedInput("share blob length does not match its shape")
    return np.frombuffer(data, dtype="<i8", offset=offset).reshape(dims).astype(np.int64)
