"""Benchmark of the claim-check engines: plain, ss (CrypTen over mTLS) and he (TenSEAL).

Engines only (the node layer adds its own through-the-nodes numbers). Measured in one
run on the same synthetic data:

* single-claim latency p50/p99, end to end at the engine level: the insurer encodes
  (shares / encrypts) one claim, the server side evaluates against its K = 4
  candidate slots, the insurer decodes. For ss the operator, regulator and dealer
  are three OS processes on loopback with mutual TLS; `ss` latency is measured by
  the caller (queue hops to the party processes included) and `ss_engine` inside
  the operator process (the MPC alone);
* batch throughput at 1,000 and 10,000 claims (quick: 1,000 only), claims per second,
  median of 3 interleaved rounds (quick: 2);
* bytes exchanged per batch: insurer payloads and answers, plus for ss the frames
  between the parties and with the dealer (before TLS framing);
* ratios to plain. Every batch's verdict bits are checked against plain.

Goals (measured, not asserted): single claim <= 100 ms in ss and he; batches
>= 1,000 claims/s. Run: `python -m bench.claim_engines [--quick]`; writes
bench/results/latest/claim_engines.json and .md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from mpc.claim import (
    OPERATOR,
    REGULATOR,
    SERVER,
    InsurerClaims,
    encode_visit_rows,
    evaluate_he,
    evaluate_plain,
    he_verdict_payload,
    share_visit_rows,
)
from mpc.claim.candidates import CandidateIndex
from mpc.claim.constants import DEFAULT_K
from mpc.claim.synthetic import make_dataset
from mpc.he import HeDecryptionKey
from mpc.ss.loopback import LoopbackCluster

RESULTS = Path(__file__).parent / "results" / "latest"


def _keys(frame, id_col="national_id"):
    return list(zip(frame[id_col].astype(str), frame["hospital_id"].astype(str), strict=True))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(seconds: list[float]) -> dict:
    return {
        "p50_ms": round(1000 * statistics.median(seconds), 2),
        "p99_ms": round(1000 * _percentile(seconds, 0.99), 2),
        "repeats": len(seconds),
    }


class Engines:
    """The three engines over one dataset, each exposing run(claims) -> (bits, bytes)."""

    def __init__(self, data) -> None:
        self.data = data
        self.rows = encode_visit_rows(data.visits)
        self.index = CandidateIndex(_keys(data.visits))
        self.plain = InsurerClaims("plain", DEFAULT_K)
        self.he_key = HeDecryptionKey.generate()  # the regulator's
        self.he = InsurerClaims("he", DEFAULT_K, self.he_key.public)
        self.ss = InsurerClaims("ss", DEFAULT_K)
        self.cluster = LoopbackCluster(share_visit_rows(data.visits))
        self.batch = 0
        self.last_ss_engine_seconds = 0.0

    def slots(self, claims):
        return self.index.plan(_keys(claims), DEFAULT_K)

    def run_plain(self, claims):
        query = self.plain.encode_claims(claims)
        answer = evaluate_plain(query.payloads[SERVER], self.rows, self.slots(claims))
        bits = self.plain.decode_verdicts(query, {SERVER: answer})
        return bits, {"insurer": len(query.payloads[SERVER]) + len(answer)}

    def run_he(self, claims):
        query = self.he.encode_claims(claims)
        answer = evaluate_he(self.he_key.public, query.payloads[SERVER], self.rows,
                             self.slots(claims))
        verdicts = he_verdict_payload(self.he_key, answer, len(claims), DEFAULT_K)
        bits = self.he.decode_verdicts(query, {REGULATOR: verdicts})
        return bits, {"insurer": len(query.payloads[SERVER]) + len(verdicts),
                      "operator-regulator": len(answer)}

    def run_ss(self, claims):
        query = self.ss.encode_claims(claims)
        self.batch += 1
        result = self.cluster.evaluate(f"bench-{self.batch}", (query.payloads[OPERATOR],
                                                               query.payloads[REGULATOR]),
                                       self.slots(claims))
        self.last_ss_engine_seconds = result.operator_seconds
        bits = self.ss.decode_verdicts(query, {OPERATOR: result.operator_blob,
                                               REGULATOR: result.regulator_blob})
        insurer = sum(len(p) for p in query.payloads.values()) + len(
            result.operator_blob) + len(result.regulator_blob)
        return bits, {"insurer": insurer}

    def party_bytes(self) -> dict:
        stats = self.cluster.audit_operator()["stats"]["channel"]
        return {
            "operator_regulator": stats["regulator"]["sent"] + stats["regulator"]["received"],
            "operator_dealer": stats["health-authority"]["sent"]
            + stats["health-authority"]["received"],
        }

    def close(self) -> None:
        self.cluster.close()


def measure(quick: bool = False) -> dict:
    sizes = [1000] if quick else [1000, 10_000]
    repeats = 10 if quick else 50
    batch_repeats = 2 if quick else 3
    data = make_dataset(n_claims=max(sizes), seed=3)
    engines = Engines(data)
    out: dict = {"k": DEFAULT_K, "single_claim": {}, "batches": {}, "cores": os.cpu_count()}
    try:
        claims = data.claims
        runs = {"plain": engines.run_plain, "he": engines.run_he, "ss": engines.run_ss}
        for fn in runs.values():  # warm up every path once
            fn(claims.iloc[:1])
        single: dict[str, list[float]] = {name: [] for name in runs} | {"ss_engine": []}
        single_bytes: dict[str, int] = {}
        before = engines.party_bytes()
        for i in range(repeats):  # interleave engines so load changes hit all alike
            one = claims.iloc[i:i + 1]
            for name, fn in runs.items():
                start = time.perf_counter()
                _, used = fn(one)
                single[name].append(time.perf_counter() - start)
                single_bytes[name] = used["insurer"]
            single["ss_engine"].append(engines.last_ss_engine_seconds)
        after = engines.party_bytes()
        for name, seconds in single.items():
            out["single_claim"][name] = _summary(seconds)
        for name in runs:
            out["single_claim"][name]["insurer_bytes"] = single_bytes[name]
        out["single_claim"]["ss"]["party_bytes"] = {
            k: (after[k] - before[k]) // repeats for k in after}
        plain_p50 = out["single_claim"]["plain"]["p50_ms"]
        for name in ("he", "ss", "ss_engine"):
            out["single_claim"][name]["ratio_to_plain"] = round(
                out["single_claim"][name]["p50_ms"] / plain_p50, 1)

        for n in sizes:
            batch = claims.iloc[:n]
            entry: dict = {name: {"seconds_all": []} for name in runs}
            reference = None
            for _ in range(batch_repeats):  # interleaved rounds; medians reported
                for name, fn in runs.items():
                    before = engines.party_bytes() if name == "ss" else None
                    start = time.perf_counter()
                    bits, used = fn(batch)
                    entry[name]["seconds_all"].append(time.perf_counter() - start)
                    if reference is None:
                        reference = bits
                    entry[name]["insurer_bytes"] = used["insurer"]
                    entry[name]["agrees_with_plain"] = bool(
                        (bits.to_numpy() == reference.to_numpy()).all())
                    if name == "ss":
                        after = engines.party_bytes()
                        entry[name]["party_bytes"] = {k: after[k] - before[k] for k in after}
                        entry[name].setdefault("engine_seconds_all", []).append(
                            engines.last_ss_engine_seconds)
            for e in entry.values():
                e["seconds"] = round(statistics.median(e["seconds_all"]), 3)
                e["claims_per_s"] = round(n / e["seconds"], 1)
                e["seconds_all"] = [round(x, 3) for x in e["seconds_all"]]
                if "engine_seconds_all" in e:
                    e["engine_seconds"] = round(statistics.median(e.pop("engine_seconds_all")),
                                                3)
            for name in ("he", "ss"):
                entry[name]["slowdown_vs_plain"] = round(
                    entry[name]["seconds"] / entry["plain"]["seconds"], 1)
            out["batches"][str(n)] = entry
    finally:
        engines.close()
    single = out["single_claim"]
    out["goals"] = {
        "single_claim_le_100ms": {e: single[e]["p50_ms"] <= 100 for e in ("ss", "he")},
        "batch_ge_1000_per_s": {
            f"{e}@{n}": out["batches"][n][e]["claims_per_s"] >= 1000
            for n in out["batches"] for e in ("ss", "he")},
    }
    return out


def _markdown(result: dict) -> str:
    lines = ["# Claim-check engines", "",
             f"K = {result['k']} candidate slots per claim; {result['cores']} cores (shared).",
             "", "| engine | single p50 ms | single p99 ms | vs plain |",
             "|---|---|---|---|"]
    for name, s in result["single_claim"].items():
        lines.append(f"| {name} | {s['p50_ms']} | {s['p99_ms']} | "
                     f"{s.get('ratio_to_plain', 1.0)} |")
    lines += ["", "| batch | engine | seconds | claims/s | insurer bytes | agrees |",
              "|---|---|---|---|---|---|"]
    for n, entry in result["batches"].items():
        for name, e in entry.items():
            lines.append(f"| {n} | {name} | {e['seconds']} | {e['claims_per_s']} | "
                         f"{e['insurer_bytes']} | {e['agrees_with_plain']} |")
    return "\n".join(lines) + "\n"


def run(quick: bool = False) -> dict:
    result = measure(quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / "claim_engines.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(RESULTS / "claim_engines.json")
    md = RESULTS / "claim_engines.md.tmp"
    md.write_text(_markdown(result))
    md.replace(RESULTS / "claim_engines.md")
    return result


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
    sys.exit(0)
