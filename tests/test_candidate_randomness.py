"""Dummy slots, slot order and table order come from the OS CSPRNG, and are uniform.

The regulator sees every slot's row number. If dummies or the slot order came from a
predictable generator (numpy's PCG64, Python's MT19937), the regulator could tell a
claim's dummies from its real rows by predicting them. Here:

1. planning, and the operator's table order, run with every numpy and `random` generator
   wired to raise, and they draw from `os.urandom` (counted); the module holds no
   generator of its own (its source names none);
2. over many plans the real row's slot, the dummies' target rows and the position of a
   visit in a table's order are uniform (chi-square, p = 1e-6 thresholds), and the same
   check fails for a planner that does not shuffle (the check has teeth);
3. the refusal for too many candidates is unchanged.
"""

from __future__ import annotations

import ast
import os
import random
from pathlib import Path

import numpy as np
import pytest

from mpc.claim import candidates
from mpc.claim.candidates import CandidateIndex, uniform_below
from mpc.claim.errors import MalformedInput, TooManyCandidates
from parties.claims.tables import secret_row_order

# chi-square critical values at p = 1e-6 (scipy.stats.chi2.isf(1e-6, df))
CHI2_1E6 = {3: 30.7, 9: 44.8, 11: 48.9}


class NonCryptographicDraw(AssertionError):
    """A numpy or `random` generator was called."""


def _raise(*args, **kwargs):
    raise NonCryptographicDraw("a non-cryptographic generator was called")


@pytest.fixture
def tripwired(monkeypatch) -> dict[str, int]:
    """Every numpy and `random` generator raises; `os.urandom` counts its bytes."""
    for name in ("default_rng", "Generator", "RandomState", "PCG64", "PCG64DXSM", "MT19937",
                 "Philox", "SFC64", "SeedSequence", "seed", "random", "rand", "randn",
                 "randint", "integers", "permutation", "shuffle", "choice", "uniform",
                 "random_sample", "bytes"):
        if hasattr(np.random, name):
            monkeypatch.setattr(np.random, name, _raise)
    for name in ("random", "randrange", "randint", "shuffle", "choice", "choices", "sample",
                 "getrandbits", "uniform", "seed", "randbytes"):
        monkeypatch.setattr(random, name, _raise)
    for name in ("random", "getrandbits", "seed", "shuffle", "randrange", "choice", "sample"):
        monkeypatch.setattr(random.Random, name, _raise)  # MT19937 instances (not SystemRandom)
    counted = {"bytes": 0, "calls": 0}
    urandom = os.urandom

    def counting(n: int) -> bytes:
        counted["bytes"] += n
        counted["calls"] += 1
        return urandom(n)

    monkeypatch.setattr(os, "urandom", counting)
    return counted


def _index(n_rows: int = 10, real: int = 1) -> tuple[CandidateIndex, tuple]:
    """An index of `n_rows` rows; the claim key ("p", "h") owns the first `real` of them."""
    return CandidateIndex(index_keys(n_rows, real)), ("p", "h")


def _chi2(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


# --- 1. no generator but the OS CSPRNG ---------------------------------------------------------


def test_the_tripwires_fire(tripwired):
    """Control: the harness does catch a numpy or Python generator."""
    with pytest.raises(NonCryptographicDraw):
        np.random.default_rng(1)
    with pytest.raises(NonCryptographicDraw):
        random.random()
    with pytest.raises(NonCryptographicDraw):
        random.Random(7).random()


def test_planning_draws_only_from_the_os_csprng(tripwired):
    index, key = _index(50, real=2)
    slots = index.plan([key, ("nobody", "h"), key], k=4)
    assert tripwired["calls"] > 0 and tripwired["bytes"] >= 8 * 3 * 4
    assert slots.valid.sum(axis=1).tolist() == [2, 0, 2]
    assert sorted(slots.row_index[0][slots.valid[0]].tolist()) == [0, 1]


def test_the_table_order_draws_only_from_the_os_csprng(tripwired):
    refs = [os.urandom(32) for _ in range(100)]
    before = tripwired["bytes"]
    order = secret_row_order(refs)
    assert sorted(order) == list(range(100))
    assert tripwired["bytes"] - before >= 32  # its fresh key


def test_the_planner_names_no_other_generator():
    """Static: the module imports neither `random` nor `numpy.random`, reaches for no
    `np.random` and keeps no generator object."""
    source = Path(candidates.__file__).read_text()
    tree = ast.parse(source)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "random" not in imported and "numpy.random" not in imported
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "random" not in attributes  # no np.random.<anything>
    assert "default_rng" not in source and "Generator" not in source


# --- 2. uniform ------------------------------------------------------------------------------


def test_slot_positions_and_dummy_targets_are_uniform():
    index, key = _index(10, real=1)
    slots = index.plan([key] * 20_000, k=4)
    assert (slots.valid.sum(axis=1) == 1).all()
    position = np.argmax(slots.valid, axis=1)
    positions = np.bincount(position, minlength=4)
    assert _chi2(positions) < CHI2_1E6[3], positions
    assert (slots.row_index[slots.valid] == 0).all()  # the real slot holds the real row
    # Dummies are fixed per claim key, so their spread is over many keys.
    absent = index.plan([("absent", str(i)) for i in range(5_000)], k=4)
    assert not absent.valid.any()
    targets = np.bincount(absent.row_index.ravel(), minlength=10)
    assert _chi2(targets) < CHI2_1E6[9], targets
    # control: a planner that does not shuffle puts the real row in slot 0 every time
    assert _chi2(np.bincount(np.zeros(20_000, dtype=int), minlength=4)) > 1000


def test_repeated_claims_about_one_key_do_not_count_its_visits():
    """The row numbers are visible to the regulator: intersecting the slots of several
    claims about one person must not leave the person's real rows."""
    def touched(index: CandidateIndex, key: tuple, times: int = 5) -> set[int]:
        common = None
        for _ in range(times):
            rows = set(index.plan([key], k=4).row_index[0].tolist())
            common = rows if common is None else common & rows
        return common

    sizes = {}
    for visits in (0, 1, 2, 3):
        index, key = _index(100_000, real=visits)
        sizes[visits] = len(touched(index, key))
        # control: fresh dummies on every plan (a new index each time) leave exactly the
        # real rows in the intersection, i.e. the visit count
        fresh = None
        for _ in range(5):
            rows = set(CandidateIndex(index_keys(100_000, visits)).plan([key], k=4)
                       .row_index[0].tolist())
            fresh = rows if fresh is None else fresh & rows
        assert len(fresh) == visits
    assert set(sizes.values()) == {4}, sizes


def index_keys(n_rows: int, real: int) -> list[tuple]:
    return [("p", "h")] * real + [("other", str(i)) for i in range(n_rows - real)]


def test_two_real_rows_take_every_order_alike():
    index, key = _index(12, real=2)
    slots = index.plan([key] * 12_000, k=4)
    # the 12 arrangements of rows 0 and 1 over 4 slots (ordered pairs of positions)
    first = np.argmax(slots.valid & (slots.row_index == 0), axis=1)
    second = np.argmax(slots.valid & (slots.row_index == 1), axis=1)
    assert (first != second).all()
    pairs = np.bincount(first * 4 + second, minlength=16)[[4 * i + j for i in range(4)
                                                           for j in range(4) if i != j]]
    assert _chi2(pairs) < CHI2_1E6[11], pairs


@pytest.mark.parametrize("bound", [3, 7, 10, 12])
def test_uniform_below_has_no_bias(bound):
    draws = uniform_below(bound, 60_000)
    assert draws.min() >= 0 and draws.max() < bound
    assert _chi2(np.bincount(draws, minlength=bound)) < 60  # df <= 11: far below 1e-6


def test_uniform_below_refuses_bad_bounds():
    for bound in (0, -1, 1 << 63):
        with pytest.raises(MalformedInput):
            uniform_below(bound, 1)
    assert uniform_below(1, 5).tolist() == [0] * 5


def test_a_visit_lands_anywhere_in_a_fresh_table_order():
    refs = [bytes([i]) * 32 for i in range(10)]
    where = np.bincount([secret_row_order(refs).index(3) for _ in range(5000)], minlength=10)
    assert _chi2(where) < CHI2_1E6[9], where
    assert len({tuple(secret_row_order(refs)) for _ in range(50)}) > 45  # 10! orders


# --- 3. refusal unchanged ----------------------------------------------------------------------


def test_too_many_candidates_is_still_refused():
    index, key = _index(10, real=5)
    with pytest.raises(TooManyCandidates):
        index.plan([key], k=4)
    with pytest.raises(MalformedInput):
        index.plan([key], k=0)


def test_a_claims_slots_are_distinct_rows_whatever_its_visit_count():
    """Real rows are distinct; dummies drawn with replacement would repeat more often the
    fewer real rows a claim has, a hint at the count in a small table."""
    for real in (0, 1, 2, 3, 4):
        index, key = _index(12, real=real)
        keys = [key] + [("absent", str(i)) for i in range(300)]
        slots = index.plan(keys, k=4)
        assert all(len(set(row)) == 4 for row in slots.row_index.tolist()), real
    tiny, key = _index(3, real=1)  # fewer rows than slots: repeats cannot be avoided
    assert tiny.plan([key], k=4).row_index.shape == (1, 4)
