"""Private intersection-size and -sum agree with the plaintext oracle and refuse bad input."""

import random

import pytest

from mpc import psi
from mpc.errors import IntersectionTooSmall, MalformedInput, ProtocolStateError
from mpc.hazmat import _x25519, elgamal, group
from mpc.hazmat.parallel import MIN_PARALLEL_ITEMS

POLICY = psi.IntersectionPolicy(min_intersection=3, max_value=1000)


def sets(n_a=120, n_b=150, overlap=40, seed=1):
    rng = random.Random(seed)
    ids_a = [f"person-{i}" for i in range(n_a)]
    ids_b = [f"person-{i}" for i in range(n_a - overlap, n_a - overlap + n_b)]
    values = [rng.randrange(POLICY.max_value + 1) for _ in ids_b]
    return ids_a, ids_b, values


def oracle(ids_a, ids_b, values):
    common = set(ids_a) & set(ids_b)
    return len(common), sum(v for i, v in zip(ids_b, values, strict=True) if i in common)


def run(a, b):
    """The three messages, each through its JSON wire form, as nodes would carry them."""
    request = psi.JoinRequest.model_validate_json(a.request().model_dump_json())
    response = psi.JoinResponse.model_validate_json(b.respond(request).model_dump_json())
    outcome = psi.JoinOutcome.model_validate_json(a.finish(response).model_dump_json())
    return b.reveal(outcome)


@pytest.mark.parametrize("seed", [1, 2])
def test_intersection_sum_equals_plaintext_oracle(seed):
    ids_a, ids_b, values = sets(seed=seed)
    result = psi.intersection_sum(ids_a, ids_b, values, policy=POLICY)
    assert (result.size, result.sum) == oracle(ids_a, ids_b, values)
    assert not result.noisy


def test_roles_over_the_wire_and_what_each_side_knows():
    ids_a, ids_b, values = sets(n_a=80, n_b=60, overlap=25)
    a = psi.IdHolder(ids_a, POLICY)
    b = psi.ValueHolder(ids_b, values, POLICY)
    result = run(a, b)
    assert (result.size, result.sum) == oracle(ids_a, ids_b, values)
    assert a.size == 25


def test_intersection_size_only():
    ids_a, ids_b, _ = sets(n_a=100, n_b=70, overlap=33)
    result = psi.intersection_size(ids_a, ids_b, policy=POLICY)
    assert (result.size, result.sum) == (33, None)


def test_duplicate_ids_count_once_and_disjoint_sets_refuse():
    result = psi.intersection_size(["x", "x", "y", "z", "w"], ["x", "y", "z", "z"], policy=POLICY)
    assert result.size == 3
    with pytest.raises(IntersectionTooSmall):
        psi.intersection_size(["a", "b"], ["c", "d"], policy=POLICY)


def test_every_message_is_shuffled():
    ids = [f"id-{i}" for i in range(64)]
    a = psi.IdHolder(ids, POLICY, with_sum=False)
    request = a.request()
    in_order = psi._hash_and_key(a._key, [i.encode() for i in ids])
    assert request.points != in_order
    assert sorted(group.unpack(request.points)) == sorted(group.unpack(in_order))

    b = psi.ValueHolder(ids, list(range(64)), POLICY)
    response = b.respond(psi.IdHolder(ids, POLICY).request())
    keyed_in_order = psi._hash_and_key(b._key, [i.encode() for i in ids])
    assert response.keyed != keyed_in_order
    assert sorted(group.unpack(response.keyed)) == sorted(group.unpack(keyed_in_order))


def test_below_minimum_is_refused_and_the_session_is_spent():
    ids_a, ids_b, values = sets(n_a=30, n_b=30, overlap=2)
    a = psi.IdHolder(ids_a, POLICY)
    b = psi.ValueHolder(ids_b, values, POLICY)
    response = b.respond(a.request())
    with pytest.raises(IntersectionTooSmall) as refused:
        a.finish(response)
    assert refused.value.http_status == 403
    with pytest.raises(ProtocolStateError):
        a.finish(response)  # no second draw of the noise


def test_noise_perturbs_within_its_scale():
    ids_a, ids_b, values = sets(n_a=60, n_b=60, overlap=30)
    policy = psi.IntersectionPolicy(min_intersection=0, max_value=1000, epsilon=2.0)
    size, total = oracle(ids_a, ids_b, values)
    results = [psi.intersection_sum(ids_a, ids_b, values, policy=policy) for _ in range(4)]
    assert all(r.noisy for r in results)
    # size scale 1/(eps/2) = 1, sum scale 1000/(eps/2) = 1000; 40 scales is the clip
    assert all(abs(r.size - size) <= 40 and abs(r.sum - total) <= 40_000 for r in results)
    assert any(r.sum != total for r in results)


def test_discrete_laplace_is_centred_with_the_right_spread():
    draws = [psi._discrete_laplace(5.0) for _ in range(4000)]
    mean = sum(draws) / len(draws)
    mean_abs = sum(abs(d) for d in draws) / len(draws)
    assert abs(mean) < 0.6
    # E|X| for the two-sided geometric with q = e^(-1/5): 2q/(1-q^2) ≈ 4.98
    assert 4.3 < mean_abs < 5.7


def test_protocol_state_and_policy_mismatch_are_refused():
    ids_a, ids_b, values = sets(n_a=20, n_b=20, overlap=10)
    a = psi.IdHolder(ids_a, POLICY)
    with pytest.raises(ProtocolStateError):
        a.finish(
            psi.ValueHolder(ids_b, values, POLICY).respond(psi.IdHolder(ids_a, POLICY).request())
        )
    request = a.request()
    with pytest.raises(ProtocolStateError):
        a.request()
    other = psi.IntersectionPolicy(min_intersection=1, max_value=1000)
    with pytest.raises(ProtocolStateError):
        psi.ValueHolder(ids_b, values, other).respond(request)
    with pytest.raises(ProtocolStateError):
        psi.ValueHolder(ids_b, policy=POLICY).respond(request)  # sum asked, no values held
    b = psi.ValueHolder(ids_b, values, POLICY)
    response = b.respond(request)
    with pytest.raises(ProtocolStateError):
        b.respond(request)
    with pytest.raises(ProtocolStateError):
        b.reveal(psi.JoinOutcome(session="0" * 32, size=10, encrypted_sum=None))
    assert b.reveal(a.finish(response)).size == 10


def test_malformed_points_and_ciphertexts_are_refused_before_matching():
    ids_a, ids_b, values = sets(n_a=20, n_b=20, overlap=10)
    a = psi.IdHolder(ids_a, POLICY)
    b = psi.ValueHolder(ids_b, values, POLICY)
    request = a.request()
    good = b.respond(request)

    small_order = bytes(32)  # u = 0
    non_canonical = group.FIELD_PRIME.to_bytes(32, "little")
    for bad_point in (small_order, non_canonical):
        keyed = bad_point + good.keyed[32:]
        with pytest.raises(MalformedInput, match="point 0"):
            a.finish(good.model_copy(update={"keyed": keyed}))
        bad_request = request.model_copy(update={"points": request.points[:-32] + bad_point})
        with pytest.raises(MalformedInput, match="point 19"):
            psi.ValueHolder(ids_b, values, POLICY).respond(bad_request)

    off_curve = next(
        y.to_bytes(32, "little") for y in range(2, 1000) if not _decodes(y.to_bytes(32, "little"))
    )
    # A malformed ciphertext is refused whichever row it sits in, matched or not.
    for row in range(20):
        cts = bytearray(good.ciphertexts)
        cts[row * 64 + 32 : row * 64 + 64] = off_curve
        with pytest.raises(MalformedInput, match=f"ciphertext {row}"):
            a.finish(good.model_copy(update={"ciphertexts": bytes(cts)}))
    assert a.finish(good).size == 10  # the failures changed nothing


def _decodes(point):
    try:
        group.add(point, point)
        return True
    except MalformedInput:
        return False


def test_wire_models_refuse_bad_shapes():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        psi.JoinRequest(session="0" * 32, policy=POLICY, with_sum=True, points=b"\x00" * 33)
    with pytest.raises(ValidationError):
        psi.JoinRequest(session="not-hex", policy=POLICY, with_sum=True, points=b"")
    with pytest.raises(ValidationError):
        psi.JoinResponse(
            session="0" * 32, double_keyed=b"", keyed=b"\x00" * 32, ciphertexts=b"\x00" * 64
        )
    with pytest.raises(ValidationError):
        psi.JoinOutcome(session="0" * 32, size=-1)


def test_value_and_range_checks():
    with pytest.raises(MalformedInput):
        psi.ValueHolder(["a", "b"], [1, 1001], POLICY)
    with pytest.raises(MalformedInput):
        psi.ValueHolder(["a", "b"], [1, -1], POLICY)
    with pytest.raises(MalformedInput):
        psi.ValueHolder(["a", "b"], [1, 2.5], POLICY)
    with pytest.raises(MalformedInput):
        psi.ValueHolder(["a", "a"], [1, 2], POLICY)
    with pytest.raises(MalformedInput):
        psi.ValueHolder(["a"], [1, 2], POLICY)
    huge = psi.IntersectionPolicy(max_value=2**39)
    with pytest.raises(MalformedInput, match="2\\^40"):
        psi.ValueHolder(["a", "b", "c"], [1, 2, 3], huge)


def test_elgamal_sum_decrypts_and_projection_strips_small_order_parts():
    secret, public = elgamal.keygen()
    cts = elgamal.encrypt_own(secret, [5, 7, 11])
    total = elgamal.sum_all(cts)
    assert elgamal.discrete_log(elgamal.decrypt_to_point(secret, total), 0, 100) == 23
    order_8 = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")
    tainted = group.add(total[:32], order_8) + group.add(total[32:], order_8)
    with pytest.raises(MalformedInput):
        elgamal.decrypt_to_point(secret, tainted)  # libsodium refuses off-subgroup points
    cleaned = elgamal.project(tainted)
    assert elgamal.discrete_log(elgamal.decrypt_to_point(secret, cleaned), 0, 100) == 23
    negative = elgamal.add(cleaned, elgamal.encrypt(public, -30))
    assert elgamal.discrete_log(elgamal.decrypt_to_point(secret, negative), -50, 50) == -7
    with pytest.raises(MalformedInput):
        elgamal.discrete_log(elgamal.decrypt_to_point(secret, total), 0, 20)


def test_parallel_pool_gives_the_oracle_result():
    n = MIN_PARALLEL_ITEMS + 100
    ids_a, ids_b, values = sets(n_a=n, n_b=n, overlap=n // 3, seed=3)
    with psi.WorkerPool(workers=2) as pool:
        result = psi.intersection_sum(ids_a, ids_b, values, policy=POLICY, pool=pool)
    assert (result.size, result.sum) == oracle(ids_a, ids_b, values)


def test_version_2_hash_is_elligator2_without_cofactor_clearing():
    """H(v) is the RFC 9380 Elligator 2 u-coordinate under PSI_DST; version 1 peers are refused."""
    from pydantic import ValidationError

    assert psi.PROTOCOL == "cogov-psi/2"
    assert psi.PSI_DST == b"COGOV-PSI-V02-CS01-with-curve25519_XMD:SHA-512_ELL2_NU_"
    key, ids = bytes(range(32)), [b"alice", b"bob", b""]
    fields = b"".join(group.hash_to_field(i, psi.PSI_DST, 1)[0].to_bytes(32, "little") for i in ids)
    expected = group.x25519_many(key, _x25519.elligator2_u_batch_portable(fields))
    assert psi._hash_and_key(key, ids) == expected
    request = psi.IdHolder(["a"], POLICY).request().model_dump()
    with pytest.raises(ValidationError):
        psi.JoinRequest.model_validate(request | {"protocol": "cogov-psi/1"})
