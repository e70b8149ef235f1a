"""xID tokens: per-domain anonymous identifiers from an OPRF chain (docs/design.md §4).

The verbs::

    P1  = tokenize(k1, ids)              # health authority: k1·H(id)
    T_d = rekey(k2[d], P1)               # operator: k2[d]·P1 = k2[d]·k1·H(id)

    blinded, state = blind(ids)                    # insurer: B = r·H(id), r fresh per id
    step, proof2 = evaluate_proven(k2[d], blinded)  # operator first: Z' = k2·B
    out, proof1 = evaluate_proven(k1, step)        # health authority: Z = k1·Z'
    T_d  = unblind(state, out)                     # insurer: r^-1·k1·k2·r·H(id) = T_d(id)

Each proven step carries an RFC 9497 batched DLEQ proof against the key's commitment
k·G (`XidKey.commitment`, `mpc.voprf`). H is RFC 9380's hash_to_curve for
edwards25519_XMD:SHA-512_ELL2_RO_, exactly (`mpc.hazmat.group`), with DST `XID_DST`.

Hash version. Tokens made before `HASH_VERSION` 2 used a map that matched RFC 9380
only up to the sign of each Elligator 2 image. Such tokens cannot be moved to the new
hash by the rotation machinery: H_new(id) = s0·M(u0) + s1·M(u1) and H_old(id) =
M(u0) + M(u1), with per-id signs s0, s1, so whenever s0 != s1 no scalar maps one to the
other, and re-hashing needs the id, which the health authority no longer holds for
consumer keys (it keeps only their p1). A store of the old version therefore starts a
fresh tokenization epoch. Serialized keys carry the hash version their tokens were
derived with, and loading a key of another version raises `HashVersionMismatch`, so a
node never mixes old and new tokens silently. Tokens are
32-byte point encodings. Every point a verb receives is checked by libsodium
(canonical encoding, on the curve, in the prime-order subgroup, not the
identity) and a bad one raises `MalformedInput` naming its index, before any
result is returned.

Properties: no key holder sees an id on the blinded path (r·H(id) is a
uniformly random group element); the insurer cannot compute a token without
both key holders; tokens of two domains for the same id are unlinkable
without the keys (DDH in the group).

Key rotation. Keys carry an id and a version. Because scalar multiplication
commutes, whoever holds both versions of a key can move any token derived
from it to the new version: `rotate_tokens(old, new, tokens)` multiplies by
new·old^-1, whatever other keys the token also carries. In practice:

* a domain key k2[d] rotates at the operator, which holds both versions and
  re-keys that domain's tokens in place, then destroys the old version;
* the level-1 key k1 rotates at the health authority, which moves every P1 it
  holds to the new version and sends the operator the old -> new mapping; the
  operator re-applies each k2[d] to the new P1. k1's holder publishes nothing;
  the operator sees old and new P1 of each person but not the ratio between
  versions (a discrete log). Old tokens stop matching new ones, which
  is the point; the node overwrites the old version, so tokens leaked before a
  rotation can no longer be traced to their domain.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Sequence

import numpy as np

from mpc import voprf
from mpc.errors import HashVersionMismatch, MalformedInput
from mpc.hazmat import group
from mpc.hazmat.parallel import WorkerPool, run_chunked
from mpc.ids import Ids, id_bytes

__all__ = [
    "HASH_VERSION",
    "XID_DST",
    "BlindingState",
    "WorkerPool",
    "XidKey",
    "blind",
    "check_points",
    "evaluate_blinded",
    "evaluate_proven",
    "hash_to_group",
    "rekey",
    "rotate_tokens",
    "tokenize",
    "unblind",
]

#: 2: RFC 9380 exactly (1: the sign-normalised map, see the module doc)
HASH_VERSION = 2
XID_DST = b"COGOV-XID-V02-CS01-with-edwards25519_XMD:SHA-512_ELL2_RO_"
TOKEN_BYTES = group.POINT_BYTES

Points = Sequence[bytes] | np.ndarray

_KEY_PREFIX = b"CGXK"
_KEY_MAGIC = _KEY_PREFIX + bytes([HASH_VERSION])


class XidKey:
    """A secret scalar with an id and a version; its repr never shows the scalar."""

    __slots__ = ("_scalar", "key_id", "version")

    def __init__(self, key_id: str, version: int, scalar: bytes) -> None:
        if not key_id or len(key_id.encode()) > 255:
            raise MalformedInput("key_id must be 1..255 bytes of UTF-8")
        if not 1 <= version < 2**32:
            raise MalformedInput("key version must be in 1..2^32-1")
        group.scalar_from_bytes(scalar)  # canonical and non-zero, or MalformedInput
        self.key_id = key_id
        self.version = version
        self._scalar = bytes(scalar)

    @classmethod
    def generate(cls, key_id: str, version: int = 1) -> XidKey:
        return cls(key_id, version, group.scalar_to_bytes(group.random_scalar()))

    def rotate(self) -> XidKey:
        """A fresh key with the same id and the next version."""
        return XidKey.generate(self.key_id, self.version + 1)

    def to_bytes(self) -> bytes:
        """Serialized secret, for the node's encrypted key store only."""
        kid = self.key_id.encode()
        return _KEY_MAGIC + struct.pack(">IB", self.version, len(kid)) + kid + self._scalar

    @classmethod
    def from_bytes(cls, data: bytes) -> XidKey:
        head = len(_KEY_MAGIC)
        if not isinstance(data, bytes | bytearray) or data[: head - 1] != _KEY_PREFIX:
            raise MalformedInput("not a serialized xID key")
        if data[head - 1] != HASH_VERSION:
            raise HashVersionMismatch(
                f"this xID key's tokens were derived with hash version {data[head - 1]}, this "
                f"build hashes with version {HASH_VERSION}: start a fresh tokenization epoch")
        if len(data) < head + 5:
            raise MalformedInput("truncated xID key")
        version, kid_len = struct.unpack(">IB", data[head : head + 5])
        body = data[head + 5 :]
        if len(body) != kid_len + group.SCALAR_BYTES:
            raise MalformedInput("xID key has the wrong length")
        try:
            key_id = bytes(body[:kid_len]).decode()
        except UnicodeDecodeError:
            raise MalformedInput("xID key id is not UTF-8") from None
        return cls(key_id, version, bytes(body[kid_len:]))

    def commitment(self) -> bytes:
        """k·G, the key's public commitment (published in the log, checked by the proofs)."""
        return voprf.commitment(self._scalar)

    def __repr__(self) -> str:
        return f"XidKey(key_id={self.key_id!r}, version={self.version})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, XidKey):
            return NotImplemented
        return (
            self.key_id == other.key_id
            and self.version == other.version
            and hmac.compare_digest(self._scalar, other._scalar)
        )

    __hash__ = None  # type: ignore[assignment]


class BlindingState:
    """The insurer's secret unblinding scalars for one `blind` call (single use)."""

    __slots__ = ("_inverses", "_used", "count")

    def __init__(self, inverses: bytes) -> None:
        self._inverses = inverses
        self.count = len(inverses) // group.SCALAR_BYTES
        self._used = False

    def __repr__(self) -> str:
        return f"BlindingState(count={self.count}, used={self._used})"


# ---------------------------------------------------------------- verbs


def hash_to_group(ids: Ids, *, pool: WorkerPool | None = None) -> list[bytes]:
    """H(id) for every id: 32-byte points."""
    msgs = id_bytes(ids)
    parts = run_chunked(
        group.hash_to_curve_many, len(msgs), lambda a, b: (msgs[a:b], XID_DST), pool
    )
    return group.unpack(b"".join(parts))


def tokenize(key: XidKey, ids: Ids, *, pool: WorkerPool | None = None) -> list[bytes]:
    """key·H(id) for every id (level-1 tokens when key is k1)."""
    msgs = id_bytes(ids)
    parts = run_chunked(_tokenize_chunk, len(msgs), lambda a, b: (key._scalar, msgs[a:b]), pool)
    return group.unpack(b"".join(parts))


def rekey(key: XidKey, tokens: Points, *, pool: WorkerPool | None = None) -> list[bytes]:
    """key·T for every token (domain tokens from level-1 tokens when key is k2[d])."""
    return _apply_scalar(key._scalar, _packed_points(tokens), pool)


def evaluate_blinded(key: XidKey, points: Points, *, pool: WorkerPool | None = None) -> list[bytes]:
    """A key holder's step on blinded points: key·P for every P."""
    return _apply_scalar(key._scalar, _packed_points(points), pool)


def evaluate_proven(
    key: XidKey, points: Points, *, pool: WorkerPool | None = None
) -> tuple[list[bytes], bytes]:
    """`evaluate_blinded` with its RFC 9497 batched DLEQ proof against `key.commitment()`."""
    outputs = evaluate_blinded(key, points, pool=pool)
    return outputs, voprf.prove_hop(key._scalar, group.unpack(_packed_points(points)), outputs)


def rotate_tokens(
    old: XidKey, new: XidKey, tokens: Points, *, pool: WorkerPool | None = None
) -> list[bytes]:
    """Move tokens carrying `old` to `new`: (new·old^-1)·T. Needs both versions."""
    if old.key_id != new.key_id or new.version <= old.version:
        raise MalformedInput("rotation needs an older and a newer version of the same key id")
    ratio = group.scalar_from_bytes(new._scalar) * pow(
        group.scalar_from_bytes(old._scalar), -1, group.GROUP_ORDER
    )
    return _apply_scalar(group.scalar_to_bytes(ratio), _packed_points(tokens), pool)


def blind(ids: Ids, *, pool: WorkerPool | None = None) -> tuple[list[bytes], BlindingState]:
    """r_i·H(id_i) with a fresh secret r_i per id; the state keeps r_i^-1 for `unblind`."""
    msgs = id_bytes(ids)
    parts = run_chunked(_blind_chunk, len(msgs), lambda a, b: (msgs[a:b],), pool)
    blinded = b"".join(p for p, _ in parts)
    inverses = b"".join(inv for _, inv in parts)
    return group.unpack(blinded), BlindingState(inverses)


def unblind(state: BlindingState, points: Points, *, pool: WorkerPool | None = None) -> list[bytes]:
    """r_i^-1·P_i: the tokens, once every key holder has evaluated the blinded points."""
    packed = _packed_points(points)
    if state._used:
        raise MalformedInput("this blinding state was already used")
    if len(packed) // TOKEN_BYTES != state.count:
        raise MalformedInput(f"expected {state.count} points, got {len(packed) // TOKEN_BYTES}")
    inverses = state._inverses
    parts = run_chunked(
        group.scalarmult_pairs,
        state.count,
        lambda a, b: (inverses[a * 32 : b * 32], packed[a * 32 : b * 32], a),
        pool,
    )
    state._used = True
    return group.unpack(b"".join(parts))


# ---------------------------------------------------------------- workers and input


def _tokenize_chunk(scalar: bytes, msgs: Sequence[bytes]) -> bytes:
    return group.scalarmult_many(scalar, group.hash_to_curve_many(msgs, XID_DST))


def _blind_chunk(msgs: Sequence[bytes]) -> tuple[bytes, bytes]:
    rs = [group.random_scalar() for _ in msgs]
    blinded = group.scalarmult_pairs(b"".join(group.scalar_to_bytes(r) for r in rs),
                                     group.hash_to_curve_many(msgs, XID_DST))
    inverses = b"".join(group.scalar_to_bytes(i) for i in group.invert_many(rs, group.GROUP_ORDER))
    return blinded, inverses


def _apply_scalar(scalar: bytes, packed: bytes, pool: WorkerPool | None) -> list[bytes]:
    n = len(packed) // TOKEN_BYTES
    parts = run_chunked(
        group.scalarmult_many, n, lambda a, b: (scalar, packed[a * 32 : b * 32], a), pool
    )
    return group.unpack(b"".join(parts))


def check_points(points: Sequence[bytes]) -> None:
    """Raise `MalformedInput` naming the first point that is not a valid group element."""
    for i, point in enumerate(points):
        if len(point) != TOKEN_BYTES or not group.is_valid_point(point):
            raise MalformedInput(f"point {i} is not a valid element of the prime-order group")


def _packed_points(points: Points) -> bytes:
    """A packed batch from a list of 32-byte strings or an (n, 32) uint8 array."""
    if isinstance(points, np.ndarray):
        if points.ndim != 2 or points.shape[1] != TOKEN_BYTES or points.dtype != np.uint8:
            raise MalformedInput("point arrays must be (n, 32) uint8")
        return np.ascontiguousarray(points).tobytes()
    if isinstance(points, bytes | bytearray | str):
        raise MalformedInput("expected a sequence of points, not a single value")
    return group.pack(list(points))
