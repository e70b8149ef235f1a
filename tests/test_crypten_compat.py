"""CrypTen really runs on this torch: a two-party secret-shared computation.

`load_crypten()` also swaps CrypTen's MT19937 generators for AES-CTR streams
(`mpc.ss.prng`); the plain `crypten.init()` path below runs on them as well.
"""

import multiprocessing as mp

import pytest
import torch

from mpc.crypten_compat import load_crypten


def _two_party_dot(rank: int, queue: "mp.Queue") -> None:
    import os

    crypten = load_crypten()
    os.environ.update(
        {"WORLD_SIZE": "2", "RANK": str(rank), "DISTRIBUTED_BACKEND": "gloo"}
    )
    crypten.init()
    x = crypten.cryptensor(torch.tensor([1.5, -2.0, 3.25]), src=0)
    y = crypten.cryptensor(torch.tensor([2.0, 4.0, -1.0]), src=1)
    dot = (x * y).sum().get_plain_text()
    less = (x < y).get_plain_text()
    streams = sorted({type(g).__name__ for gens in crypten.generators.values()
                      for g in gens.values()})
    crypten.uninit()
    queue.put((rank, dot.item(), less.tolist(), streams))


def test_crypten_imports_with_nn() -> None:
    crypten = load_crypten()
    assert crypten.__version__ == "0.4.1"
    assert hasattr(crypten.nn, "Module")


@pytest.mark.timeout(120)
def test_two_party_crypten_computation(tmp_path) -> None:
    import os

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    os.environ["RENDEZVOUS"] = f"file://{tmp_path / 'rendezvous'}"
    try:
        procs = [ctx.Process(target=_two_party_dot, args=(r, queue)) for r in range(2)]
        for p in procs:
            p.start()
        results = sorted(queue.get(timeout=100) for _ in procs)
        for p in procs:
            p.join(timeout=30)
    finally:
        del os.environ["RENDEZVOUS"]
    assert [p.exitcode for p in procs] == [0, 0]
    for _, dot, less, streams in results:
        assert streams == ["StreamGenerator"]  # crypten.init seeds AES-CTR streams too
        assert dot == pytest.approx(1.5 * 2.0 - 2.0 * 4.0 - 3.25, abs=1e-2)
        assert less == [1.0, 1.0, 0.0]
