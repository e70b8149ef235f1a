"""The HE engine with the key at the regulator: exact bits, attacks mounted, bad input refused.

- Correctness: every test value the regulator decrypts is zero exactly when its predicate
  holds, and the bits equal the plaintext engine on claims with matches, near misses,
  equal amounts and dummies.
- Mounted as the malicious insurer (the old attack's party): it holds no key that opens
  anything; it sends the old noise-rewriting query shape, ciphertexts under its own key
  passed off as the regulator's, and values that are not powers or bits; what it gets back
  is three nested bits per claim, and for a query whose answer should not depend on the
  rows (its own key, garbage values) two different row tables give the same answer.
- Mounted as the curious regulator: the position of the deciding amount bit is uniform
  (the control, without the insurer's order, is the highest differing bit: a magnitude);
  a nonzero test value looks the same whatever |self-pay - claimed| is; dummy candidates
  never pass a test.
- Refusals: garbage, truncation, corrupted ciphertexts, three-part ciphertexts, another
  context, other parameters, a secret key in a context, an oversized K and a bit order that
  is not a permutation are typed errors before any work.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi

from mpc.claim import ss_shares
from mpc.claim.constants import MAX_K
from mpc.claim.errors import EngineMismatch
from mpc.claim.plain import plain_engine_bits
from mpc.errors import MalformedInput
from mpc.he import (
    AMOUNT_BITS,
    GROUP,
    MAGIC_REQUEST,
    MAGIC_RESPONSE,
    PLAIN_MODULUS,
    POLY_MODULUS_DEGREE,
    HeDecryptionKey,
    HePublicContext,
    _unpack,
    claims_per_ciphertext,
    encrypt_claims,
    evaluate_encrypted,
)

K = 4
T = PLAIN_MODULUS


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@pytest.fixture(scope="module")
def key() -> HeDecryptionKey:
    return HeDecryptionKey.generate()  # the regulator's


@pytest.fixture(scope="module")
def public(key) -> HePublicContext:
    return HePublicContext.from_bytes(key.public.data)  # what insurers and the operator get


@pytest.fixture(scope="module")
def case():
    """Claims against candidate rows, with matches, near misses, equal amounts and dummies."""
    rng = np.random.default_rng(5)
    n = 300
    rows = np.stack([rng.integers(19000, 19400, (n, K)), rng.integers(0, 2**31, (n, K)),
                     rng.integers(0, 36**3, (n, K))], -1)
    valid = rng.random((n, K)) < 0.7
    hit = rows[np.arange(n), rng.integers(0, K, n)]
    delta = np.where(rng.random(n) < 0.2, 0, rng.integers(-1000, 1000, n))  # 20%: equal
    claims = np.stack([
        hit[:, 0] + rng.integers(-3, 4, n),
        np.clip(hit[:, 1] + delta, 0, 2**31 - 1),
        np.where(rng.random(n) < 0.6, hit[:, 2], rng.integers(0, 36**3, n)),
    ], 1)
    return claims, rows, valid


def _answer(public, claims, rows, valid, k=K):
    return evaluate_encrypted(public, encrypt_claims(public, claims, k), rows, valid)


def test_parameters_are_the_documented_ones():
    assert _is_prime(PLAIN_MODULUS)
    assert PLAIN_MODULUS % (2 * POLY_MODULUS_DEGREE) == 1
    assert PLAIN_MODULUS.bit_length() == 40
    assert GROUP == 3 + 4 + 5 * 31 and claims_per_ciphertext(MAX_K) >= 1


def test_bits_equal_plain_engine(key, public, case):
    claims, rows, valid = case
    answer = _answer(public, claims, rows, valid)
    bits = key.verdict_bits(answer, len(claims), K)
    assert (bits == plain_engine_bits(claims, rows, valid)).all()
    # the case exercises every level, equal amounts included
    assert bits[:, 0].any() and bits[:, 1].any() and bits[:, 2].any()
    assert (bits[:, 0] > bits[:, 1]).any() and (bits[:, 1] > bits[:, 2]).any()


def test_each_test_value_is_zero_exactly_when_its_predicate_holds(key, public, case):
    """The regulator's view, per candidate: which tests are zero, against the predicates
    computed in the clear (candidates shuffled by the operator: compared as multisets)."""
    claims, rows, valid = case
    n = 60
    tests = key.test_values(_answer(public, claims[:n], rows[:n], valid[:n]), n, K) == 0
    day, amount, category = (claims[:n, None, j] for j in range(3))
    dated = valid[:n] & (np.abs(rows[:n, :, 0] - day) <= 1)
    expected = np.stack([dated, dated & (rows[:n, :, 2] == category),
                         dated & (amount > rows[:n, :, 1])], -1)
    seen = np.stack([tests[..., 0], tests[..., 1], tests[..., 2:].any(-1)], -1)
    # at most one amount bit decides, and only on a dated row
    assert (tests[..., 2:].sum(-1) <= 1).all()
    for i in range(n):
        assert sorted(map(tuple, seen[i].astype(int))) == sorted(
            map(tuple, expected[i].astype(int)))


# -- the malicious insurer ---------------------------------------------------------------------

def _request_with(public: HePublicContext, slots: np.ndarray, n: int, k: int,
                  context: ts.Context | None = None, order: np.ndarray | None = None) -> bytes:
    """A request whose slot values the insurer chose freely (any residues), optionally
    encrypted under a context of its own but labelled with the regulator's digest."""
    per = claims_per_ciphertext(k)
    blobs = []
    for start in range(0, n, per):
        chunk = slots[start:start + per].reshape(-1)
        blobs.append(ts.bfv_vector(context or public.context,
                                   [int(v) % T for v in chunk]).serialize())
    if order is None:
        order = np.tile(np.arange(AMOUNT_BITS), (n, k, 1))
    head = json.dumps({"n": n, "k": k, "context": public.digest,
                       "order": order.astype(np.uint8).tobytes().hex()}).encode()
    parts = [MAGIC_REQUEST, struct.pack("!I", len(head)), head]
    for blob in blobs:
        parts += [struct.pack("!Q", len(blob)), blob]
    return b"".join(parts)


def test_the_insurer_holds_no_key_that_opens_an_answer(key, public, case):
    """The old attack decrypted the answer with the insurer's own key and read slots and
    noise. Now the answer is under the regulator's key: the insurer's own key decrypts it
    to values with no relation to the rows, and the insurer is never sent it anyway (the
    regulator answers `verdict_bits`, packed as n x 3 bits)."""
    claims, rows, valid = case
    n = 12
    answer = _answer(public, claims[:n], rows[:n], valid[:n])
    own = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=POLY_MODULUS_DEGREE,
                     plain_modulus=PLAIN_MODULUS)
    (size,) = struct.unpack_from("!Q", answer, answer.index(b"}") + 1)
    start = answer.index(b"}") + 1 + 8
    blob = answer[start:start + size]  # the first ciphertext of the answer
    mine = np.array(ts.bfv_vector_from(own, blob).decrypt(), dtype=object) % T
    theirs = key.test_values(answer, n, K)
    # under the insurer's key: uniform values, no test group sums to zero ...
    groups = mine.reshape(n, K, GROUP)[..., :3].sum(-1) % T
    assert (groups != 0).all() and (theirs == 0).any()
    assert 0.4 < float(np.mean(mine.astype(np.float64))) / T < 0.6
    bits = key.verdict_bits(answer, n, K)
    payload = ss_shares.pack(ss_shares.KIND_RESULT, bits)
    assert ss_shares.unpack(payload, ss_shares.KIND_RESULT, (n, 3)).shape == (n, 3)
    assert len(payload) < 32 + 8 * 3 * n  # three int64 words per claim and a small header


def test_noise_rewriting_query_under_the_insurers_own_key_learns_nothing(key, public, case):
    """The insurer encrypts a zero-claim under its OWN key (whose noise it knows and could
    rewrite) and passes it off as the regulator's. Decrypted by the regulator it is
    garbage: every test nonzero, so the bits are all zero, and identical for two different
    row tables."""
    _claims, rows, valid = case
    n = 40
    own = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=POLY_MODULUS_DEGREE,
                     plain_modulus=PLAIN_MODULUS)
    crafted = np.zeros((n, K, GROUP), dtype=np.int64)
    request = _request_with(public, crafted, n, K, context=own)
    other_rows = rows[:n].copy()
    other_rows[..., 1] = np.random.default_rng(9).integers(0, 2**31, (n, K))
    views = [key.verdict_bits(evaluate_encrypted(public, request, r, valid[:n]), n, K)
             for r in (rows[:n], other_rows)]
    assert (views[0] == 0).all() and (views[1] == 0).all()
    assert (key.test_values(evaluate_encrypted(public, request, rows[:n], valid[:n]), n, K)
            != 0).all()


def test_crafted_values_yield_three_nested_bits_and_no_more(key, public, case):
    """Values that are not powers, bits or prefixes (huge, negative, repeated): whatever
    the insurer encrypts, the regulator's answer is a nested chain of three bits per claim,
    so at most three bits per claim leave, spent from the consent's check budget."""
    _claims, rows, valid = case
    n = 30
    rng = np.random.default_rng(11)
    for crafted in (rng.integers(0, T, (n, K, GROUP)), np.full((n, K, GROUP), T - 1),
                    np.tile(rng.integers(0, 2**40, GROUP), (n, K, 1))):
        bits = key.verdict_bits(
            evaluate_encrypted(public, _request_with(public, crafted, n, K), rows[:n],
                               valid[:n]), n, K)
        assert bits.shape == (n, 3) and np.isin(bits, (0, 1)).all()
        assert (np.diff(bits, axis=1) <= 0).all()


def test_a_malicious_date_test_asks_about_days_of_its_choice_only(key, public):
    """The documented freedom, mounted: in place of (c, c^2, c^3) the insurer sends
    values built from three days it picks, so the date test is "a visit on day d1, d2 or
    d3", not a window. That is still one bit about the candidate rows."""
    d = [19000, 19010, 19020]
    # P(a - c) with (c, c^2, c^3) replaced by (u, v, w) is a^3 - 3u a^2 + (3v - 1) a + (u - w);
    # matching (a - d1)(a - d2)(a - d3) = a^3 - e1 a^2 + e2 a - e3:
    e1, e2, e3 = sum(d), d[0] * d[1] + d[0] * d[2] + d[1] * d[2], d[0] * d[1] * d[2]
    u = e1 * pow(3, -1, T) % T
    v = (e2 + 1) * pow(3, -1, T) % T
    w = (u + e3) % T
    rows = np.array([[[19010, 5, 1], [19500, 5, 1], [0, 0, 0], [0, 0, 0]],
                     [[19011, 5, 1], [19500, 5, 1], [0, 0, 0], [0, 0, 0]]])
    valid = np.array([[True, True, False, False]] * 2)
    slots = np.zeros((2, K, GROUP), dtype=object)
    slots[..., 0], slots[..., 1], slots[..., 2] = u, v, w
    bits = key.verdict_bits(evaluate_encrypted(public, _request_with(public, slots, 2, K),
                                               rows, valid), 2, K)
    assert list(bits[:, 0]) == [1, 0]  # 19010 is a chosen day, 19011 is not


# -- the curious regulator -----------------------------------------------------------------------

def _deciding_positions(key, public, amount, selfpay, order=None) -> np.ndarray:
    n = len(amount)
    claims = np.stack([np.full(n, 19000), amount, np.full(n, 7)], 1)
    rows = np.zeros((n, K, 3), dtype=np.int64)
    rows[:, :, 0], rows[:, :, 1], rows[:, :, 2] = 19000, selfpay[:, None], 7
    valid = np.zeros((n, K), dtype=bool)
    valid[:, 0] = True
    if order is None:
        request = encrypt_claims(public, claims, K)
    else:  # CONTROL: the insurer's encoding with the bits in their natural order
        request = _honest_slots_request(public, claims, order)
    tests = key.test_values(evaluate_encrypted(public, request, rows, valid), n, K)
    zero = tests[..., 2:] == 0  # [n, K, 31]
    hit = zero.any(-1)
    assert hit.sum(1).tolist() == [1] * n  # one deciding bit per claim, on its one real row
    return np.argmax(zero[hit], axis=-1)


def _honest_slots_request(public, claims, order) -> bytes:
    n = len(claims)
    day, amount, cat = claims[:, 0], claims[:, 1], claims[:, 2]
    bits = (amount[:, None] >> np.arange(AMOUNT_BITS)) & 1
    prefixes = amount[:, None] >> (np.arange(AMOUNT_BITS) + 1)
    powers = np.stack([day, day * day, day * day * day], 1)
    per_bit = np.concatenate([np.repeat(powers[:, None, :], AMOUNT_BITS, 1), bits[..., None],
                              prefixes[..., None]], -1).reshape(n, -1)
    group = np.concatenate([powers, powers, cat[:, None], per_bit], 1)
    slots = np.repeat(group[:, None, :], K, 1)
    return _request_with(public, slots, n, K, order=order)


def test_the_deciding_amount_bit_does_not_locate_the_difference(key, public):
    """Claimed amounts just above the self-pay (difference 1..3) against far above
    (difference ~2^30): with the insurer's random order, the position of the zero the
    regulator sees has the same spread for both. CONTROL: in natural order the position is
    the highest differing bit, which tells the two groups apart completely."""
    n = 120
    rng = np.random.default_rng(3)
    selfpay = rng.integers(2**10, 2**20, n)
    near, far = selfpay + rng.integers(1, 4, n), selfpay + 2**30
    natural = np.tile(np.arange(AMOUNT_BITS), (n, K, 1))
    control = [_deciding_positions(key, public, a, selfpay, order=natural) for a in (near, far)]
    assert control[0].max() < 12 and (control[1] == 30).all()  # natural order: a magnitude
    spread = [_deciding_positions(key, public, a, selfpay) for a in (near, far)]
    for positions in spread:
        assert len(set(positions.tolist())) > 20  # spread over the 31 positions
        assert 9 < positions.mean() < 21  # uniform mean 15
    assert abs(spread[0].mean() - spread[1].mean()) < 6


def test_nonzero_values_carry_no_magnitude(key, public):
    """Equal amounts (difference 0) against a difference of 5000 fen, the old engine's
    leak: the nonzero test values the regulator decrypts are uniform either way."""
    n = 60
    selfpay = np.full(n, 500_000)
    views = []
    for claimed in (selfpay, selfpay + 5000):
        claims = np.stack([np.full(n, 19000), claimed, np.full(n, 7)], 1)
        rows = np.zeros((n, K, 3), dtype=np.int64)
        rows[..., 0], rows[..., 1], rows[..., 2] = 19000, 500_000, 7
        tests = key.test_values(_answer(public, claims, rows, np.ones((n, K), bool)), n, K)
        values = tests[tests != 0].astype(np.float64) / T
        views.append(values)
        assert 0.45 < values.mean() < 0.55 and values.min() < 0.01 and values.max() > 0.99
    assert abs(views[0].mean() - views[1].mean()) < 0.03


def test_dummy_candidates_never_pass_a_test(key, public, case):
    claims, rows, _valid = case
    n = 40
    none_valid = np.zeros((n, K), dtype=bool)
    tests = key.test_values(_answer(public, claims[:n], rows[:n], none_valid), n, K)
    assert (tests != 0).all()


def _noise_budgets(key, answer: bytes) -> list[int]:
    """The regulator's view of an answer's noise: SEAL's remaining budget per ciphertext,
    measured with the secret key the regulator holds."""
    context = key._context  # the regulator's own key material
    decryptor = sealapi.Decryptor(context.seal_context().data, context.secret_key().data)
    _, blobs = _unpack(MAGIC_RESPONSE, answer)
    return [decryptor.invariant_noise_budget(ts.bfv_vector_from(context, b).ciphertext()[0])
            for b in blobs]


def test_dummy_candidates_leave_the_noise_of_real_rows(key, public, case):
    """A regulator reading the noise budget of each answer ciphertext cannot tell a claim
    whose candidates are all dummies from one whose candidates are all real."""
    claims, rows, _valid = case
    n = 3 * claims_per_ciphertext(K)
    real = _noise_budgets(key, _answer(public, claims[:n], rows[:n], np.ones((n, K), bool)))
    dummy = _noise_budgets(key, _answer(public, claims[:n], rows[:n], np.zeros((n, K), bool)))
    assert max(abs(a - b) for a in real for b in dummy) <= 1, (real, dummy)
    # control: the measurement does see the difference a dummy with zero multipliers made
    # (its slots were fresh encryptions, with the budget of one)
    fresh = ts.bfv_vector(key._context, [0] * 8).ciphertext()[0]
    decryptor = sealapi.Decryptor(key._context.seal_context().data,
                                  key._context.secret_key().data)
    assert decryptor.invariant_noise_budget(fresh) > max(real) + 20


# -- refusals --------------------------------------------------------------------------------------

def test_parameters_and_contexts_are_checked():
    weak = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=4096, plain_modulus=1032193)
    weak.make_context_public()
    with pytest.raises(MalformedInput, match="parameters"):
        HePublicContext.from_bytes(weak.serialize())
    with pytest.raises(MalformedInput):
        HePublicContext.from_bytes(b"not a context at all")
    private = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=POLY_MODULUS_DEGREE,
                         plain_modulus=PLAIN_MODULUS)
    with pytest.raises(MalformedInput, match="secret key"):
        HePublicContext.from_bytes(private.serialize(save_secret_key=True))


def test_operator_refuses_bad_requests_before_any_work(key, public, case):
    claims, rows, valid = case
    request = encrypt_claims(public, claims[:3], K)
    r, v = rows[:3], valid[:3]
    with pytest.raises(MalformedInput):
        evaluate_encrypted(public, b"garbage", r, v)
    with pytest.raises(MalformedInput):
        evaluate_encrypted(public, request[:-5000], r, v)
    corrupted = bytearray(request)
    corrupted[-20000:-10000] = bytes(10000)
    with pytest.raises(MalformedInput):
        evaluate_encrypted(public, bytes(corrupted), r, v)
    with pytest.raises(MalformedInput, match="candidate rows"):
        evaluate_encrypted(public, request, rows[:4], valid[:4])
    other = HeDecryptionKey.generate().public
    with pytest.raises(EngineMismatch):
        evaluate_encrypted(public, encrypt_claims(other, claims[:3], K), r, v)
    with pytest.raises(MalformedInput, match="K is 1 to"):
        encrypt_claims(public, claims[:3], MAX_K + 1)
    head = json.dumps({"n": 1, "k": MAX_K + 1, "context": public.digest, "order": ""}).encode()
    big = MAGIC_REQUEST + struct.pack("!I", len(head)) + head
    with pytest.raises(MalformedInput, match="K is 1 to"):
        evaluate_encrypted(public, big, rows[:1], valid[:1])
    repeated = np.zeros((3, K, AMOUNT_BITS))  # every group "tests bit 0"
    with pytest.raises(MalformedInput, match="permutation"):
        evaluate_encrypted(public, _request_with(public, np.zeros((3, K, GROUP)), 3, K,
                                                 order=repeated), r, v)


def test_a_three_part_ciphertext_is_refused(public, case):
    """A product of two ciphertexts (three parts) would change the noise and the
    arithmetic: only fresh-shaped two-part ciphertexts are evaluated."""
    _claims, rows, valid = case
    relin = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=POLY_MODULUS_DEGREE,
                       plain_modulus=PLAIN_MODULUS)
    relin.auto_relin = False
    size = K * GROUP
    vec = ts.bfv_vector(relin, [1] * size) * ts.bfv_vector(relin, [2] * size)
    assert vec.ciphertext()[0].size() == 3
    head = json.dumps({"n": 1, "k": K, "context": public.digest,
                       "order": np.tile(np.arange(AMOUNT_BITS), (1, K, 1)).astype(np.uint8)
                       .tobytes().hex()}).encode()
    blob = vec.serialize()
    request = b"".join([MAGIC_REQUEST, struct.pack("!I", len(head)), head,
                        struct.pack("!Q", len(blob)), blob])
    with pytest.raises(MalformedInput):
        evaluate_encrypted(public, request, rows[:1], valid[:1])


def _varint(x: int) -> bytes:
    out = b""
    while x > 0x7F:
        out, x = out + bytes([x & 0x7F | 0x80]), x >> 7
    return out + bytes([x])


def _as_vector_blob(ciphertext, size: int, tmp_path) -> bytes:
    """A raw SEAL ciphertext wrapped as TenSEAL's serialized BFV vector of `size` slots
    (its protobuf: field 1 the shape, field 2 the ciphertext): what an attacker crafts."""
    path = tmp_path / "ct.bin"
    ciphertext.save(str(path))
    raw, shape = path.read_bytes(), _varint(size)
    return b"\x0a" + _varint(len(shape)) + shape + b"\x12" + _varint(len(raw)) + raw


def test_ciphertexts_off_the_top_of_the_chain_or_in_ntt_form_are_refused(public, case,
                                                                          tmp_path):
    """A mod-switched or NTT-form ciphertext has two parts and the right slot count, but
    SEAL would fail on it halfway through the evaluation: refused, typed, before any work."""
    claims, rows, valid = case
    header, blobs = _unpack(MAGIC_REQUEST, encrypt_claims(public, claims[:1], K))
    fresh = ts.bfv_vector_from(public.context, blobs[0]).ciphertext()[0]
    evaluator = sealapi.Evaluator(public.context.seal_context().data)
    switched, ntt = sealapi.Ciphertext(), sealapi.Ciphertext()
    evaluator.mod_switch_to_next(fresh, switched)
    evaluator.multiply_plain(fresh, sealapi.Plaintext("1"), ntt)
    evaluator.transform_to_ntt_inplace(ntt)
    control = _as_vector_blob(fresh, K * GROUP, tmp_path)
    for crafted, refused in ((control, False), (_as_vector_blob(switched, K * GROUP, tmp_path),
                             True), (_as_vector_blob(ntt, K * GROUP, tmp_path), True)):
        head = json.dumps(header).encode()
        request = b"".join([MAGIC_REQUEST, struct.pack("!I", len(head)), head,
                            struct.pack("!Q", len(crafted)), crafted])
        if refused:
            with pytest.raises(MalformedInput, match="not a fresh ciphertext"):
                evaluate_encrypted(public, request, rows[:1], valid[:1])
        else:  # the wrapping itself is sound: the honest ciphertext so wrapped is evaluated
            evaluate_encrypted(public, request, rows[:1], valid[:1])


def test_the_regulator_refuses_answers_for_other_requests_or_keys(key, public, case):
    claims, rows, valid = case
    answer = _answer(public, claims[:3], rows[:3], valid[:3])
    with pytest.raises(EngineMismatch):
        key.verdict_bits(answer, 4, K)
    with pytest.raises(EngineMismatch):
        HeDecryptionKey.generate().verdict_bits(answer, 3, K)
    with pytest.raises(MalformedInput):
        key.verdict_bits(b"CGHER2" + b"\x00" * 10, 3, K)


def test_the_key_round_trips_through_its_sealed_form(key, public, case):
    claims, rows, valid = case
    again = HeDecryptionKey.from_bytes(key.to_bytes())
    assert again.public.digest == key.public.digest
    answer = _answer(public, claims[:5], rows[:5], valid[:5])
    assert (again.verdict_bits(answer, 5, K) == key.verdict_bits(answer, 5, K)).all()
    other = HeDecryptionKey.generate().to_bytes()
    size = struct.unpack_from("!Q", other)[0]
    swapped = struct.pack("!Q", len(key.public.data)) + key.public.data + other[8 + size:]
    with pytest.raises(MalformedInput, match="not this secret key"):
        HeDecryptionKey.from_bytes(swapped)
