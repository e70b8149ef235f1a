"""Candidate slots: the K visit rows each claim is checked against.

The serving node finds a claim's candidate rows by its index key (the domain token
of the person plus the hospital id); it sees which anonymous rows are touched, never
their contents in `ss` mode. Every claim gets exactly K slots, the missing ones filled
with dummies (`valid = False`) in random order, so neither the computation's shape
nor the slot order tells how many visits the person has.
"""

from __future__ import annotations

import secrets
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
        rng = np.random.default_rng(secrets.randbits(128))
        row_index = np.zeros((len(claim_keys), k), dtype=np.int64)
        valid = np.zeros((len(claim_keys), k), dtype=bool)
        for i, key in enumerate(claim_keys):
            rows = self.rows_by_key.get(key, [])
            if len(rows) > k:
                raise TooManyCandidates(f"claim {i} has {len(rows)} candidate rows > K = {k}")
            dummies = (rng.integers(0, self.n_rows, size=k - len(rows)) if self.n_rows
                       else np.zeros(k - len(rows), dtype=np.int64))
            slots = np.concatenate([np.asarray(rows, dtype=np.int64), dummies])
            flags = np.arange(k) < len(rows)
            order = rng.permutation(k)
            row_index[i] = slots[order]
            valid[i] = flags[order]
        return CandidateSlots(row_index, valid)


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
