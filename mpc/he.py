"""The claim check on the insurer's encrypted claim (TenSEAL BFV).

The insurer encrypts its claims under its own key; the serving node evaluates the
verdict against the plaintext anonymized candidate rows and answers ciphertexts that
decrypt to the verdict and (almost) nothing more; only the insurer can decrypt.

Parameters (`PARAMETERS`): BFV, polynomial degree N = 8192, coefficient modulus SEAL's
`BFVDefault(8192)` = 218 bits (43+43+44+44+44), plaintext modulus the 60-bit prime
t = 1152921504606830593 = 1 + 16384 * 70368744177663 (batching: t = 1 mod 2N). The
HomomorphicEncryption.org security standard (Albrecht et al., 2018, Table 1, ternary
secret) gives log q <= 218 for 128-bit classical security at N = 8192, so these
parameters are at the 128-bit level. The server refuses any other parameters.

The circuit, per claim and candidate slot, with d = a - c (a: admission day of the
row, c: the claim's visit day) and P(d) = d^3 - d = (a-c)^3 - (a-c), zero mod the prime t
exactly when d is -1, 0 or 1:

    date      = r  * P                           0 iff the visit matches
    diagnosis = r4 * P + r5 * (g - g_claim)      0 iff matched and same category
    amount    = r3 * P + r1 * (s - claimed) + r2 sign is [claimed <= s] when matched

with r, r5 uniform nonzero and r3, r4 uniform mod t, r1 log-uniform in
[2^R1_LOG_MIN, 2^R1_LOG_MAX) = [2^8, 2^27), 0 <= r2 < r1, fresh per slot. P is
linear in Enc(c), Enc(c^2), Enc(c^3), so the insurer sends those powers and the
server needs only plaintext multiplications.

To need one ciphertext in and one out per chunk (no rotations), each output is
spread over the slots of its terms: the insurer puts the 11 inputs of a slot group
(c, c^2, c^3 | c, c^2, c^3, g_claim | c, c^2, c^3, claimed) in 11 consecutive slots;
the server multiplies slot-wise and adds an additive sharing of each output's
constant term, so every decrypted slot is uniform on its own and only each group's
sum (mod t) is the output. The server adds a fresh public-key encryption of zero to
the answer so its (c0, c1) look fresh.

What the insurer learns (leakage statement):
- unmatched real slots and dummy slots: three independent uniform values (date one
  nonzero): nothing;
- the matched slot: date = 0 (the verdict bit); diagnosis = 0 or a uniform nonzero
  value (exactly the bit); amount = r1*(s - claimed) + r2. Its sign is the bit; its
  magnitude bounds |s - claimed| to within [|v| / 2^27 - 1, |v| / 2^8]: never the
  exact difference (r1 >= 256 with an unknown r2 < r1; an r1 allowed down to 1 would
  hand over s - claimed exactly once in 27 slots), and with r1 log-uniform the
  posterior on log2|s - claimed| is the prior cut to a window 19 bits wide. That
  window is a real leak of the difference's order of magnitude when the draw of r1
  is near an end of its range; a comparison without it needs bit decomposition;
- the slot position of a match (slots are in random order: nothing).
A dishonest insurer that encrypts arbitrary values instead of powers learns, per
real slot, whether a cubic of its choice vanishes at the admission day (at most 3
days) and the same masked category/amount tests: predicates on the consented
person's own visits at the named hospital, never on dummies or other persons.
Not "bits, not counts" yet. The verdict rule (`docs/verdict.md`) is three bits per
claim, the nested OR over slots of (found, found and amount, found and amount and
diagnosis), and `decrypt_verdicts` computes exactly those, so the three modes agree.
But here the OR is applied by the insurer AFTER decryption: the key holder sees the
per-slot outputs above, so it learns how many slots matched and which test held on
which visit, which `ss` never opens. `he` does not meet the bits-not-counts promise
until it is redesigned (issue 14 tracks it, with the noise-rewriting attack).
Not covered: the decryption noise. TenSEAL exposes no noise flooding, so the raw
noise of the answer (visible to the key holder, not through `decrypt`) is a function
of the server's random plaintext multipliers; no attack is known to us at these
sizes, but circuit privacy is not proven.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from mpc.claim.encoding import MAX_CATEGORY, MAX_DAY, MAX_FEN
from mpc.claim.errors import EngineMismatch
from mpc.claim.plain import nested_or
from mpc.errors import MalformedInput

POLY_MODULUS_DEGREE = 8192
PLAIN_MODULUS = 1152921504606830593
COEFF_MODULUS_BITS = 218
SLOTS = POLY_MODULUS_DEGREE
PARAMETERS = {
    "scheme": "BFV",
    "poly_modulus_degree": POLY_MODULUS_DEGREE,
    "plain_modulus": PLAIN_MODULUS,
    "coeff_modulus_bits": COEFF_MODULUS_BITS,
    "security_bits": 128,
    "standard": "HomomorphicEncryption.org security standard (2018), Table 1",
}
GROUP = 11  # slots per (claim, candidate): 3 date terms, 4 diagnosis, 4 amount
_DATE, _DIAG, _AMOUNT = slice(0, 3), slice(3, 7), slice(7, 11)
R1_LOG_MIN, R1_LOG_MAX = 8, 27
MAGIC_REQUEST = b"CGHEQ1"
MAGIC_RESPONSE = b"CGHER1"


def claims_per_ciphertext(k: int) -> int:
    return SLOTS // (GROUP * k)


# -- randomness mod t -------------------------------------------------------------------
def _uniform_mod_t(count: int, nonzero: bool = False) -> np.ndarray:
    """`count` uniform values in [0, t) (or [1, t)) from the OS CSPRNG, as Python ints."""
    out = np.empty(0, dtype=np.uint64)
    while len(out) < count:
        need = count - len(out) + 8
        draw = np.frombuffer(os.urandom(8 * need), dtype=np.uint64) >> np.uint64(4)
        keep = draw < np.uint64(PLAIN_MODULUS)
        if nonzero:
            keep &= draw != 0
        out = np.concatenate([out, draw[keep]])
    return out[:count].astype(object)


def _log_uniform_r1(count: int) -> tuple[np.ndarray, np.ndarray]:
    """r1 log-uniform in [2^R1_LOG_MIN, 2^R1_LOG_MAX), r2 uniform in [0, r1), as Python ints."""
    raw = np.frombuffer(os.urandom(24 * count), dtype=np.uint64).reshape(count, 3)
    span = np.uint64(R1_LOG_MAX - R1_LOG_MIN)
    exponent = (raw[:, 0] % span + np.uint64(R1_LOG_MIN)).astype(np.int64)
    low = raw[:, 1] & ((np.uint64(1) << exponent.astype(np.uint64)) - np.uint64(1))
    r1 = (np.uint64(1) << exponent.astype(np.uint64)) + low
    r2 = raw[:, 2] % r1
    return r1.astype(object), r2.astype(object)


# -- wire format ------------------------------------------------------------------------
def _pack(magic: bytes, header: dict, blobs: list[bytes]) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = [magic, struct.pack("!I", len(head)), head]
    for blob in blobs:
        parts += [struct.pack("!Q", len(blob)), blob]
    return b"".join(parts)


def _unpack(magic: bytes, data: bytes) -> tuple[dict, list[bytes]]:
    if not isinstance(data, (bytes, bytearray)) or not data.startswith(magic):
        raise MalformedInput("not an HE claim message")
    try:
        (head_len,) = struct.unpack_from("!I", data, len(magic))
        offset = len(magic) + 4
        header = json.loads(data[offset:offset + head_len])
        offset += head_len
        blobs = []
        while offset < len(data):
            (size,) = struct.unpack_from("!Q", data, offset)
            offset += 8
            if offset + size > len(data):
                raise MalformedInput("truncated ciphertext")
            blobs.append(bytes(data[offset:offset + size]))
            offset += size
    except (struct.error, ValueError) as exc:
        raise MalformedInput("malformed HE claim message") from exc
    if not isinstance(header, dict):
        raise MalformedInput("malformed HE header")
    return header, blobs


def _shape(header: dict) -> tuple[int, int]:
    n, k = header.get("n"), header.get("k")
    if not (isinstance(n, int) and isinstance(k, int) and n >= 0 and 1 <= k <= 64):
        raise MalformedInput("bad claim count or slot count")
    return n, k


# -- insurer side -----------------------------------------------------------------------
class HeClaimKey:
    """The insurer's BFV key pair. Keep it; send only `public_context()` to servers."""

    def __init__(self, context: ts.Context) -> None:
        if not context.is_private():
            raise MalformedInput("an HE claim key needs the secret key")
        self._context = context
        public = context.copy()
        public.make_context_public()
        self._public = public.serialize(save_public_key=True, save_secret_key=False,
                                        save_galois_keys=False, save_relin_keys=False)
        self.context_digest = hashlib.sha256(self._public).hexdigest()

    @classmethod
    def generate(cls) -> HeClaimKey:
        context = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=POLY_MODULUS_DEGREE,
                             plain_modulus=PLAIN_MODULUS)
        return cls(context)

    def public_context(self) -> bytes:
        """The serialized public context (public key only: no secret, relin or Galois keys)."""
        return self._public

    def encrypt_claims(self, claims: np.ndarray, k: int) -> bytes:
        """Encrypt int64 [n, 3] (visit_day, claimed_fen, category) for K-slot checking."""
        claims = np.asarray(claims, dtype=np.int64)
        if claims.ndim != 2 or claims.shape[1] != 3 or (claims < 0).any():
            raise MalformedInput("claims must be non-negative int64 [n, 3]")
        if (claims >= np.array([MAX_DAY, MAX_FEN, MAX_CATEGORY])).any():
            raise MalformedInput("claim field out of range")
        day = claims[:, 0].astype(object)
        powers = [day % PLAIN_MODULUS, day * day % PLAIN_MODULUS,
                  day * day * day % PLAIN_MODULUS]
        cat, claimed = claims[:, 2].astype(object), claims[:, 1].astype(object)
        group = np.stack(powers + powers + [cat] + powers + [claimed], axis=1)  # [n, 11]
        slots = np.repeat(group[:, None, :], k, axis=1)  # [n, k, 11]
        per = claims_per_ciphertext(k)
        blobs = []
        for start in range(0, len(claims), per):
            chunk = slots[start:start + per].reshape(-1)
            blobs.append(ts.bfv_vector(self._context, [int(v) for v in chunk]).serialize())
        header = {"n": len(claims), "k": k, "context": self.context_digest}
        return _pack(MAGIC_REQUEST, header, blobs)

    def decrypt_slots(self, response: bytes, n: int, k: int) -> np.ndarray:
        """Every decrypted slot, [n, k, 11] in [0, t): what the key holder can see."""
        header, blobs = _unpack(MAGIC_RESPONSE, response)
        if _shape(header) != (n, k) or header.get("context") != self.context_digest:
            raise EngineMismatch("this answer is for another request or key")
        per = claims_per_ciphertext(k)
        if len(blobs) != -(-n // per):
            raise MalformedInput("wrong number of answer ciphertexts")
        values = [
            np.array(_load_vector(self._context, blob, min(per, n - i * per) * k * GROUP)
                     .decrypt(), dtype=object) % PLAIN_MODULUS
            for i, blob in enumerate(blobs)
        ]
        if not values:
            return np.zeros((0, k, GROUP), dtype=object)
        return np.concatenate(values).reshape(n, k, GROUP)

    def decrypt_outputs(self, response: bytes, n: int, k: int) -> np.ndarray:
        """The [n, k, 3] outputs (date, diagnosis, amount) as centered integers."""
        groups = self.decrypt_slots(response, n, k)
        out = np.stack([groups[..., s].sum(-1) % PLAIN_MODULUS
                        for s in (_DATE, _DIAG, _AMOUNT)], -1)
        return np.where(out > PLAIN_MODULUS // 2, out - PLAIN_MODULUS, out)

    def decrypt_verdicts(self, response: bytes, n: int, k: int) -> np.ndarray:
        """int64 [n, 3] bits (visit_found, amount_consistent, diagnosis_match).

        The nested OR of `docs/verdict.md` (OR_j f_j, OR_j f_j a_j, OR_j f_j a_j g_j),
        applied HERE, after decryption: the key holder has already seen every slot's
        outputs, so in `he` this is the honest insurer's decoding, not a privacy
        boundary (see the module docstring).
        """
        out = self.decrypt_outputs(response, n, k)
        found = out[..., 0] == 0
        return nested_or(found, out[..., 2] >= 0, out[..., 1] == 0)


# -- server side ------------------------------------------------------------------------
@dataclass(frozen=True)
class HePublicContext:
    """An insurer's public context, checked to carry exactly our parameters."""

    context: ts.Context
    digest: str

    @classmethod
    def from_bytes(cls, data: bytes) -> HePublicContext:
        try:
            context = ts.context_from(data)
        except Exception as exc:
            raise MalformedInput("not a TenSEAL context") from exc
        if context.is_private() or context.has_secret_key():
            raise MalformedInput("the context carries a secret key; send the public one")
        if not context.has_public_key():
            raise MalformedInput("the context has no public key")
        seal = context.seal_context().data
        data_of = seal.key_context_data()
        parms = data_of.parms()
        plain = 2 * data_of.plain_upper_half_threshold() - 1
        if (
            parms.scheme().name != "BFV"
            or parms.poly_modulus_degree() != POLY_MODULUS_DEGREE
            or plain != PLAIN_MODULUS
            or data_of.total_coeff_modulus_bit_count() != COEFF_MODULUS_BITS
        ):
            raise MalformedInput("HE parameters differ from the claim-check parameters")
        return cls(context, hashlib.sha256(data).hexdigest())


def _load_vector(context: ts.Context, blob: bytes, size: int) -> ts.BFVVector:
    try:
        vec = ts.bfv_vector_from(context, blob)
        ciphertexts = vec.ciphertext()
    except Exception as exc:
        raise MalformedInput("not a BFV ciphertext for this context") from exc
    if vec.size() != size or len(ciphertexts) != 1 or ciphertexts[0].size() != 2:
        raise MalformedInput(f"ciphertext holds {vec.size()} slots, expected {size}")
    return vec


def _slot_plaintexts(rows: np.ndarray, valid: np.ndarray) -> tuple[list[int], list[int]]:
    """Per-slot multipliers and additive terms for rows [m, k, 3], valid [m, k]."""
    t = PLAIN_MODULUS
    m, k = valid.shape
    count = m * k
    a = rows[..., 0].reshape(-1).astype(object)
    s = rows[..., 1].reshape(-1).astype(object)
    g = rows[..., 2].reshape(-1).astype(object)
    live = valid.reshape(-1)
    k0, k1, k2, k3 = (a * a * a - a) % t, (1 - 3 * a * a) % t, (3 * a) % t, t - 1
    r, r5 = _uniform_mod_t(count, nonzero=True), _uniform_mod_t(count, nonzero=True)
    r3, r4 = _uniform_mod_t(count), _uniform_mod_t(count)
    r1, r2 = _log_uniform_r1(count)
    mult = np.stack([
        r * k1 % t, r * k2 % t, r * k3 % t,
        r4 * k1 % t, r4 * k2 % t, r4 * k3 % t, (t - r5) % t,
        r3 * k1 % t, r3 * k2 % t, r3 * k3 % t, (t - r1) % t,
    ], axis=1)
    constant = np.stack([
        r * k0 % t, (r4 * k0 + r5 * g) % t, (r3 * k0 + r1 * s + r2) % t,
    ], axis=1)
    # dummy slots: no dependence on the claim, outputs fresh uniform (date nonzero)
    mult[~live] = 0
    dummy = np.stack([_uniform_mod_t(count, nonzero=True), _uniform_mod_t(count),
                      _uniform_mod_t(count)], axis=1)
    constant[~live] = dummy[~live]
    # spread each constant as an additive sharing over its group's slots
    add = _uniform_mod_t(count * GROUP).reshape(count, GROUP)
    for j, part in enumerate((_DATE, _DIAG, _AMOUNT)):
        last = part.stop - 1
        add[:, last] = (constant[:, j] - add[:, part.start:last].sum(1)) % t
    return [int(v) for v in mult.reshape(-1)], [int(v) for v in add.reshape(-1)]


def evaluate_encrypted(
    public: HePublicContext, request: bytes, rows: np.ndarray, valid: np.ndarray
) -> bytes:
    """Server: the encrypted verdict of each claim against its candidate rows.

    `rows` int64 [n, k, 3] (admission_day, self_pay_fen, category) and `valid`
    bool [n, k] are the plaintext candidate slots in the request's claim order.
    """
    header, blobs = _unpack(MAGIC_REQUEST, request)
    n, k = _shape(header)
    if header.get("context") != public.digest:
        raise EngineMismatch("the request was encrypted under another context")
    rows = np.asarray(rows, dtype=np.int64)
    valid = np.asarray(valid, dtype=bool)
    if rows.shape != (n, k, 3) or valid.shape != (n, k):
        raise MalformedInput(f"candidate rows must be [{n}, {k}, 3] with valid [{n}, {k}]")
    # shuffle each claim's slots (again): a match's position must not follow row order
    order = np.argsort(np.frombuffer(os.urandom(8 * n * k), dtype=np.uint64).reshape(n, k),
                       axis=1)
    rows = np.take_along_axis(rows, order[..., None], axis=1)
    valid = np.take_along_axis(valid, order, axis=1)
    per = claims_per_ciphertext(k)
    if len(blobs) != -(-n // per):
        raise MalformedInput("wrong number of request ciphertexts")
    vectors = [
        _load_vector(public.context, blob, min(per, n - i * per) * k * GROUP)
        for i, blob in enumerate(blobs)
    ]  # validate everything before any work
    out = []
    for i, vec in enumerate(vectors):
        part = slice(i * per, min(n, (i + 1) * per))
        mult, add = _slot_plaintexts(rows[part], valid[part])
        vec.mul_(mult)
        vec.add_(add)
        vec.add_(ts.bfv_vector(public.context, [0] * len(add)))  # re-randomize
        out.append(vec.serialize())
    return _pack(MAGIC_RESPONSE, {"n": n, "k": k, "context": public.digest}, out)
