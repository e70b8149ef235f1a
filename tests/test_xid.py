"""xID tokens: published and known-answer vectors, the blinded chain, and refusals."""

import json
from pathlib import Path

import nacl.bindings as sodium
import numpy as np
import pytest

from mpc import psi, xid
from mpc.errors import HashVersionMismatch, MalformedInput
from mpc.hazmat import group
from mpc.hazmat.parallel import MIN_PARALLEL_ITEMS
from mpc.ids import id_bytes

VECTORS = Path(__file__).parent / "vectors"
RFC = json.loads((VECTORS / "xid_rfc9380_edwards25519.json").read_text())
KAT = json.loads((VECTORS / "xid_vectors.json").read_text(encoding="utf-8"))


def encode_point(x_hex: str, y_hex: str) -> bytes:
    """edwards25519 encoding of an affine point given as big-endian hex coordinates."""
    y = bytearray(int(y_hex, 16).to_bytes(32, "little"))
    y[31] |= (int(x_hex, 16) & 1) << 7
    return bytes(y)


def times_eight(point: bytes) -> bytes:
    for _ in range(3):
        point = sodium.crypto_core_ed25519_add(point, point)
    return point


def negate(point: bytes) -> bytes:
    return sodium.crypto_core_ed25519_sub(group.IDENTITY, point)


# ---------------------------------------------------------------- RFC 9380 (published vectors)


@pytest.mark.parametrize("vector", RFC["ro"]["vectors"], ids=lambda v: v["msg"][:8] or "empty")
def test_hash_to_field_matches_rfc9380_random_oracle_suite(vector):
    u0, u1 = group.hash_to_field(vector["msg"].encode(), RFC["ro"]["dst"].encode(), 2)
    assert (u0, u1) == (int(vector["u0"], 16), int(vector["u1"], 16))


@pytest.mark.parametrize("vector", RFC["ro"]["vectors"], ids=lambda v: v["msg"][:8] or "empty")
def test_hash_to_curve_equals_rfc9380_random_oracle_suite(vector):
    """msg, u0, u1, Q0, Q1 and P of RFC 9380 J.5.1, exactly (sign included)."""
    dst = RFC["ro"]["dst"].encode()
    u0, u1 = group.hash_to_field(vector["msg"].encode(), dst, 2)
    assert group.map_to_curve(u0) == times_eight(encode_point(vector["Q0_x"], vector["Q0_y"]))
    assert group.map_to_curve(u1) == times_eight(encode_point(vector["Q1_x"], vector["Q1_y"]))
    h = group.hash_to_curve(vector["msg"].encode(), dst)
    assert h == encode_point(vector["P_x"], vector["P_y"])
    assert group.is_valid_point(h)


def test_hash_to_curve_many_equals_one_by_one():
    dst = RFC["ro"]["dst"].encode()
    msgs = [v["msg"].encode() for v in RFC["ro"]["vectors"]] + [b"x" * 300, bytes(range(256))]
    packed = group.hash_to_curve_many(msgs, dst)
    assert group.unpack(packed) == [group.hash_to_curve(m, dst) for m in msgs]


@pytest.mark.parametrize("vector", RFC["nu"]["vectors"], ids=lambda v: v["msg"][:8] or "empty")
def test_encode_to_curve_equals_rfc9380_nonuniform_suite(vector):
    dst = RFC["nu"]["dst"].encode()
    (u,) = group.hash_to_field(vector["msg"].encode(), dst, 1)
    assert u == int(vector["u0"], 16)
    assert group.encode_to_curve(vector["msg"].encode(), dst) == encode_point(
        vector["P_x"], vector["P_y"])


P = group.FIELD_PRIME
SQRT_M486664 = 6853475219497561581579357271197624642482790079785650197046958215289687604742


def rfc9380_edwards_map(u: int) -> tuple[int, int]:
    """RFC 9380 §6.7.1 + §6.8.2 in Python integers: the affine (x, y) of map_to_curve(u)."""
    a = 486662
    x1 = -a * pow(1 + 2 * u * u, -1, P) % P
    gx1 = (x1**3 + a * x1 * x1 + x1) % P
    square = pow(gx1, (P - 1) // 2, P) in (0, 1)
    xm = x1 if square else (-x1 - a) % P
    gx = (xm**3 + a * xm * xm + xm) % P
    ym = pow(gx, (P + 3) // 8, P)
    if ym * ym % P != gx:
        ym = ym * pow(2, (P - 1) // 4, P) % P
    if (ym & 1) != int(square):  # sgn0(y) = 1 on the x1 branch, 0 on the x2 branch
        ym = P - ym
    return SQRT_M486664 * xm * pow(ym, -1, P) % P, (xm - 1) * pow(xm + 1, -1, P) % P


def test_map_equals_a_python_rfc9380_map_on_random_inputs():
    """Both Elligator 2 branches and both signs, far beyond the five published vectors."""
    assert SQRT_M486664**2 % P == -486664 % P and SQRT_M486664 % 2 == 0
    seen = set()
    for seed in range(200):
        (u,) = group.hash_to_field(seed.to_bytes(4, "big"), b"map-check", 1)
        x, y = rfc9380_edwards_map(u)
        x1 = -486662 * pow(1 + 2 * u * u, -1, P) % P
        square = pow((x1**3 + 486662 * x1 * x1 + x1) % P, (P - 1) // 2, P) == 1
        seen.add((square, x & 1))
        assert group.map_to_curve(u) == times_eight(encode_point(f"{x:x}", f"{y:x}"))
    assert seen == {(True, 0), (True, 1), (False, 0), (False, 1)}


def test_non_canonical_field_element_is_refused():
    with pytest.raises(MalformedInput):
        group.map_to_curve_many(group.FIELD_PRIME.to_bytes(32, "little"))


def test_keys_of_the_old_hash_version_are_refused_not_mixed():
    key = xid.XidKey.generate("k1")
    data = key.to_bytes()
    assert xid.XidKey.from_bytes(data) == key
    with pytest.raises(HashVersionMismatch):
        xid.XidKey.from_bytes(data[:4] + b"\x01" + data[5:])


# ---------------------------------------------------------------- known-answer vectors


def kat_keys():
    k1 = xid.XidKey("k1", 1, bytes.fromhex(KAT["k1"]))
    k2 = {d: xid.XidKey(f"k2:{d}", 1, bytes.fromhex(h)) for d, h in KAT["k2"].items()}
    return k1, k2


def test_known_answer_vectors_recompute():
    assert KAT["dst"].encode() == xid.XID_DST
    k1, k2 = kat_keys()
    ids = [v["id"] for v in KAT["vectors"]]
    assert [h.hex() for h in xid.hash_to_group(ids)] == [v["H"] for v in KAT["vectors"]]
    p1 = xid.tokenize(k1, ids)
    assert [p.hex() for p in p1] == [v["P1"] for v in KAT["vectors"]]
    for domain, key in k2.items():
        assert [t.hex() for t in xid.rekey(key, p1)] == [v["T"][domain] for v in KAT["vectors"]]


def test_blinded_chain_equals_direct_path_on_vectors():
    k1, k2 = kat_keys()
    ids = [v["id"] for v in KAT["vectors"]]
    blinded, state = xid.blind(ids)
    assert all(b != bytes.fromhex(v["H"]) for b, v in zip(blinded, KAT["vectors"], strict=True))
    step = xid.evaluate_blinded(k2["claims"], xid.evaluate_blinded(k1, blinded))
    assert [t.hex() for t in xid.unblind(state, step)] == [v["T"]["claims"] for v in KAT["vectors"]]


# ---------------------------------------------------------------- properties


@pytest.fixture(scope="module")
def keys():
    return xid.XidKey.generate("k1"), xid.XidKey.generate("k2:a"), xid.XidKey.generate("k2:b")


def test_blinding_is_fresh_per_call():
    first, _ = xid.blind(["same"])
    second, _ = xid.blind(["same"])
    assert first != second


def test_two_domains_never_share_a_token(keys):
    k1, k2a, k2b = keys
    ids = [f"person-{i}" for i in range(200)]
    p1 = xid.tokenize(k1, ids)
    ta, tb = xid.rekey(k2a, p1), xid.rekey(k2b, p1)
    assert len(set(ta)) == len(set(tb)) == 200
    assert not set(ta) & set(tb)
    assert not set(ta) & set(p1)


def test_numpy_inputs_match_lists(keys):
    k1, k2a, _ = keys
    ids = np.array(["x1", "x2", "x3"])
    p1 = xid.tokenize(k1, ids)
    assert p1 == xid.tokenize(k1, ["x1", "x2", "x3"])
    as_array = np.frombuffer(b"".join(p1), dtype=np.uint8).reshape(-1, 32)
    assert xid.rekey(k2a, as_array) == xid.rekey(k2a, p1)


def test_domain_key_rotation_rekeys_tokens_in_place(keys):
    k1, k2a, _ = keys
    ids = ["r1", "r2", "r3"]
    p1 = xid.tokenize(k1, ids)
    new = k2a.rotate()
    assert (new.key_id, new.version) == (k2a.key_id, k2a.version + 1)
    assert xid.rotate_tokens(k2a, new, xid.rekey(k2a, p1)) == xid.rekey(new, p1)
    assert xid.rekey(new, p1) != xid.rekey(k2a, p1)


def test_level_one_rotation_commutes_through_domain_tokens(keys):
    k1, k2a, _ = keys
    ids = ["r1", "r2"]
    new_k1 = k1.rotate()
    old_domain = xid.rekey(k2a, xid.tokenize(k1, ids))
    assert xid.rotate_tokens(k1, new_k1, old_domain) == xid.rekey(k2a, xid.tokenize(new_k1, ids))


def test_rotation_refuses_unrelated_keys(keys):
    k1, k2a, _ = keys
    with pytest.raises(MalformedInput):
        xid.rotate_tokens(k1, k2a.rotate(), xid.tokenize(k1, ["x"]))
    with pytest.raises(MalformedInput):
        xid.rotate_tokens(k1.rotate(), k1, xid.tokenize(k1, ["x"]))


def test_parallel_pool_gives_the_inline_result(keys):
    k1, k2a, _ = keys
    ids = [f"p{i}" for i in range(MIN_PARALLEL_ITEMS + 10)]
    with xid.WorkerPool(workers=2) as pool:
        blinded, state = xid.blind(ids, pool=pool)
        step = xid.evaluate_blinded(k2a, xid.evaluate_blinded(k1, blinded, pool=pool), pool=pool)
        tokens = xid.unblind(state, step, pool=pool)
        assert tokens == xid.rekey(k2a, xid.tokenize(k1, ids, pool=pool), pool=pool)
    assert tokens[:50] == xid.rekey(k2a, xid.tokenize(k1, ids[:50]))


# ---------------------------------------------------------------- keys


def test_key_repr_and_str_never_show_the_scalar(keys):
    k1, _, _ = keys
    secret_hex = k1._scalar.hex()
    for text in (repr(k1), str(k1), f"{k1}", repr([k1])):
        assert secret_hex not in text
        assert "k1" in text


def test_key_serialization_round_trips_and_refuses_garbage(keys):
    k1, _, _ = keys
    assert xid.XidKey.from_bytes(k1.to_bytes()) == k1
    data = k1.to_bytes()
    bad = [
        b"",
        b"nonsense",
        data[:-1],
        data + b"\x00",
        data[:-32] + bytes(32),  # zero scalar
        data[:-32] + group.GROUP_ORDER.to_bytes(32, "little"),  # non-canonical scalar
    ]
    for blob in bad:
        with pytest.raises(MalformedInput):
            xid.XidKey.from_bytes(blob)


# ---------------------------------------------------------------- refusals


def off_curve_encoding() -> bytes:
    for y in range(2, 1000):
        candidate = y.to_bytes(32, "little")
        try:
            sodium.crypto_core_ed25519_add(candidate, candidate)
        except Exception:
            return candidate
    raise AssertionError("no off-curve encoding found")


ORDER_2 = (group.FIELD_PRIME - 1).to_bytes(32, "little")  # (0, -1)
ORDER_8 = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")


def malformed_points() -> dict[str, bytes]:
    valid = group.hash_to_curve(b"x", b"test")
    return {
        "identity": group.IDENTITY,
        "order 2": ORDER_2,
        "order 8": ORDER_8,
        "non-canonical y >= p": (group.FIELD_PRIME + 1).to_bytes(32, "little"),
        "off the curve": off_curve_encoding(),
        "outside the prime-order subgroup": sodium.crypto_core_ed25519_add(valid, ORDER_8),
    }


@pytest.mark.parametrize("name", list(malformed_points()))
def test_every_verb_refuses_malformed_points_and_names_the_index(keys, name):
    k1, _, _ = keys
    good = xid.tokenize(k1, ["a", "b"])
    bad = malformed_points()[name]
    points = [good[0], bad, good[1]]
    for verb in (xid.rekey, xid.evaluate_blinded):
        with pytest.raises(MalformedInput, match="point 1"):
            verb(k1, points)
    _, state = xid.blind(["a", "b", "c"])
    with pytest.raises(MalformedInput, match="point 1"):
        xid.unblind(state, points)


def test_wrong_shapes_and_types_are_refused(keys):
    k1, _, _ = keys
    good = xid.tokenize(k1, ["a"])[0]
    for points in ([good[:31]], [good + b"\x00"], [good.hex()], good, [None]):
        with pytest.raises(MalformedInput):
            xid.rekey(k1, points)
    with pytest.raises(MalformedInput):
        xid.rekey(k1, np.zeros((2, 31), dtype=np.uint8))
    for ids in (["ok", ""], ["ok", 7], [b""]):
        with pytest.raises(MalformedInput):
            xid.tokenize(k1, ids)


def test_ids_have_one_encoding_and_an_empty_id_is_refused_everywhere():
    assert id_bytes(["张三", b"\x00a", bytearray(b"b")]) == ["张三".encode(), b"\x00a", b"b"]
    assert id_bytes(np.array(["a", "b"])) == [b"a", b"b"]
    assert id_bytes([]) == []
    for ids, named in ((["ok", ""], "id 1: empty id"), ([b""], "id 0: empty id"),
                       (["ok", 7], "id 1: expected str or bytes, got int")):
        with pytest.raises(MalformedInput, match=named):
            id_bytes(ids)
    # The xID tokens and the private intersection take ids the same way, and refuse the same.
    key = xid.XidKey.generate("k")
    assert xid.tokenize(key, ["a"]) == xid.tokenize(key, [b"a"])
    for refuse in (lambda: psi.IdHolder(["a", ""]), lambda: psi.ValueHolder([b""], [1]),
                   lambda: xid.blind([""])):
        with pytest.raises(MalformedInput, match="empty id"):
            refuse()


def test_failed_unblind_changes_nothing_and_state_is_single_use(keys):
    k1, _, _ = keys
    blinded, state = xid.blind(["a", "b"])
    evaluated = xid.evaluate_blinded(k1, blinded)
    with pytest.raises(MalformedInput):
        xid.unblind(state, [evaluated[0], ORDER_8])
    with pytest.raises(MalformedInput):
        xid.unblind(state, evaluated[:1])
    assert xid.unblind(state, evaluated) == xid.tokenize(k1, ["a", "b"])
    with pytest.raises(MalformedInput):
        xid.unblind(state, evaluated)
