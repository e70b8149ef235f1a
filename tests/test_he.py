"""The HE engine: correct bits, nothing readable beyond the masked verdict, bad input refused."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from mpc.claim.errors import EngineMismatch
from mpc.claim.plain import plain_engine_bits
from mpc.errors import MalformedInput
from mpc.he import (
    PLAIN_MODULUS,
    POLY_MODULUS_DEGREE,
    HeClaimKey,
    HePublicContext,
    evaluate_encrypted,
)

K = 4


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
def key():
    return HeClaimKey.generate()


@pytest.fixture(scope="module")
def server(key):
    return HePublicContext.from_bytes(key.public_context())


@pytest.fixture(scope="module")
def case():
    """Claims against candidate rows, with matches, near misses and dummies."""
    rng = np.random.default_rng(5)
    n = 400
    rows = np.stack([rng.integers(19000, 19400, (n, K)), rng.integers(0, 2**31, (n, K)),
                     rng.integers(0, 36**3, (n, K))], -1)
    valid = rng.random((n, K)) < 0.7
    hit = rows[np.arange(n), rng.integers(0, K, n)]
    claims = np.stack([
        hit[:, 0] + rng.integers(-3, 4, n),
        np.clip(hit[:, 1] + rng.integers(-1000, 1000, n), 0, 2**31 - 1),
        np.where(rng.random(n) < 0.6, hit[:, 2], rng.integers(0, 36**3, n)),
    ], 1)
    return claims, rows, valid


def test_parameters_are_the_documented_ones():
    assert _is_prime(PLAIN_MODULUS)
    assert PLAIN_MODULUS % (2 * POLY_MODULUS_DEGREE) == 1
    assert PLAIN_MODULUS.bit_length() == 60


def test_bits_equal_plain_engine(key, server, case):
    claims, rows, valid = case
    answer = evaluate_encrypted(server, key.encrypt_claims(claims, K), rows, valid)
    assert (key.decrypt_verdicts(answer, len(claims), K) == plain_engine_bits(
        claims, rows, valid)).all()


def test_decrypted_answer_holds_only_masked_verdicts(key, server, case):
    claims, rows, valid = case
    n = len(claims)
    answer = evaluate_encrypted(server, key.encrypt_claims(claims, K), rows, valid)
    slots = key.decrypt_slots(answer, n, K).astype(np.float64)
    outputs = key.decrypt_outputs(answer, n, K)
    date, diag, amount = (outputs[..., j] for j in range(3))
    # the server shuffles each claim's slots: undo it by matching the zero date outputs
    match_plain = valid & (np.abs(rows[..., 0] - claims[:, None, 0]) <= 1)
    assert ((date == 0).sum(1) == match_plain.sum(1)).all()
    match = date == 0
    hit = match_plain.argmax(1)
    has = match_plain.sum(1) == 1  # claims with exactly one matching slot
    assert match.any() and (~match).any()

    # every single slot is uniform mod t on its own: no small values, mean near t/2
    assert (slots < 2**50).mean() < 0.01
    assert abs(slots.mean() / PLAIN_MODULUS - 0.5) < 0.01
    # the date output is large and uniform on the other slots
    big = np.abs(date[~match].astype(np.float64))
    assert (big > 2**50).mean() > 0.99
    # unmatched slots' diagnosis and amount outputs are uniform: about half negative
    for out in (diag, amount):
        free = out[~match].astype(np.float64)
        assert (np.abs(free) > 2**50).mean() > 0.99
        assert 0.4 < (free < 0).mean() < 0.6
    # matched slots: the diagnosis output is 0 iff same category, otherwise large
    matched_row = rows[np.arange(len(rows)), hit][has]
    same = matched_row[:, 2] == claims[has, 2]
    diag_hit, amount_hit = diag[has][match[has]], amount[has][match[has]]  # claim order
    assert ((diag_hit == 0) == same).all()
    assert (np.abs(diag_hit[~same].astype(np.float64)) > 2**40).all()
    # matched slots: the amount output's sign is the verdict; magnitude is r1*delta + r2
    delta = matched_row[:, 1] - claims[has, 1]
    assert ((amount_hit >= 0) == (delta >= 0)).all()
    scaled = amount_hit.astype(object)
    d = delta.astype(object)
    assert all(dv * 2**8 <= v < (dv + 1) * 2**27 if dv >= 0 else (dv * 2**27) <= v < 0
               for v, dv in zip(scaled, d, strict=True))
    # r1 >= 2^8: the amount output never hands over the difference itself
    assert not any(v == dv for v, dv in zip(scaled, d, strict=True) if dv != 0)
    # no decrypted slot, date or diagnosis output is one of the server's plaintext fields,
    # and no amount output is its own row's self-pay
    secrets = set(rows.reshape(-1).tolist()) - {0}
    seen = set(slots.astype(object).reshape(-1).tolist())
    seen |= set(date.reshape(-1).tolist()) | set(diag.reshape(-1).tolist())
    assert not (seen & secrets)
    assert (amount_hit != matched_row[:, 1]).all()


def test_server_refuses_a_context_with_secret_key(key):
    private = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=POLY_MODULUS_DEGREE,
                         plain_modulus=PLAIN_MODULUS)
    with pytest.raises(MalformedInput, match="secret key"):
        HePublicContext.from_bytes(private.serialize(save_secret_key=True))


def test_server_refuses_other_parameters():
    weak = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=4096, plain_modulus=1032193)
    weak.make_context_public()
    with pytest.raises(MalformedInput, match="parameters"):
        HePublicContext.from_bytes(weak.serialize())
    with pytest.raises(MalformedInput):
        HePublicContext.from_bytes(b"not a context at all")


def test_server_refuses_garbage_and_mismatched_requests(key, server, case):
    claims, rows, valid = case
    request = key.encrypt_claims(claims[:3], K)
    with pytest.raises(MalformedInput):
        evaluate_encrypted(server, b"garbage", rows[:3], valid[:3])
    with pytest.raises(MalformedInput):
        evaluate_encrypted(server, request[:-5000], rows[:3], valid[:3])
    corrupted = bytearray(request)
    corrupted[-20000:-10000] = bytes(10000)
    with pytest.raises(MalformedInput):
        evaluate_encrypted(server, bytes(corrupted), rows[:3], valid[:3])
    with pytest.raises(MalformedInput, match="candidate rows"):
        evaluate_encrypted(server, request, rows[:4], valid[:4])
    other = HeClaimKey.generate()
    with pytest.raises(EngineMismatch):
        evaluate_encrypted(server, other.encrypt_claims(claims[:3], K), rows[:3], valid[:3])


def test_insurer_refuses_answers_for_other_requests(key, server, case):
    claims, rows, valid = case
    answer = evaluate_encrypted(server, key.encrypt_claims(claims[:3], K), rows[:3], valid[:3])
    with pytest.raises(EngineMismatch):
        key.decrypt_verdicts(answer, 4, K)
    with pytest.raises(MalformedInput):
        key.decrypt_verdicts(b"CGHER1" + b"\x00" * 10, 3, K)
