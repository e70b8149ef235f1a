"""Candidate slots: the K visit rows each claim is checked against.

The serving node finds a claim's candidate rows by its index key (the domain token
of the person plus the hospital id); it sees which anonymous rows are touched, never
their contents in `ss` mode. Every claim gets exactly K slots, the missing ones filled
with dummies (`valid = False`) in random order, so neither the computation's shape
nor the slot order tells how many visits the person has.

The slot order is drawn from the OS CSPRNG (`os.urandom`), never from numpy's or
Python's generators: the regulator sees every slot's row number, and a predictable
generator (PCG64 and MT19937 are not cryptographic) would let it tell dummies from real
rows by predicting them. Each claim key's dummy rows are uniform over the table but
fixed for the index's life, drawn from HMAC-SHA256 under a secret key of the index:
fresh dummies for every claim would let whoever sees the row numbers intersect two
claims about the same key and count the real rows (the rows common to both). With
fixed dummies two such claims touch the same K rows, whatever the number of visits.
Draws are uniform by rejection sampling (no modulo bias); the order is a Fisher-Yates
shuffle.
"""

from __future__ import annotations

import hmac
import os
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from mpc.claim.constants import DEFAULT_K
from mpc.claim.errors import MalformedInput, TooManyCandidates


@dataclass(frozen=True)
class CandidateSlots:
    """`row_index[i, j]` is the visit row in slot j of claim i; dummies point at a random
    real row (so a share holder cannot tell them apart) and have `valid[i, j] = False`."""

    row_index: np.ndarray  # int64 [n, k]
    valid: np.ndarray  # bool [n, k]

    @property
    def k(self) -> int:
        return int(self.row_index.shape[1])

    def __len__(self) -> int:
        return int(self.row_index.shape[0])


class CandidateIndex:
    """The visit rows grouped by index key; build once, plan many batches."""

    def __init__(self, visit_keys: Sequence[Hashable]) -> None:
        self.rows_by_key: dict[Hashable, list[int]] = defaultdict(list)
        for row, key in enumerate(visit_keys):
            self.rows_by_key[key].append(row)
        self.n_rows = len(visit_keys)
        self._dummy_key = os.urandom(32)  # lives and dies with this index (one table build)

    def dummy_rows(self, key: Hashable, count: int, real: Sequence[int] = ()) -> np.ndarray:
        """The `count` dummy rows of claim key `key`: uniform, fixed for this index, and
        distinct from each other and from the key's `real` rows (when the table has enough
        rows), so a repeated row number never hints at how many slots are real."""
        if count == 0 or self.n_rows == 0:
            return np.zeros(count, dtype=np.int64)
        label = b"cogov-dummy-rows|" + repr(key).encode()
        if self.n_rows < count + len(real):  # too small a table to keep them apart
            return keyed_uniform_below(self._dummy_key, label, self.n_rows, count)
        taken, picked, drawn = set(real), [], 0
        while len(picked) < count:
            batch = keyed_uniform_below(self._dummy_key, label, self.n_rows, drawn + 2 * count)
            for row in batch[drawn:].tolist():
                if row not in taken:
                    taken.add(row)
                    picked.append(row)
                    if len(picked) == count:
                        break
            drawn = len(batch)
        return np.asarray(picked, dtype=np.int64)

    def plan(self, claim_keys: Sequence[Hashable], k: int = DEFAULT_K) -> CandidateSlots:
        """Slots for each claim: the rows whose key equals the claim's key, padded to `k`."""
        if k < 1:
            raise MalformedInput("k must be at least 1")
        n = len(claim_keys)
        # The claim's own rows take the first slots and its fixed dummies the rest; the
        # shuffle then spreads them.
        row_index = np.zeros((n, k), dtype=np.int64)
        valid = np.zeros((n, k), dtype=bool)
        for i, key in enumerate(claim_keys):
            rows = self.rows_by_key.get(key, [])
            if len(rows) > k:
                raise TooManyCandidates(f"claim {i} has {len(rows)} candidate rows > K = {k}")
            row_index[i, :len(rows)] = rows
            row_index[i, len(rows):] = self.dummy_rows(key, k - len(rows), rows)
            valid[i, :len(rows)] = True
        shuffle_slots(row_index, valid)
        return CandidateSlots(row_index, valid)


def _check_bound(bound: int) -> None:
    if bound < 1 or bound > 1 << 62:
        raise MalformedInput("a uniform draw needs a bound in [1, 2^62]")


def _below(words: np.ndarray, bound: int) -> np.ndarray:
    """The words (uint64) that fall below the largest multiple of `bound`, reduced mod it."""
    excess = (1 << 64) % bound  # words at or above 2^64 - excess would favour small values
    kept = words if not excess else words[words < np.uint64((1 << 64) - excess)]
    return (kept % np.uint64(bound)).astype(np.int64)


def keyed_uniform_below(key: bytes, label: bytes, bound: int, count: int) -> np.ndarray:
    """`count` integers uniform in [0, bound), the same for the same key and label:
    HMAC-SHA256(key, label | block) as the word stream, with rejection sampling."""
    _check_bound(bound)
    out: list[np.ndarray] = []
    have, block = 0, 0
    while have < count:
        digest = hmac.digest(key, label + block.to_bytes(4, "big"), "sha256")
        kept = _below(np.frombuffer(digest, dtype=np.uint64), bound)
        out.append(kept)
        have += len(kept)
        block += 1
    return np.concatenate(out)[:count]


def uniform_below(bound: int, count: int) -> np.ndarray:
    """`count` independent integers uniform in [0, bound), int64, from `os.urandom`.

    A 64-bit word is kept only below the largest multiple of `bound` (rejection
    sampling), so no value is favoured; a word is rejected with probability under
    bound / 2^64.
    """
    _check_bound(bound)
    out = np.zeros(count, dtype=np.int64)
    if bound == 1 or count == 0:
        return out
    filled = 0
    while filled < count:
        need = count - filled
        kept = _below(np.frombuffer(os.urandom(8 * need), dtype=np.uint64), bound)[:need]
        out[filled:filled + len(kept)] = kept
        filled += len(kept)
    return out


def shuffle_slots(row_index: np.ndarray, valid: np.ndarray) -> None:
    """Shuffle each claim's slots in place, the same uniform permutation applied to both
    arrays (Fisher-Yates, one column at a time for every claim at once)."""
    n, k = row_index.shape
    claims = np.arange(n)
    for j in range(k - 1, 0, -1):
        pick = uniform_below(j + 1, n)
        for array in (row_index, valid):
            held = array[claims, j].copy()
            array[claims, j] = array[claims, pick]
            array[claims, pick] = held


def plan_candidate_slots(
    claim_keys: Sequence[Hashable], visit_keys: Sequence[Hashable], k: int = DEFAULT_K
) -> CandidateSlots:
    """Slots for each claim: the rows whose key equals the claim's key, padded to `k`."""
    return CandidateIndex(visit_keys).plan(claim_keys, k)


def gather_rows(table: np.ndarray, slots: CandidateSlots) -> np.ndarray:
    """The [n, k, fields] values of each slot from a row table (plain values or shares)."""
    if len(table) == 0:
        return np.zeros((*slots.row_index.shape, table.shape[1]), dtype=table.dtype)
    index = slots.row_index
    if index.size and (index.min() < 0 or index.max() >= len(table)):
        raise MalformedInput("candidate row index out of range")
    return table[index]
