"""Candidate slots: the K visit rows each claim is checked against.

The serving node finds a claim's candidate rows by its index key (the domain token
of the person plus the hospital id); it sees which anonymous rows are touched, never
their contents in `ss` mode. Every claim gets exactly K slots, the missing ones filled
with dummies (`valid = False`) in random order, so neither the computation's shape
nor the slot order tells how many visits the person has.

The dummies' target rows and the slot order are drawn from the OS CSPRNG
(`os.urandom`), never from numpy's or Python's generators: the regulator sees every
slot's row number, and a predictable generator (PCG64 and MT19937 are not
cryptographic) would let it tell dummies from real rows by predicting them. Target
rows are uniform over the table (rejection sampling, no modulo bias); the order is a
Fisher-Yates shuffle driven by the same uniform draws.
"""

from __future__ import annotations

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

    def plan(self, claim_keys: Sequence[Hashable], k: int = DEFAULT_K) -> CandidateSlots:
        """Slots for each claim: the rows whose key equals the claim's key, padded to `k`."""
        if k < 1:
            raise MalformedInput("k must be at least 1")
        n = len(claim_keys)
        # Every slot starts as a dummy aimed at a uniformly random real row; the claim's
        # own rows then take the first slots, and the shuffle spreads them.
        row_index = (uniform_below(self.n_rows, n * k).reshape(n, k) if self.n_rows
                     else np.zeros((n, k), dtype=np.int64))
        valid = np.zeros((n, k), dtype=bool)
        for i, key in enumerate(claim_keys):
            rows = self.rows_by_key.get(key, [])
            if len(rows) > k:
                raise TooManyCandidates(f"claim {i} has {len(rows)} candidate rows > K = {k}")
            row_index[i, :len(rows)] = rows
            valid[i, :len(rows)] = True
        shuffle_slots(row_index, valid)
        return CandidateSlots(row_index, valid)


def uniform_below(bound: int, count: int) -> np.ndarray:
    """`count` independent integers uniform in [0, bound), int64, from `os.urandom`.

    A 64-bit word is kept only below the largest multiple of `bound` (rejection
    sampling), so no value is favoured; a word is rejected with probability under
    bound / 2^64.
    """
    if bound < 1 or bound > 1 << 62:
        raise MalformedInput("a uniform draw needs a bound in [1, 2^62]")
    out = np.zeros(count, dtype=np.int64)
    if bound == 1 or count == 0:
        return out
    excess = (1 << 64) % bound  # words at or above 2^64 - excess would favour small values
    limit = np.uint64((1 << 64) - excess) if excess else None
    filled = 0
    while filled < count:
        need = count - filled
        words = np.frombuffer(os.urandom(8 * need), dtype=np.uint64)
        kept = (words if limit is None else words[words < limit])[:need]
        out[filled:filled + len(kept)] = (kept % np.uint64(bound)).astype(np.int64)
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
