"""A reusable process pool that runs batch group operations on every core.

Most batch steps hold the GIL: hashing to the field (hashlib, a Python loop
per id) and ElGamal and edwards25519 operations (libsodium through cffi, one
short call per point). Only the X25519 and Elligator 2 batches of
`mpc.hazmat._x25519` release it, so threads would not run a whole PSI step in
parallel; processes do. The pool is started once and reused: callers pass
it to each batch verb. Work is split into contiguous chunks whose results are
concatenated in order, so a parallel run returns exactly what an inline run
returns. Workers are started with "spawn" so they never inherit the parent's
threads or locks (torch, Ray and gRPC may be loaded in a node process).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

#: below this many items a batch runs inline: shipping it costs more than it saves
MIN_PARALLEL_ITEMS = 2048
#: modules each worker imports at start, so the first batch does not pay for them
DEFAULT_PRELOAD = ("mpc.hazmat.group", "mpc.hazmat.elgamal", "mpc.xid", "mpc.psi")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


class WorkerPool:
    """A lazily started pool of worker processes, safe to share across calls.

    Use as a context manager, or call `close()`; an unclosed pool is shut
    down at interpreter exit by `concurrent.futures`.
    """

    def __init__(
        self,
        workers: int | None = None,
        chunks_per_worker: int = 4,
        preload: Sequence[str] = DEFAULT_PRELOAD,
    ) -> None:
        self.workers = workers or usable_cores()
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        self.chunks_per_worker = chunks_per_worker
        self.preload = tuple(preload)
        self._executor: ProcessPoolExecutor | None = None

    def __repr__(self) -> str:
        state = "running" if self._executor else "idle"
        return f"WorkerPool(workers={self.workers}, {state})"

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> WorkerPool:
        """Start the workers now (otherwise they start on first use)."""
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn")
            )
            # Every worker imports the modules it will run before the first real batch.
            futures = [self._executor.submit(_warm_up, self.preload) for _ in range(self.workers)]
            for f in futures:
                f.result()
        return self

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def chunk_bounds(self, n: int) -> list[tuple[int, int]]:
        count = max(1, min(n // 256 or 1, self.workers * self.chunks_per_worker))
        step = -(-n // count)
        return [(start, min(start + step, n)) for start in range(0, n, step)]

    def starmap(self, fn: Callable[..., Any], arg_tuples: Sequence[tuple]) -> list[Any]:
        """fn(*args) for every tuple, in worker processes, results in order."""
        executor = self.start()._executor
        assert executor is not None
        futures = [executor.submit(fn, *args) for args in arg_tuples]
        return [f.result() for f in futures]


def run_chunked(
    fn: Callable[..., Any],
    n: int,
    chunk_args: Callable[[int, int], tuple],
    pool: WorkerPool | None,
) -> list[Any]:
    """Run `fn(*chunk_args(start, stop))` over chunks of range(n); list of per-chunk results.

    Inline (one chunk) without a pool or for small batches.
    """
    if pool is None or pool.workers < 2 or n < MIN_PARALLEL_ITEMS:
        return [fn(*chunk_args(0, n))]
    return pool.starmap(fn, [chunk_args(a, b) for a, b in pool.chunk_bounds(n)])


def _warm_up(modules: Sequence[str]) -> int:
    for name in modules:
        importlib.import_module(name)
    time.sleep(0.2)  # stay busy so each warm-up task lands on a different worker
    return os.getpid()
