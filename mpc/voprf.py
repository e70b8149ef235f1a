"""RFC 9497 §2.2 batched DLEQ proofs over a prime-order group: what makes an OPRF hop
verifiable (VOPRF mode, 0x01).

A key holder with secret k and published commitment K = k·G returns D[i] = k·C[i] for a
batch C and one constant-size proof that log_G K = log_C[i] D[i] for every i
(`generate_proof`); anyone holding G, K, C and D checks it (`verify_proof`). The batch
is folded into one pair (M, Z) by `ComputeComposites` with per-element weights d_i
hashed from the whole transcript, so a proof over n elements costs the prover n scalar
multiplications (M; Z = k·M) and the verifier 2n (M and Z), plus two for the proof itself.

The functions follow RFC 9497 §2.2 to the byte (transcripts, I2OSP length prefixes,
HashToScalar = expand_message_xmd SHA-512 to 64 bytes, little-endian, mod the order) and
are generic over `PrimeOrderGroup`. They are checked against the RFC's VOPRF
known-answer vectors for OPRF(ristretto255, SHA-512) in tests/test_voprf.py, which
supplies a pure-Python RFC 9496 ristretto255 group (used for the vectors only: the
PyNaCl libsodium exports no ristretto255 functions).

cogov runs the proofs on edwards25519's prime-order subgroup (`EDWARDS25519`, libsodium),
the group of its xID tokens. RFC 9497 registers no edwards25519 suite, so the context
string `XID_CONTEXT` = "OPRFV1-" || 0x01 || "-cogov-edwards25519-SHA512" is cogov's own
(the RFC's construction, a name the RFC does not define). The proof nonce r comes from
`secrets`; every element a proof covers is refused unless canonical, in the prime-order
subgroup and not the identity (RFC 9497 DeserializeElement), and proof scalars unless
canonical.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Protocol

from mpc.errors import MalformedInput
from mpc.hazmat import group

MODE_VOPRF = 0x01
PROOF_BYTES = 64


def context_string(mode: int, identifier: str) -> bytes:
    """RFC 9497 §3.1 CreateContextString."""
    return b"OPRFV1-" + bytes([mode]) + b"-" + identifier.encode()


#: cogov's edwards25519 suite: RFC 9497's construction, NOT a suite the RFC registers.
XID_SUITE = "cogov-edwards25519-SHA512"
XID_CONTEXT = context_string(MODE_VOPRF, XID_SUITE)


class PrimeOrderGroup(Protocol):
    """What RFC 9497 §2.1 asks of a group, on serialized elements."""

    order: int
    element_bytes: int
    identity: bytes
    generator: bytes

    def check(self, element: bytes) -> None:
        """DeserializeElement's validation: raise `MalformedInput` unless canonical, in the
        group and not the identity."""

    def mul(self, scalar: int, element: bytes) -> bytes:
        """scalar·element for a checked element and a scalar in [0, order)."""

    def add(self, a: bytes, b: bytes) -> bytes: ...


class Edwards25519:
    """edwards25519's prime-order subgroup through libsodium (the xID group)."""

    order = group.GROUP_ORDER
    element_bytes = group.POINT_BYTES
    identity = group.IDENTITY
    generator = group.base_mult(1)

    def check(self, element: bytes) -> None:
        if len(element) != self.element_bytes or not group.is_valid_point(element):
            raise MalformedInput("not a valid element of the prime-order group")

    def mul(self, scalar: int, element: bytes) -> bytes:
        scalar %= self.order
        if scalar == 0 or element == self.identity:
            return self.identity
        if element == self.generator:
            return group.base_mult(scalar)
        return group.scalarmult(group.scalar_to_bytes(scalar), element)

    def add(self, a: bytes, b: bytes) -> bytes:
        if a == self.identity:
            return b
        if b == self.identity:
            return a
        return group.add(a, b)


EDWARDS25519 = Edwards25519()


# ---------------------------------------------------------------- RFC 9497 §2.2


def _prefixed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


def hash_to_scalar(grp: PrimeOrderGroup, context: bytes, msg: bytes) -> int:
    uniform = group.expand_message_xmd(msg, b"HashToScalar-" + context, 64)
    return int.from_bytes(uniform, "little") % grp.order


def _weights(grp: PrimeOrderGroup, context: bytes, b: bytes, c: Sequence[bytes],
             d: Sequence[bytes]) -> list[int]:
    seed = hashlib.sha512(_prefixed(b, b"Seed-" + context)).digest()
    head = len(seed).to_bytes(2, "big") + seed
    return [hash_to_scalar(grp, context, head + i.to_bytes(2, "big") + _prefixed(ci, di)
                           + b"Composite")
            for i, (ci, di) in enumerate(zip(c, d, strict=True))]


def _combine(grp: PrimeOrderGroup, weights: Sequence[int], elements: Sequence[bytes]) -> bytes:
    acc = grp.identity
    for w, e in zip(weights, elements, strict=True):
        acc = grp.add(grp.mul(w, e), acc)
    return acc


def compute_composites(grp: PrimeOrderGroup, context: bytes, b: bytes, c: Sequence[bytes],
                       d: Sequence[bytes]) -> tuple[bytes, bytes]:
    """RFC 9497 ComputeComposites: (M, Z) = (Σ d_i·C[i], Σ d_i·D[i])."""
    weights = _weights(grp, context, b, c, d)
    return _combine(grp, weights, c), _combine(grp, weights, d)


def _challenge(grp: PrimeOrderGroup, context: bytes, b: bytes, m: bytes, z: bytes, t2: bytes,
               t3: bytes) -> int:
    return hash_to_scalar(grp, context, _prefixed(b, m, z, t2, t3) + b"Challenge")


def _scalar_bytes(s: int) -> bytes:
    return s.to_bytes(32, "little")


def generate_proof(grp: PrimeOrderGroup, context: bytes, k: int, a: bytes, b: bytes,
                   c: Sequence[bytes], d: Sequence[bytes], *, nonce: int | None = None) -> bytes:
    """RFC 9497 GenerateProof: c || s proving k·A = B and k·C[i] = D[i] for every i.

    `nonce` exists for the RFC's known-answer vectors only; a key holder leaves it unset
    and r is drawn with `secrets` (reusing r for two proofs would reveal k).
    """
    if not c or len(c) != len(d):
        raise MalformedInput("a proof covers a non-empty batch with one output per input")
    weights = _weights(grp, context, b, c, d)
    m = _combine(grp, weights, c)
    z = grp.mul(k, m)  # ComputeCompositesFast
    r = group.random_scalar() if nonce is None else nonce
    challenge = _challenge(grp, context, b, m, z, grp.mul(r, a), grp.mul(r, m))
    return _scalar_bytes(challenge) + _scalar_bytes((r - challenge * k) % grp.order)


def verify_proof(grp: PrimeOrderGroup, context: bytes, a: bytes, b: bytes, c: Sequence[bytes],
                 d: Sequence[bytes], proof: bytes) -> bool:
    """RFC 9497 VerifyProof, after checking every element and both proof scalars (a
    malformed input is a failed proof, not an exception)."""
    if (not c or len(c) != len(d) or not isinstance(proof, bytes | bytearray)
            or len(proof) != PROOF_BYTES):
        return False
    challenge = int.from_bytes(proof[:32], "little")
    response = int.from_bytes(proof[32:], "little")
    if challenge >= grp.order or response >= grp.order:
        return False
    try:
        for element in (a, b, *c, *d):
            grp.check(element)
        m, z = compute_composites(grp, context, b, c, d)
        t2 = grp.add(grp.mul(response, a), grp.mul(challenge, b))
        t3 = grp.add(grp.mul(response, m), grp.mul(challenge, z))
    except MalformedInput:
        return False
    expected = _challenge(grp, context, b, m, z, t2, t3)
    return hmac.compare_digest(_scalar_bytes(expected), bytes(proof[:32]))


# ---------------------------------------------------------------- the xID hop


def commitment(scalar: bytes) -> bytes:
    """K = k·G: the public commitment of an xID key, as published in the log."""
    return group.base_mult(group.scalar_from_bytes(scalar))


def prove_hop(scalar: bytes, inputs: Sequence[bytes], outputs: Sequence[bytes]) -> bytes:
    """A key holder's proof that `outputs` = k·`inputs` under its commitment k·G."""
    k = group.scalar_from_bytes(scalar)
    return generate_proof(EDWARDS25519, XID_CONTEXT, k, EDWARDS25519.generator,
                          commitment(scalar), inputs, outputs)


def verify_hop(key_commitment: bytes, inputs: Sequence[bytes], outputs: Sequence[bytes],
               proof: bytes) -> bool:
    """Whether `proof` shows `outputs` = k·`inputs` for the k committed to by K."""
    return verify_proof(EDWARDS25519, XID_CONTEXT, EDWARDS25519.generator, key_commitment,
                        inputs, outputs, proof)
