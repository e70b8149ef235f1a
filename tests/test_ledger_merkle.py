"""RFC 6962 / 9162 Merkle tree: published known-answer vectors and property tests."""

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from governance.ledger.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MemoryTree,
    leaf_hash,
    node_hash,
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "merkle_rfc6962.json").read_text())
LEAVES = [bytes.fromhex(x) for x in VECTORS["leaves"]]
ROOTS = [bytes.fromhex(x) for x in VECTORS["roots"]]
H = [leaf_hash(x) for x in LEAVES]
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def _hexes(values):
    return [bytes.fromhex(x) for x in values]


# -- independent reference: the RFC's recursive definitions, written naively --------------


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def naive_mth(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = _k(len(leaves))
    return node_hash(naive_mth(leaves[:k]), naive_mth(leaves[k:]))


def naive_path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = _k(len(leaves))
    if m < k:
        return [*naive_path(m, leaves[:k]), naive_mth(leaves[k:])]
    return [*naive_path(m - k, leaves[k:]), naive_mth(leaves[:k])]


def naive_subproof(m: int, leaves: list[bytes], b: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if b else [naive_mth(leaves)]
    k = _k(n)
    if m <= k:
        return [*naive_subproof(m, leaves[:k], b), naive_mth(leaves[k:])]
    return [*naive_subproof(m - k, leaves[k:], False), naive_mth(leaves[:k])]


# -- known-answer vectors ------------------------------------------------------------------


def test_hasher_vectors():
    hasher = VECTORS["hasher"]
    assert EMPTY_ROOT.hex() == hasher["empty_root"]
    assert leaf_hash(b"").hex() == hasher["empty_leaf_hash"]
    assert leaf_hash(hasher["leaf"]["data_ascii"].encode()).hex() == hasher["leaf"]["hash"]
    node = hasher["node"]
    assert (
        node_hash(node["left_ascii"].encode(), node["right_ascii"].encode()).hex() == node["hash"]
    )
    assert MemoryTree().root() == EMPTY_ROOT


def test_roots_of_every_prefix_match_vectors():
    tree = MemoryTree(H)
    for size in range(1, len(LEAVES) + 1):
        assert tree.root(size) == ROOTS[size - 1]
        assert naive_mth(LEAVES[:size]) == ROOTS[size - 1]
        compact = CompactRange()
        compact.extend(H[:size])
        assert compact.root() == ROOTS[size - 1]


@pytest.mark.parametrize(
    "case", VECTORS["inclusion"], ids=lambda c: f"{c['leaf_index']}-of-{c['tree_size']}"
)
def test_inclusion_vectors(case):
    index, size, proof = case["leaf_index"], case["tree_size"], _hexes(case["proof"])
    assert MemoryTree(H).inclusion_proof(index, size) == proof
    root = ROOTS[size - 1]
    assert root_from_inclusion_proof(index, size, H[index], proof) == root
    assert verify_inclusion(index, size, H[index], proof, root)
    for description, probe in _corrupt_inclusion(index, size, proof, root, H[index]):
        assert not verify_inclusion(*probe), description


def _corrupt_inclusion(index, size, proof, root, hash_of_leaf):
    """The corruptions of transparency-dev/merkle proof/verify_test.go corruptInclusionProof."""
    yield "index - 1", (index - 1, size, hash_of_leaf, proof, root)
    yield "index + 1", (index + 1, size, hash_of_leaf, proof, root)
    yield "index ^ 2", (index ^ 2, size, hash_of_leaf, proof, root)
    yield "size * 2", (index, size * 2, hash_of_leaf, proof, root)
    yield "size / 2", (index, size // 2, hash_of_leaf, proof, root)
    yield "wrong leaf", (index, size, b"WrongLeaf", proof, root)
    yield "empty root", (index, size, hash_of_leaf, proof, EMPTY_ROOT)
    yield "random root", (index, size, hash_of_leaf, proof, SOME_HASH)
    yield "trailing garbage", (index, size, hash_of_leaf, [*proof, b""], root)
    yield "trailing root", (index, size, hash_of_leaf, [*proof, root], root)
    yield "preceding garbage", (index, size, hash_of_leaf, [b"", *proof], root)
    yield "preceding root", (index, size, hash_of_leaf, [root, *proof], root)
    for i in range(len(proof)):
        wrong = list(proof)
        wrong[i] = bytes([wrong[i][0] ^ 8]) + wrong[i][1:]
        yield f"modified proof[{i}] bit 3", (index, size, hash_of_leaf, wrong, root)
    if proof:
        yield "removed component", (index, size, hash_of_leaf, proof[:-1], root)
    if len(proof) > 1:
        yield (
            "inserted component",
            (index, size, hash_of_leaf, [proof[0], SOME_HASH, *proof[1:]], root),
        )


def test_invalid_inclusion_vector_and_single_entry():
    case = VECTORS["invalid_inclusion"][0]
    assert not verify_inclusion(case["leaf_index"], case["tree_size"], SOME_HASH, [], EMPTY_ROOT)
    single = leaf_hash(b"data")
    assert verify_inclusion(0, 1, single, [], single)
    assert not verify_inclusion(0, 1, b"", [], single)
    assert not verify_inclusion(0, 1, single, [], b"")
    for index, size in [(0, 0), (1, 0), (2, 1)]:
        assert not verify_inclusion(index, size, SOME_HASH, [], EMPTY_ROOT)


@pytest.mark.parametrize(
    "case", VECTORS["consistency"], ids=lambda c: f"{c['size1']}-to-{c['size2']}"
)
def test_consistency_vectors(case):
    size1, size2, proof = case["size1"], case["size2"], _hexes(case["proof"])
    assert MemoryTree(H).consistency_proof(size1, size2) == proof
    root1, root2 = ROOTS[size1 - 1], ROOTS[size2 - 1]
    assert verify_consistency(size1, size2, root1, root2, proof)
    if not proof:
        return
    for description, probe in _corrupt_consistency(size1, size2, root1, root2, proof):
        assert not verify_consistency(*probe), description


def _corrupt_consistency(size1, size2, root1, root2, proof):
    """The corruptions of transparency-dev/merkle proof/verify_test.go corruptConsistencyProof."""
    yield "size1 - 1", (size1 - 1, size2, root1, root2, proof)
    yield "size1 + 1", (size1 + 1, size2, root1, root2, proof)
    yield "size1 ^ 2", (size1 ^ 2, size2, root1, root2, proof)
    yield "size2 * 2", (size1, size2 * 2, root1, root2, proof)
    yield "size2 / 2", (size1, size2 // 2, root1, root2, proof)
    yield "wrong root1", (size1, size2, b"WrongRoot", root2, proof)
    yield "wrong root2", (size1, size2, root1, b"WrongRoot", proof)
    yield "swapped roots", (size1, size2, root2, root1, proof)
    yield "empty proof", (size1, size2, root1, root2, [])
    yield "trailing garbage", (size1, size2, root1, root2, [*proof, b""])
    yield "trailing root1", (size1, size2, root1, root2, [*proof, root1])
    yield "trailing root2", (size1, size2, root1, root2, [*proof, root2])
    yield "preceding garbage", (size1, size2, root1, root2, [b"", *proof])
    yield "preceding root1", (size1, size2, root1, root2, [root1, *proof])
    yield "preceding root2", (size1, size2, root1, root2, [root2, *proof])
    yield "preceding proof[0]", (size1, size2, root1, root2, [proof[0], *proof])
    yield "truncated proof", (size1, size2, root1, root2, proof[:-1])
    for i in range(len(proof)):
        wrong = list(proof)
        wrong[i] = bytes([wrong[i][0] ^ 16]) + wrong[i][1:]
        yield f"modified proof[{i}] bit 4", (size1, size2, root1, root2, wrong)


def test_consistency_edge_cases_of_the_reference():
    r1, r2 = b"don't care 1", b"don't care 2"
    assert not verify_consistency(0, 0, r1, r2, [])
    assert not verify_consistency(1, 1, r1, r2, [])
    assert verify_consistency(0, 0, r1, r1, [])
    assert verify_consistency(0, 1, r1, r2, [])
    assert verify_consistency(1, 1, r2, r2, [])
    assert not verify_consistency(1, 0, r1, r2, [])
    assert not verify_consistency(2, 1, r1, r2, [])
    assert not verify_consistency(1, 2, r1, r2, [])
    for size1, size2 in [(0, 0), (0, 1), (1, 1)]:
        assert not verify_consistency(size1, size2, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT])


# -- properties ----------------------------------------------------------------------------

trees = st.lists(st.binary(max_size=8), min_size=1, max_size=70)


@settings(max_examples=60, deadline=None)
@given(leaves=trees, data=st.data())
def test_every_inclusion_proof_verifies_and_matches_the_rfc_definition(leaves, data):
    tree = MemoryTree(leaf_hash(x) for x in leaves)
    size = data.draw(st.integers(1, len(leaves)))
    index = data.draw(st.integers(0, size - 1))
    proof = tree.inclusion_proof(index, size)
    root = naive_mth(leaves[:size])
    assert tree.root(size) == root
    assert proof == naive_path(index, leaves[:size])
    assert verify_inclusion(index, size, leaf_hash(leaves[index]), proof, root)


@settings(max_examples=60, deadline=None)
@given(leaves=trees, data=st.data())
def test_every_consistency_proof_verifies_and_matches_the_rfc_definition(leaves, data):
    tree = MemoryTree(leaf_hash(x) for x in leaves)
    new = data.draw(st.integers(1, len(leaves)))
    old = data.draw(st.integers(1, new))
    proof = tree.consistency_proof(old, new)
    expected = [] if old == new else naive_subproof(old, leaves[:new], True)
    assert proof == expected
    assert verify_consistency(old, new, tree.root(old), tree.root(new), proof)


@settings(max_examples=80, deadline=None)
@given(leaves=st.lists(st.binary(max_size=8), min_size=2, max_size=70), data=st.data())
def test_a_modified_inclusion_proof_fails(leaves, data):
    tree = MemoryTree(leaf_hash(x) for x in leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    proof = tree.inclusion_proof(index)
    element = data.draw(st.integers(0, len(proof) - 1))
    bit = data.draw(st.integers(0, 255))
    wrong = list(proof)
    flipped = bytearray(wrong[element])
    flipped[bit // 8] ^= 1 << (bit % 8)
    wrong[element] = bytes(flipped)
    assert not verify_inclusion(index, len(leaves), leaf_hash(leaves[index]), wrong, tree.root())
    other = data.draw(st.integers(0, len(leaves) - 1).filter(lambda i: leaves[i] != leaves[index]))
    assert not verify_inclusion(index, len(leaves), leaf_hash(leaves[other]), proof, tree.root())


@settings(max_examples=80, deadline=None)
@given(leaves=st.lists(st.binary(max_size=8), min_size=3, max_size=70), data=st.data())
def test_a_modified_consistency_proof_fails(leaves, data):
    tree = MemoryTree(leaf_hash(x) for x in leaves)
    new = data.draw(st.integers(2, len(leaves)))
    old = data.draw(st.integers(1, new - 1))
    proof = tree.consistency_proof(old, new)
    element = data.draw(st.integers(0, len(proof) - 1))
    bit = data.draw(st.integers(0, 255))
    wrong = list(proof)
    flipped = bytearray(wrong[element])
    flipped[bit // 8] ^= 1 << (bit % 8)
    wrong[element] = bytes(flipped)
    assert not verify_consistency(old, new, tree.root(old), tree.root(new), wrong)
    # A different history of the same size is not consistent with the new tree.
    forged = MemoryTree(leaf_hash(x + b"!") for x in leaves[:old])
    assert not verify_consistency(old, new, forged.root(), tree.root(new), proof)
