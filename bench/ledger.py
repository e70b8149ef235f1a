"""Benchmark of the tamper-evident log: signed appends, full verification, proof sizes.

Goals (measured, not asserted): >= 5,000 signed appends/s in batches (actor
signatures, signature checks and tree-head signing included); 1,000,000
entries verified in <= 60 s on 2 cores (`quick` uses 100,000); an inclusion
proof at 1M entries <= 1 KiB; a receipt (`governance.ledger.proofs.Receipt`, its
checkpoint cosigned by both witnesses) at 1M entries <= 1.5 KiB; one entry from its
append to a receipt against a checkpoint both witnesses cosigned <= 1 s, here the
work of the log and the witnesses in one process (`bench.claim_nodes` measures it
through the nodes, witness polling included). Peers measured in the same run: plain batched
SQLite inserts of the same events (no signatures, no tree) for appends, and
single-process verification for the parallel verifier.

Run: `python -m bench.ledger [--quick]`; writes bench/results/latest/ledger.json and .md.
"""

import base64
import json
import multiprocessing
import os
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.ledger import (
    MerkleLog,
    Witness,
    check_inclusion_proof,
    encode_leaf,
    make_event,
    sha256_hex,
    sign_event,
    verify_log,
)
from governance.ledger.checkpoint import checkpoint_text, cosign_line, note, origin_of, sign_line
from governance.ledger.merkle import MemoryTree, leaf_hash
from governance.ledger.proofs import ProofBundle, Receipt, join_path, verify_receipt
from governance.ledger.signing import canonical_json, private_key_from_hex, public_key_hex
from governance.ledger.tree_head import sign_tree_head

RESULTS = Path(__file__).parent / "results" / "latest"
ACTORS = ("regulator", "hospital-1", "health-authority")
T0 = 1_794_000_000_000


def _actor_keys(seed: int) -> dict[str, Ed25519PrivateKey]:
    return {a: private_key_from_hex(f"{seed + i:064x}") for i, a in enumerate(ACTORS)}


def _event(i: int):
    payload = {
        "contract_id": "claim-check-2026-insurer-a",
        "party": "insurer-a",
        "consent_sha256": sha256_hex(f"consent-{i}"),
        "records_touched": 1 + i % 7,
        "rows_returned": 1,
        "compute_ms": 20 + i % 50,
    }
    return make_event("query_answered", ACTORS[i % 3], f"req-{i:08d}", payload, timestamp_ms=T0 + i)


def _signed(keys, start: int, count: int):
    return [sign_event(e, keys[e.actor]) for e in map(_event, range(start, start + count))]


def make_leaves(start: int, count: int, seed: int) -> list[bytes]:
    """Worker: signed, encoded leaves [start, start+count) (same bytes the store writes)."""
    keys = _actor_keys(seed)
    return [encode_leaf(start + k, entry, T0 + start + k)
            for k, entry in enumerate(_signed(keys, start, count))]


def _pool(processes: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))


def _generate(n: int, seed: int, processes: int) -> list[bytes]:
    chunk = 20_000
    with _pool(processes) as pool:
        futures = [pool.submit(make_leaves, s, min(chunk, n - s), seed) for s in range(0, n, chunk)]
        return [leaf for f in futures for leaf in f.result()]


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the verifier's worker pool)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _connect(directory: str, name: str) -> sqlite3.Connection:
    conn = sqlite3.connect(os.path.join(directory, name))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def bench_appends(n: int, batch: int, repeats: int) -> dict:
    keys = _actor_keys(1)
    public = {a: k.public_key() for a, k in keys.items()}
    ours, ours_cpu, plain, last_log = [], [], [], None
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory() as directory:
            log = MerkleLog(
                _connect(directory, "log.db"), "operator", Ed25519PrivateKey.generate(), public
            )
            started, cpu = time.perf_counter(), time.process_time()
            for start in range(0, n, batch):
                # actors sign, the log appends (its clock reads the entries' dates)
                log.append(_signed(keys, start, min(batch, n - start)), timestamp_ms=T0 + start)
            ours.append(n / (time.perf_counter() - started))
            ours_cpu.append(n / (time.process_time() - cpu))
            if repeat == repeats - 1:
                last_log = _proof_timings(log)
            conn = _connect(directory, "plain.db")
            conn.execute("CREATE TABLE events (i INTEGER PRIMARY KEY, body BLOB)")
            started = time.perf_counter()
            for start in range(0, n, batch):
                rows = [
                    (i, canonical_json(_event(i).document()))
                    for i in range(start, min(n, start + batch))
                ]
                with conn:
                    conn.executemany("INSERT INTO events VALUES (?, ?)", rows)
            plain.append(n / (time.perf_counter() - started))
    return {
        "entries": n,
        "batch": batch,
        "repeats": repeats,
        "signed_appends_per_s_median": round(statistics.median(ours)),
        "signed_appends_per_cpu_s_median": round(statistics.median(ours_cpu)),
        "peer_plain_sqlite_inserts_per_s_median": round(statistics.median(plain)),
        "ratio_plain_over_signed": round(statistics.median(plain) / statistics.median(ours), 2),
        "goal_appends_per_s": 5000,
        "goal_met_wall_clock": statistics.median(ours) >= 5000,
        "goal_met_per_cpu_second": statistics.median(ours_cpu) >= 5000,
        "proofs_from_store": last_log,
    }


def _proof_timings(log: MerkleLog) -> dict:
    size, samples = log.size, 200
    inclusion, consistency = [], []
    for k in range(samples):
        index = (k * 7919) % size
        started = time.perf_counter()
        log.inclusion_proof(index)
        inclusion.append(time.perf_counter() - started)
        old = 1 + (k * 104_729) % (size - 1)
        started = time.perf_counter()
        log.consistency_proof(old)
        consistency.append(time.perf_counter() - started)
    return {
        "tree_size": size,
        "inclusion_proof_us_median": round(statistics.median(inclusion) * 1e6, 1),
        "consistency_proof_us_median": round(statistics.median(consistency) * 1e6, 1),
    }


def bench_cosigned_receipt(n: int, repeats: int) -> dict:
    """One entry appended to a log of `n`, cosigned by two witnesses (each given the
    consistency proof from the head it holds), then its receipt against that checkpoint."""
    keys = _actor_keys(3)
    public = {a: k.public_key() for a, k in keys.items()}
    log_key = Ed25519PrivateKey.generate()
    witnesses = {w: Ed25519PrivateKey.generate() for w in ("health-authority", "regulator")}
    times = []
    with tempfile.TemporaryDirectory() as directory:
        log = MerkleLog(_connect(directory, "log.db"), "operator", log_key, public)
        for start in range(0, n, 1000):
            log.append(_signed(keys, start, min(1000, n - start)))
        watching = {w: Witness(_connect(directory, f"{w}.db"), w, k, {"operator": log_key})
                    for w, k in witnesses.items()}
        for witness in watching.values():
            witness.cosign(log.tree_head())
        origin = origin_of("operator", log_key.public_key())
        for i in range(repeats):
            started = time.perf_counter()
            entry = _signed(keys, n + i, 1)[0]
            head = log.append([entry]).tree_head
            text = checkpoint_text(origin, head.tree_size, head.root)
            lines = [sign_line(text, origin, log_key)]
            for witness in watching.values():
                held = witness.latest("operator")
                cosignature = witness.cosign(head, log.consistency_proof(held.tree_size))
                lines.append(cosignature.checkpoint_cosignature)
            index = log.index_of(entry.signature)
            receipt = Receipt(index=index, checkpoint=note(text, lines),
                              inclusion=join_path(log.inclusion_proof(index).path))
            verify_receipt(receipt, log.leaf(index), origin, log_key.public_key(),
                           {w: k.public_key() for w, k in witnesses.items()}, required=2)
            times.append(time.perf_counter() - started)
    return {"log_entries": n, "repeats": repeats,
            "append_to_cosigned_receipt_ms_median": round(1000 * statistics.median(times), 2),
            "append_to_cosigned_receipt_ms_max": round(1000 * max(times), 2),
            "goal_ms": 1000}


def _receipt_sizes(tree: MemoryTree, leaves: list[bytes], log_key: Ed25519PrivateKey) -> dict:
    """The wire size of a receipt (and of a proof bundle, which adds the entry) at the
    tree's size, its checkpoint signed by the log and cosigned by both witnesses."""
    n = tree.size
    origin = origin_of("operator", log_key.public_key())
    text = checkpoint_text(origin, n, tree.root())
    witnesses = {w: Ed25519PrivateKey.generate() for w in ("health-authority", "regulator")}
    cosigned = note(text, [sign_line(text, origin, log_key)] + [
        cosign_line(text, w, k, T0 // 1000) for w, k in witnesses.items()])
    receipts, bundles = [], []
    for index in (0, n // 3, n // 2, n - 1):
        receipt = Receipt(index=index, checkpoint=cosigned,
                          inclusion=join_path(tree.inclusion_proof(index, n)))
        verify_receipt(receipt, leaves[index], origin, log_key.public_key(),
                       {w: k.public_key() for w, k in witnesses.items()}, required=2)
        receipts.append(len(receipt.model_dump_json().encode()))
        bundles.append(len(ProofBundle(**receipt.model_dump(), entry=base64.b64encode(
            leaves[index]).decode()).model_dump_json().encode()))
    return {"receipt_json_bytes_max": max(receipts), "receipt_goal_bytes": 1536,
            "receipt_goal_met": max(receipts) <= 1536,
            "proof_bundle_json_bytes_max": max(bundles)}


def bench_verify(n: int, processes: int, peer_n: int) -> dict:
    seed = 7
    started = time.perf_counter()
    leaves = _generate(n, seed, processes)
    generated_s = time.perf_counter() - started
    keys = _actor_keys(seed)
    public = {a: public_key_hex(k) for a, k in keys.items()}
    log_key = Ed25519PrivateKey.generate()
    public["operator"] = public_key_hex(log_key)

    tree = MemoryTree(leaf_hash(x) for x in leaves)
    head = sign_tree_head("operator", n, tree.root(), T0 + n, log_key)
    cpu = _cpu_seconds()
    report = verify_log(leaves, head, [], public, processes=processes)
    if not report.ok:
        raise RuntimeError(report.summary())
    time.sleep(1.0)  # let the executor reap its workers so their CPU time is counted
    verify_cpu_s = _cpu_seconds() - cpu

    peer_head = sign_tree_head("operator", peer_n, tree.root(peer_n), T0, log_key)
    peer = verify_log(leaves[:peer_n], peer_head, [], public, processes=1)
    ours_rate = n / report.seconds
    peer_rate = peer_n / peer.seconds

    sizes = []
    for index in (0, n // 3, n // 2, n - 1):
        proof_json = _proof_json(tree, index, n)
        check_inclusion_proof(proof_json, head, log_key.public_key(), leaf=leaves[index])
        sizes.append(len(proof_json.encode()))
    return {
        "entries": n,
        "processes": processes,
        "generate_signed_entries_s": round(generated_s, 1),
        "verify_s": round(report.seconds, 2),
        "verified_entries_per_s": round(ours_rate),
        "peer_single_process_entries": peer_n,
        "peer_single_process_verify_s": round(peer.seconds, 2),
        "peer_single_process_entries_per_s": round(peer_rate),
        "speedup_over_single_process": round(ours_rate / peer_rate, 2),
        "projected_1M_verify_s": round(1_000_000 / ours_rate, 1),
        "verify_cpu_s_all_processes": round(verify_cpu_s, 1),
        "projected_1M_verify_s_on_2_idle_cores": round(verify_cpu_s / 2 * 1_000_000 / n, 1),
        "goal_1M_verify_s": 60,
        "goal_met_wall_clock": 1_000_000 / ours_rate <= 60,
        "goal_met_on_2_idle_cores": verify_cpu_s / 2 * 1_000_000 / n <= 60,
        "inclusion_proof_json_bytes_max": max(sizes),
        "inclusion_proof_goal_bytes": 1024,
        **_receipt_sizes(tree, leaves, log_key),
    }


def _proof_json(tree: MemoryTree, index: int, size: int) -> str:
    from governance.ledger.store import InclusionProof

    return InclusionProof(
        log_id="operator",
        leaf_index=index,
        tree_size=size,
        leaf_hash=tree.subtree(index, index + 1),
        path=tuple(tree.inclusion_proof(index, size)),
    ).to_json()


def run(quick: bool = False) -> dict:
    """Measure appends, proofs and verification; write JSON and Markdown under bench/results."""
    processes = min(2, os.cpu_count() or 1)
    result = {
        "benchmark": "ledger",
        "quick": quick,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "appends": bench_appends(n=5_000 if quick else 20_000, batch=500, repeats=3),
        "cosigned_receipt": bench_cosigned_receipt(n=10_000 if quick else 100_000, repeats=50),
        "verify": bench_verify(
            n=100_000 if quick else 1_000_000,
            processes=processes,
            peer_n=20_000 if quick else 100_000,
        ),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ledger.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "ledger.md").write_text(_markdown(result))
    return result


def _markdown(result: dict) -> str:
    a, v, c = result["appends"], result["verify"], result["cosigned_receipt"]
    p = a["proofs_from_store"]
    rows = [
        (
            f"signed appends/s (batch {a['batch']}, median of {a['repeats']})",
            f"{a['signed_appends_per_s_median']:,}",
            ">= 5,000",
        ),
        (
            "signed appends per CPU second (contention-free rate)",
            f"{a['signed_appends_per_cpu_s_median']:,}",
            ">= 5,000",
        ),
        (
            "peer: plain SQLite inserts/s (no signatures, no tree)",
            f"{a['peer_plain_sqlite_inserts_per_s_median']:,}",
            f"ratio {a['ratio_plain_over_signed']}x",
        ),
        (
            f"verify {v['entries']:,} entries ({v['processes']} processes)",
            f"{v['verify_s']} s",
            f"1M projected {v['projected_1M_verify_s']} s (goal <= 60 s)",
        ),
        (
            "verification CPU time, all processes",
            f"{v['verify_cpu_s_all_processes']} s",
            f"1M on 2 idle cores: {v['projected_1M_verify_s_on_2_idle_cores']} s",
        ),
        (
            "peer: single-process verification",
            f"{v['peer_single_process_entries_per_s']:,}/s",
            f"speedup {v['speedup_over_single_process']}x",
        ),
        (
            "inclusion proof JSON at this size (max)",
            f"{v['inclusion_proof_json_bytes_max']} B",
            "<= 1,024 B",
        ),
        (
            f"receipt at {v['entries']:,} entries, checkpoint cosigned (max)",
            f"{v['receipt_json_bytes_max']} B",
            f"<= 1,536 B (proof bundle with the entry: {v['proof_bundle_json_bytes_max']} B)",
        ),
        (
            f"append -> receipt against a cosigned checkpoint, log of "
            f"{c['log_entries']:,} (median, in process)",
            f"{c['append_to_cosigned_receipt_ms_median']} ms",
            "<= 1,000 ms (through the nodes: bench/results/latest/claim_nodes.md)",
        ),
        (
            f"inclusion proof from store at {p['tree_size']:,}",
            f"{p['inclusion_proof_us_median']} µs",
            "",
        ),
        (
            f"consistency proof from store at {p['tree_size']:,}",
            f"{p['consistency_proof_us_median']} µs",
            "",
        ),
    ]
    lines = ["| measure | value | goal / peer |", "|---|---|---|"]
    lines += [f"| {a_} | {b_} | {c_} |" for a_, b_, c_ in rows]
    note = (
        f"\nLoad average at start: {result['load_average_at_start']:.1f} on "
        f"{result['cpu_count']} cores. Wall-clock rates drop when other jobs share the "
        "machine; the per-CPU-second figures show the rate on otherwise idle cores.\n"
    )
    return "# Ledger benchmark\n\n" + "\n".join(lines) + "\n" + note


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
