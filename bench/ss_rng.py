"""Cost of the ss randomness: one claim-circuit batch, engine time and elements drawn.

The operator, regulator and dealer run as `LoopbackCluster` processes; each imports
this module as `__mp_main__` and counts, per party, every `torch.randint` call (the
MT19937 path CrypTen used) and every `mpc.ss.prng.StreamGenerator` draw (AES-256-CTR):
calls, elements and seconds spent drawing. Prints medians over 5 batches per size.
Run: `python -m bench.ss_rng [n ...]` (default 1000 10000).
"""

import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "SS_RNG_BENCH_DIR" not in os.environ:  # the parent; its party processes inherit it
    os.environ["SS_RNG_BENCH_DIR"] = tempfile.mkdtemp(prefix="ss-rng-counts-")
OUT = Path(os.environ["SS_RNG_BENCH_DIR"])


def _install_counters() -> None:
    import torch

    stats = {"torch_calls": 0, "torch_elements": 0, "torch_seconds": 0.0,
             "stream_calls": 0, "stream_elements": 0, "stream_seconds": 0.0}

    def dump():
        (OUT / f"{mp.current_process().name}.json").write_text(json.dumps(stats))

    original = torch.randint

    def randint(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        stats["torch_seconds"] += time.perf_counter() - start
        stats["torch_calls"] += 1
        stats["torch_elements"] += out.numel()
        dump()
        return out

    torch.randint = randint
    try:
        from mpc.ss import prng
    except ImportError:
        return
    words = prng.StreamGenerator._words

    def counted(self, n):
        start = time.perf_counter()
        out = words(self, n)
        stats["stream_seconds"] += time.perf_counter() - start
        stats["stream_calls"] += 1
        stats["stream_elements"] += int(n)
        dump()
        return out

    prng.StreamGenerator._words = counted


if __name__ == "__mp_main__":
    _install_counters()


def _read() -> dict:
    out = {}
    for f in OUT.glob("*.json"):
        out[f.stem] = json.loads(f.read_text())
    return out


def _keys(frame) -> list[tuple[str, str]]:
    return list(zip(frame["national_id"].astype(str), frame["hospital_id"].astype(str),
                    strict=True))


def _delta(after, before):
    return {p: {k: round(v - before.get(p, {}).get(k, 0), 4) for k, v in s.items()}
            for p, s in after.items()}


def main(sizes: list[int], repeats: int = 5) -> dict:
    from mpc.claim import OPERATOR, REGULATOR, InsurerClaims, plain_verdicts, share_visit_rows
    from mpc.claim.candidates import CandidateIndex
    from mpc.claim.synthetic import make_dataset
    from mpc.ss.loopback import LoopbackCluster

    OUT.mkdir(parents=True, exist_ok=True)
    data = make_dataset(n_claims=max(sizes), seed=3)
    index = CandidateIndex(_keys(data.visits))
    ss = InsurerClaims("ss", 4)
    cluster = LoopbackCluster(share_visit_rows(data.visits))
    report = {}
    try:
        warm = data.claims.iloc[:1]
        q = ss.encode_claims(warm)
        cluster.evaluate("warm", (q.payloads[OPERATOR], q.payloads[REGULATOR]),
                         index.plan(_keys(warm), 4))
        for n in sizes:
            part = data.claims.iloc[:n]
            expected = plain_verdicts(part, data.visits, data.policies)
            engine, caller, draws = [], [], None
            for r in range(repeats):
                q = ss.encode_claims(part)
                before = _read()
                res = cluster.evaluate(f"b{n}-{r}", (q.payloads[OPERATOR], q.payloads[REGULATOR]),
                                       index.plan(_keys(part), 4))
                draws = _delta(_read(), before)
                bits = ss.decode_verdicts(q, {OPERATOR: res.operator_blob,
                                              REGULATOR: res.regulator_blob})
                assert (bits["visit_found"].to_numpy() == expected["visit_found"].to_numpy()).all()
                engine.append(res.operator_seconds)
                caller.append(res.seconds)
            report[n] = {"engine_s_median": round(statistics.median(engine), 4),
                         "engine_s_all": [round(x, 4) for x in engine],
                         "caller_s_median": round(statistics.median(caller), 4),
                         "draws_per_batch": draws}
    finally:
        cluster.close()
    return report


if __name__ == "__main__":
    sizes = [int(a) for a in sys.argv[1:]] or [1000, 10000]
    print(json.dumps(main(sizes), indent=1))
