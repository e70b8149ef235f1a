"""Private intersection-size and intersection-sum ("private join and compute").

Two parties: the id holder A has a set of ids V; the value holder B has rows
(w, t) with integers 0 <= t <= max_value. They learn |V ∩ W| and
S = sum of t over the intersection, without revealing the intersection.

Protocol (Ion et al., "On Deploying Secure Computing: Private
Intersection-Sum-with-Cardinality", EuroS&P 2020, Google's PJC), with X25519
as the commutative cipher and exponential ElGamal in place of Paillier::

    1. A -> B  JoinRequest   shuffle{ a·H(v) }
    2. B -> A  JoinResponse  shuffle{ b·a·H(v) },  shuffle{ (b·H(w), Enc_Y(t)) },  Y
    3. A: I = { i : a·b·H(w_i) in {b·a·H(v)} },  size = |I|
       A -> B  JoinOutcome   released size,  project(sum_{i in I} Enc_Y(t_i)) + Enc_Y(noise)
    4. B: decrypt, bounded discrete log -> S + noise

Choices, and why:

* Commutative cipher: x -> X25519(k, x) on Montgomery u-coordinates, k fresh
  per session, computed in batches by `mpc.hazmat._x25519` (eight ladders at
  once in AVX-512 IFMA lanes where the CPU has them). Curve25519 is
  twist-secure: a peer's u-coordinate needs no subgroup check (the clamped
  scalar is a multiple of the cofactor 8; a small-order input gives 0 and is
  refused).
* H: RFC 9380 hash_to_field, then one Elligator 2 map onto curve25519 (suite
  curve25519_XMD:SHA-512_ELL2_NU_, DST `PSI_DST`), u-coordinate only, without
  cofactor clearing: X25519's clamping does it. The clamped scalar is a = 8a',
  so a·H(v) = a'·(8·H(v)) lies in the prime-order subgroup, and so does every
  keyed value. Doubly keyed values are equal iff 8·H(v) = ±8·H(w) (x-only),
  so two distinct ids collide only if their Elligator images differ, up to
  sign, by a point of order dividing 8: at most 32 of the p values of t do
  that, probability below 2^-249 per pair. The DDH reduction for DH-PSI only
  needs to program H with points whose multiple 8·H has a known discrete log,
  drawn from H's output distribution: it samples r and a random point T of
  order dividing 8 and keeps Q = r·g + T with the map's preimage probability
  (Elligator 2 is invertible; rejection sampling). The random-oracle variant
  (two maps and an addition) needs y-coordinates and costs more for no gain in
  this proof. An id whose image has small order (a handful of the p values of
  t, e.g. t = 0) would be refused as a malformed point; that has negligible
  probability.
* Sum: exponential ElGamal on edwards25519 (`mpc.hazmat.elgamal`), the key
  owned by B, who encrypts its own values with two fixed-base
  multiplications (~50 us) each. Paillier in Python integers costs
  milliseconds per encryption (hours at a million rows); masking with additive
  shares still needs an oblivious step to sum the masks over the hidden subset,
  i.e. HE or OT anyway. The price of ElGamal is a bounded plaintext:
  rows x max_value (+ noise margin) must stay under 2^40, and B's discrete
  log costs up to ~2 x sqrt(range) point additions.
* Both cores: every batch step runs in chunks on an optional `WorkerPool`.

Leakage, semi-honest and non-colluding parties:

* A learns n_B and the exact |I| (inherent to this design: A does the
  matching), nothing about B's values (ElGamal is IND-CPA under DDH) and not
  which of its ids matched (B shuffles the doubly-keyed set).
* B learns n_A, the released size (noisy when epsilon is set) and S + noise;
  not which rows matched: A projects its sum onto the prime-order subgroup
  (removing any small-order component B could have planted in a ciphertext)
  and adds a fresh encryption, so B receives a fresh encryption of S + noise
  whatever I is.
* Both learn whether the released size reached `min_intersection` (a refusal
  is one bit). A refused or finished session cannot be re-run: fresh noise on
  each retry would let a peer average it away.

Noise: with `epsilon`, discrete Laplace noise on the size (sensitivity 1)
and, when summing, on the sum (sensitivity max_value); epsilon is split
evenly between them. The threshold applies to the noisy size. The sampler
draws two geometric variables from 53-bit uniform floats (not an exact
sampler) and clips at 40 scales (probability e^-40).
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mpc.errors import IntersectionTooSmall, MalformedInput, ProtocolStateError
from mpc.hazmat import elgamal, group
from mpc.hazmat.parallel import WorkerPool, run_chunked
from mpc.ids import Ids, id_bytes

__all__ = [
    "PSI_DST",
    "IdHolder",
    "IntersectionPolicy",
    "IntersectionResult",
    "JoinOutcome",
    "JoinRequest",
    "JoinResponse",
    "ValueHolder",
    "WorkerPool",
    "intersection_size",
    "intersection_sum",
]

# Version 2: H no longer clears the cofactor (version 1 did, on edwards25519): peers must agree.
PROTOCOL = "cogov-psi/2"
PSI_DST = b"COGOV-PSI-V02-CS01-with-curve25519_XMD:SHA-512_ELL2_NU_"
_P = group.POINT_BYTES
_C = elgamal.CIPHERTEXT_BYTES
_NOISE_TAIL = 40


# ---------------------------------------------------------------- policy and messages


class IntersectionPolicy(BaseModel):
    """What both parties agree to before running (normally fixed by the contract)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_intersection: int = Field(10, ge=0, description="refuse to release below this size")
    epsilon: float | None = Field(None, gt=0, description="total DP budget; None for no noise")
    max_value: int = Field(1_000_000, ge=0, description="bound on each summed value")

    def size_scale(self, with_sum: bool) -> float:
        if self.epsilon is None:
            return 0.0
        return 1.0 / (self.epsilon / 2 if with_sum else self.epsilon)

    def sum_scale(self) -> float:
        return 0.0 if self.epsilon is None else self.max_value / (self.epsilon / 2)


_WIRE = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")


def _check_packed(value: bytes, size: int) -> bytes:
    if len(value) % size:
        raise ValueError(f"length {len(value)} is not a multiple of {size}")
    return value


class JoinRequest(BaseModel):
    """Round 1, A -> B: A's keyed, shuffled ids."""

    model_config = _WIRE

    protocol: Literal["cogov-psi/2"] = PROTOCOL
    session: str = Field(pattern=r"^[0-9a-f]{32}$")
    policy: IntersectionPolicy
    with_sum: bool
    points: bytes

    @field_validator("points")
    @classmethod
    def _whole_points(cls, v: bytes) -> bytes:
        return _check_packed(v, _P)


class JoinResponse(BaseModel):
    """Round 2, B -> A: A's points under B's key, B's keyed ids and encrypted values."""

    model_config = _WIRE

    protocol: Literal["cogov-psi/2"] = PROTOCOL
    session: str = Field(pattern=r"^[0-9a-f]{32}$")
    double_keyed: bytes
    keyed: bytes
    ciphertexts: bytes = b""
    public_key: bytes = b""

    @field_validator("double_keyed", "keyed")
    @classmethod
    def _whole_points(cls, v: bytes) -> bytes:
        return _check_packed(v, _P)

    @model_validator(mode="after")
    def _sum_parts_agree(self) -> JoinResponse:
        summed = bool(self.ciphertexts or self.public_key)
        if summed and (len(self.ciphertexts) != 2 * len(self.keyed) or len(self.public_key) != _P):
            raise ValueError("ciphertexts must pair with keyed ids and come with a public key")
        return self


class JoinOutcome(BaseModel):
    """Round 3, A -> B: the released size and, when summing, the encrypted sum."""

    model_config = _WIRE

    protocol: Literal["cogov-psi/2"] = PROTOCOL
    session: str = Field(pattern=r"^[0-9a-f]{32}$")
    size: int = Field(ge=0)
    encrypted_sum: bytes | None = Field(None, min_length=_C, max_length=_C)


class IntersectionResult(BaseModel):
    """What is released: the (noisy) intersection size and (noisy) sum."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int
    sum: int | None = None
    noisy: bool = False


# ---------------------------------------------------------------- roles


class IdHolder:
    """Party A: holds ids; learns the intersection size; never sees B's values."""

    def __init__(
        self,
        ids: Ids,
        policy: IntersectionPolicy | None = None,
        *,
        with_sum: bool = True,
        pool: WorkerPool | None = None,
    ) -> None:
        self.policy = policy or IntersectionPolicy()
        self.with_sum = with_sum
        self._ids = list(dict.fromkeys(id_bytes(ids)))
        self._pool = pool
        self._key = os.urandom(32)
        self.session = secrets.token_hex(16)
        self._stage = "new"
        #: the exact intersection size, known to A once `finish` ran (inherent to the design)
        self.size: int | None = None

    def __repr__(self) -> str:
        return f"IdHolder(session={self.session!r}, ids={len(self._ids)}, stage={self._stage!r})"

    def request(self) -> JoinRequest:
        _expect(self._stage, "new")
        ids, key = self._ids, self._key
        keyed = b"".join(
            run_chunked(_hash_and_key, len(ids), lambda a, b: (key, ids[a:b]), self._pool)
        )
        self._stage = "requested"
        return JoinRequest(
            session=self.session,
            policy=self.policy,
            with_sum=self.with_sum,
            points=_shuffle(keyed, _P, _permutation(len(ids))),
        )

    def finish(self, response: JoinResponse) -> JoinOutcome:
        """Match, enforce the policy, and (when summing) aggregate; raises IntersectionTooSmall."""
        _expect(self._stage, "requested")
        if response.session != self.session:
            raise ProtocolStateError("response is for another session")
        if len(response.double_keyed) != len(self._ids) * _P:
            raise MalformedInput("response does not carry one point per requested id")
        if self.with_sum != bool(response.ciphertexts):
            raise ProtocolStateError("response does not match the requested computation")
        mine = set(group.unpack(response.double_keyed))
        keyed, key = response.keyed, self._key
        theirs = b"".join(
            run_chunked(
                group.x25519_many,
                len(keyed) // _P,
                lambda a, b: (key, keyed[a * _P : b * _P], a),
                self._pool,
            )
        )
        matched = bytes(theirs[i : i + _P] in mine for i in range(0, len(theirs), _P))
        size = sum(matched)
        released = max(0, size + _discrete_laplace(self.policy.size_scale(self.with_sum)))
        if released < self.policy.min_intersection:
            # A refusal releases one bit; the session is spent (a retry would draw fresh noise).
            self._stage = "refused"
            self.size = size
            raise IntersectionTooSmall(
                f"intersection below the agreed minimum of {self.policy.min_intersection}"
            )
        encrypted_sum = self._aggregate(response, matched) if self.with_sum else None
        self._stage = "finished"
        self.size = size
        return JoinOutcome(session=self.session, size=released, encrypted_sum=encrypted_sum)

    def _aggregate(self, response: JoinResponse, matched: bytes) -> bytes:
        # Every row is decoded, matched or not, so a malformed one is refused whatever I is.
        cts = response.ciphertexts
        partials = run_chunked(
            elgamal.sum_selected,
            len(matched),
            lambda a, b: (cts[a * _C : b * _C], matched[a:b], a),
            self._pool,
        )
        total = elgamal.ZERO_CIPHERTEXT
        for part in partials:
            total = elgamal.add(total, part)
        noise = _discrete_laplace(self.policy.sum_scale())
        # Projection strips planted small-order parts; the fresh encryption re-randomizes.
        return elgamal.add(elgamal.project(total), elgamal.encrypt(response.public_key, noise))


class ValueHolder:
    """Party B: holds (id, value) rows, or ids only for a size-only run; learns the (noisy) sum."""

    def __init__(
        self,
        ids: Ids,
        values: Sequence[int] | np.ndarray | None = None,
        policy: IntersectionPolicy | None = None,
        *,
        pool: WorkerPool | None = None,
    ) -> None:
        self.policy = policy or IntersectionPolicy()
        ids_bytes = id_bytes(ids)
        if values is None:
            self._ids = list(dict.fromkeys(ids_bytes))
            self._values: list[int] | None = None
        else:
            self._values = _checked_values(values, len(ids_bytes), self.policy.max_value)
            if len(set(ids_bytes)) != len(ids_bytes):
                raise MalformedInput("ids of summed rows must be unique")
            self._ids = ids_bytes
            low, high = self._sum_range()
            if high - low >= elgamal.MAX_LOG_RANGE:
                raise MalformedInput(
                    f"rows x max_value = {high - low} exceeds the decryptable range 2^40"
                )
        self._pool = pool
        self._key = os.urandom(32)
        self._secret: int | None = None
        self._session: str | None = None
        self._stage = "new"

    def __repr__(self) -> str:
        return (
            f"ValueHolder(session={self._session!r}, rows={len(self._ids)}, stage={self._stage!r})"
        )

    def respond(self, request: JoinRequest) -> JoinResponse:
        _expect(self._stage, "new")
        if request.policy != self.policy:
            raise ProtocolStateError("the peer runs under a different policy")
        if request.with_sum and self._values is None:
            raise ProtocolStateError("a sum was requested but this party holds no values")
        key, pts, ids = self._key, request.points, self._ids
        double = b"".join(
            run_chunked(
                group.x25519_many,
                len(pts) // _P,
                lambda a, b: (key, pts[a * _P : b * _P], a),
                self._pool,
            )
        )
        keyed = b"".join(
            run_chunked(_hash_and_key, len(ids), lambda a, b: (key, ids[a:b]), self._pool)
        )
        order = _permutation(len(ids))
        ciphertexts = public = b""
        if request.with_sum:
            assert self._values is not None
            secret, public = elgamal.keygen()
            values = self._values
            ciphertexts = _shuffle(
                b"".join(
                    run_chunked(
                        elgamal.encrypt_own,
                        len(values),
                        lambda a, b: (secret, values[a:b]),
                        self._pool,
                    )
                ),
                _C,
                order,
            )
            self._secret = secret
        self._session = request.session
        self._stage = "responded"
        return JoinResponse(
            session=request.session,
            double_keyed=_shuffle(double, _P, _permutation(len(pts) // _P)),
            keyed=_shuffle(keyed, _P, order),
            ciphertexts=ciphertexts,
            public_key=public,
        )

    def reveal(self, outcome: JoinOutcome) -> IntersectionResult:
        """Decrypt the released sum; the result is what both parties may publish."""
        _expect(self._stage, "responded")
        if outcome.session != self._session:
            raise ProtocolStateError("outcome is for another session")
        noisy = self.policy.epsilon is not None
        if self._secret is None:
            if outcome.encrypted_sum is not None:
                raise ProtocolStateError("a sum arrived for a size-only session")
            self._stage = "revealed"
            return IntersectionResult(size=outcome.size, noisy=noisy)
        if outcome.encrypted_sum is None:
            raise ProtocolStateError("the outcome carries no sum")
        point = elgamal.decrypt_to_point(self._secret, outcome.encrypted_sum)
        low, high = self._sum_range()
        total = elgamal.discrete_log(point, low, high)
        self._stage = "revealed"
        self._secret = None
        return IntersectionResult(size=outcome.size, sum=total, noisy=noisy)

    def _sum_range(self) -> tuple[int, int]:
        margin = math.ceil(_NOISE_TAIL * self.policy.sum_scale())
        return -margin, len(self._ids) * self.policy.max_value + margin


# ---------------------------------------------------------------- one-call helpers


def intersection_size(
    ids_a: Ids,
    ids_b: Ids,
    *,
    policy: IntersectionPolicy | None = None,
    pool: WorkerPool | None = None,
) -> IntersectionResult:
    """Run both roles locally: the (noisy) size of the intersection."""
    a = IdHolder(ids_a, policy, with_sum=False, pool=pool)
    b = ValueHolder(ids_b, policy=policy, pool=pool)
    return b.reveal(a.finish(b.respond(a.request())))


def intersection_sum(
    ids_a: Ids,
    ids_b: Ids,
    values_b: Sequence[int] | np.ndarray,
    *,
    policy: IntersectionPolicy | None = None,
    pool: WorkerPool | None = None,
) -> IntersectionResult:
    """Run both roles locally: the (noisy) size and sum of B's values over the intersection."""
    a = IdHolder(ids_a, policy, with_sum=True, pool=pool)
    b = ValueHolder(ids_b, values_b, policy, pool=pool)
    return b.reveal(a.finish(b.respond(a.request())))


# ---------------------------------------------------------------- internals


def _hash_and_key(key: bytes, msgs: Sequence[bytes]) -> bytes:
    return group.x25519_many(key, group.elligator2_u_many(msgs, PSI_DST))


def _expect(stage: str, wanted: str) -> None:
    if stage != wanted:
        raise ProtocolStateError(f"expected stage {wanted!r}, the session is {stage!r}")


def _permutation(n: int) -> np.ndarray:
    """A uniformly random permutation from the OS CSPRNG (sort by random 64-bit keys)."""
    keys = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) if n else np.zeros(0, np.uint64)
    return np.argsort(keys, kind="stable")


def _shuffle(packed: bytes, size: int, order: np.ndarray) -> bytes:
    if not packed:
        return b""
    return np.frombuffer(packed, dtype=np.uint8).reshape(-1, size)[order].tobytes()


def _discrete_laplace(scale: float) -> int:
    """Two-sided geometric noise with P(k) ∝ exp(-|k|/scale), clipped at 40 scales."""
    if scale <= 0:
        return 0
    log_q = -1.0 / scale

    def geometric() -> int:
        u = (secrets.randbits(53) + 1) / 2**53
        return math.floor(math.log(u) / log_q)

    bound = math.ceil(_NOISE_TAIL * scale)
    return max(-bound, min(bound, geometric() - geometric()))


def _checked_values(values: Sequence[int] | np.ndarray, n: int, max_value: int) -> list[int]:
    items = values.tolist() if isinstance(values, np.ndarray) else list(values)
    if len(items) != n:
        raise MalformedInput(f"{len(items)} values for {n} ids")
    for i, v in enumerate(items):
        if isinstance(v, bool) or not isinstance(v, int):
            raise MalformedInput(f"value {i}: expected an integer")
        if not 0 <= v <= max_value:
            raise MalformedInput(f"value {i}: outside 0..{max_value}")
    return items
