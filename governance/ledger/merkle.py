"""Merkle tree hashing, proofs and proof verification of RFC 6962 / RFC 9162.

Leaf hash SHA-256(0x00 || leaf), node hash SHA-256(0x01 || left || right); the
tree over n leaves splits at the largest power of two below n. Proof builders
take a `SubtreeHash` callback so the same code serves an in-memory tree and the
SQLite store (which keeps every complete subtree hash, making any needed hash
O(log n) lookups instead of a rehash of the log). Verifiers are the algorithms
of RFC 9162 §2.1.3.2 and §2.1.4.2, with the edge cases of the Go reference
implementation (transparency-dev/merkle) for empty and equal-size trees.
"""

import hashlib
from collections.abc import Callable, Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

SubtreeHash = Callable[[int, int], bytes]
"""(start, end) -> Merkle tree hash of leaves [start, end)."""

PerfectNode = Callable[[int, int], bytes]
"""(level, index) -> hash of the complete subtree over leaves [index*2^level, (index+1)*2^level)."""


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class CompactRange:
    """The right edge of a growing tree: one hash per complete subtree, O(log n) state.

    Appending a leaf costs O(log n) hashes and returns the complete subtree
    nodes it created, which a store persists so later proofs need no rehash.
    """

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != size.bit_count():
            raise ValueError("a compact range has one hash per set bit of its size")
        self.size = size
        self._hashes = list(hashes)

    @staticmethod
    def node_positions(size: int) -> list[tuple[int, int]]:
        """(level, index) of the complete subtrees forming the range [0, size), left to right."""
        positions, start = [], 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                positions.append((level, start >> level))
                start += 1 << level
        return positions

    def append(self, hash_of_leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add one leaf hash; return the new complete nodes as (level, index, hash)."""
        level, index, value = 0, self.size, hash_of_leaf
        created = [(0, index, value)]
        while index & 1:
            value = node_hash(self._hashes.pop(), value)
            level, index = level + 1, index >> 1
            created.append((level, index, value))
        self._hashes.append(value)
        self.size += 1
        return created

    def copy(self) -> "CompactRange":
        return CompactRange(self.size, self._hashes)

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Add many leaf hashes, discarding the created nodes."""
        for value in leaf_hashes:
            self.append(value)

    def root(self) -> bytes:
        """Merkle tree hash of the leaves so far (the empty-string hash for no leaves)."""
        if not self._hashes:
            return EMPTY_ROOT
        value = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            value = node_hash(left, value)
        return value


def root_hash(leaf_hashes: Iterable[bytes]) -> bytes:
    """Merkle tree hash over the given leaf hashes."""
    compact = CompactRange()
    compact.extend(leaf_hashes)
    return compact.root()


def subtree_hash_from_nodes(perfect: PerfectNode) -> SubtreeHash:
    """Build a `SubtreeHash` for the ranges RFC proofs ask for from complete-node lookups."""

    def subtree(start: int, end: int) -> bytes:
        n = end - start
        if n <= 0:
            raise ValueError("empty range")
        if n & (n - 1) == 0 and start % n == 0:
            return perfect(n.bit_length() - 1, start // n)
        k = _split(n)
        return node_hash(subtree(start, start + k), subtree(start + k, end))

    return subtree


class MemoryTree:
    """All complete-node hashes of a tree in memory; for tests and small offline checks."""

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = [[]]
        self._compact = CompactRange()
        for value in leaf_hashes:
            self.append_hash(value)

    @property
    def size(self) -> int:
        return self._compact.size

    def append_hash(self, hash_of_leaf: bytes) -> None:
        for level, _index, value in self._compact.append(hash_of_leaf):
            if level == len(self._levels):
                self._levels.append([])
            self._levels[level].append(value)

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} outside 0..{self.size}")
        return EMPTY_ROOT if size == 0 else self.subtree(0, size)

    def subtree(self, start: int, end: int) -> bytes:
        return subtree_hash_from_nodes(lambda level, index: self._levels[level][index])(start, end)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        size = self.size if size is None else size
        return inclusion_path(index, size, self.subtree)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        new_size = self.size if new_size is None else new_size
        return consistency_path(old_size, new_size, self.subtree)


def inclusion_path(index: int, size: int, subtree: SubtreeHash) -> list[bytes]:
    """RFC 6962 PATH(index, D[0:size]): the audit path of leaf `index`."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} outside tree of size {size}")
    outer_first: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            outer_first.append(subtree(start + k, end))
            end = start + k
        else:
            outer_first.append(subtree(start, start + k))
            start += k
    return outer_first[::-1]


def consistency_path(old_size: int, new_size: int, subtree: SubtreeHash) -> list[bytes]:
    """RFC 6962 PROOF(old_size, D[0:new_size]); empty when old_size is 0 or equals new_size."""
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from size {old_size} to {new_size}")
    if old_size in (0, new_size):
        return []
    outer_first: list[bytes] = []
    start, end, m, complete = 0, new_size, old_size, True
    while True:
        n = end - start
        if m == n:
            if not complete:
                outer_first.append(subtree(start, end))
            break
        k = _split(n)
        if m <= k:
            outer_first.append(subtree(start + k, end))
            end = start + k
        else:
            outer_first.append(subtree(start, start + k))
            start, m, complete = start + k, m - k, False
    return outer_first[::-1]


def _well_formed(*hashes: bytes) -> bool:
    return all(isinstance(h, bytes) and len(h) == HASH_SIZE for h in hashes)


def root_from_inclusion_proof(
    index: int, size: int, hash_of_leaf: bytes, proof: Sequence[bytes]
) -> bytes | None:
    """RFC 9162 §2.1.3.2: the root the proof leads to, or None if the proof is malformed."""
    if not 0 <= index < size or not _well_formed(hash_of_leaf, *proof):
        return None
    fn, sn, r = index, size - 1, hash_of_leaf
    for p in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not (fn & 1 or fn == 0):
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return r if sn == 0 else None


def verify_inclusion(
    index: int, size: int, hash_of_leaf: bytes, proof: Sequence[bytes], root: bytes
) -> bool:
    """True when `proof` shows leaf `index` with hash `hash_of_leaf` in the tree `root`."""
    computed = root_from_inclusion_proof(index, size, hash_of_leaf, proof)
    return computed is not None and _well_formed(root) and computed == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: True when `proof` shows tree `old_root` is a prefix of `new_root`."""
    if not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof
    if not proof or not _well_formed(old_root, new_root, *proof):
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not (fn & 1 or fn == 0):
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old_root and sr == new_root
