"""Benchmark of the secure room: one sandboxed run of the claim package against the same
function called in-process, on the same test library, in the same run.

The sandboxed run includes everything the room does per run: staging the package and
the projected inputs, the tmpfs run area, the package's sandbox (bwrap as the
unprivileged uid, seccomp, rlimits, a cgroup of its own where the node can make one),
the parser's sandbox (in a cgroup too), and the output policy.
Goal (issue 19): at most 1.5 s added per run, on the 20,000-patient test library.

Run: `python -m bench.secure_room [--quick]`; writes bench/results/latest/secure_room.json
and .md.
"""

import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from governance.synthetic import write_library
from parties.secure_room.cgroup import run_cgroup
from parties.secure_room.room import run_package
from parties.secure_room.sandbox import SandboxLimits, sandbox_available
from scenarios.claim_check.generator import generate

RESULTS = Path(__file__).parent / "results" / "latest"
CLAIM_PACKAGE = Path(__file__).resolve().parents[1] / "scenarios/claim_check/claim_package"


def _tables(scenario: Path) -> dict[str, pd.DataFrame]:
    claims = pd.read_csv(scenario / "claims.csv", dtype=str)
    claims["claimed_fen"] = claims["claimed_fen"].astype("int64")
    claims["visit_date"] = pd.to_datetime(claims["visit_date"]).dt.date
    policies = pd.read_csv(scenario / "policies.csv", dtype=str, keep_default_na=False)
    policies["covered_categories"] = policies["covered_categories"].map(
        lambda text: [c for c in text.split(";") if c])
    policies["deductible_fen"] = policies["deductible_fen"].astype("int64")
    visits = pd.read_parquet(scenario / "ground_truth" / "visits.parquet")
    return {"visits": visits, "claims": claims, "policies": policies}


def _in_process(tables: dict[str, pd.DataFrame]) -> float:
    sys.path.insert(0, str(CLAIM_PACKAGE))
    try:
        module = importlib.import_module("verdict")
        started = time.perf_counter()
        module.claim_verdicts({name: frame.copy() for name, frame in tables.items()})
        return time.perf_counter() - started
    finally:
        sys.path.remove(str(CLAIM_PACKAGE))


def _cgroup_seconds(repeats: int) -> float:
    """Median time to create, limit and remove one run's cgroup (part of every run)."""
    limits, times = SandboxLimits(), []
    for _ in range(repeats):
        started = time.perf_counter()
        with run_cgroup(memory_bytes=limits.memory_bytes, tasks=limits.tasks):
            pass
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(quick: bool = False) -> dict:
    sandbox_available()
    load_at_start = os.getloadavg()[0]
    patients, repeats = (5_000, 2) if quick else (20_000, 5)
    with tempfile.TemporaryDirectory(prefix="cogov-bench-room-") as work:
        scenario = Path(work) / "scenario"
        generate(scenario, patients=patients, claims=600, seed=11, progress=False)
        tables = _tables(scenario)
        library = Path(work) / "test"
        write_library(library, "test", tables)
        in_process, sandboxed = [], []
        for _ in range(repeats):
            in_process.append(_in_process(tables))
            started = time.perf_counter()
            run = run_package(CLAIM_PACKAGE, library)
            sandboxed.append(time.perf_counter() - started)
            isolation = run.report.isolation
            if run.report.outcome != "ok":
                raise RuntimeError(f"the claim package failed in the room: {run.report}")
    in_median, room_median = statistics.median(in_process), statistics.median(sandboxed)
    return {
        "patients": patients, "claims": 600, "repeats": repeats,
        "visits": len(tables["visits"]),
        "in_process_s": round(in_median, 3), "sandboxed_s": round(room_median, 3),
        "added_s": round(room_median - in_median, 3), "goal_added_s": 1.5,
        "isolation": isolation,
        "cgroup_create_remove_ms": round(_cgroup_seconds(20) * 1000, 2),
        "load_average_at_start": round(load_at_start, 2),
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "in_process_all_s": [round(s, 3) for s in in_process],
        "sandboxed_all_s": [round(s, 3) for s in sandboxed],
    }


def _markdown(result: dict) -> str:
    return "\n".join([
        "# Secure room: one sandboxed run of the claim package", "",
        f"{result['patients']} patients ({result['visits']} visits), {result['claims']} claims, "
        f"median of {result['repeats']} runs; isolation {result['isolation']}; load average "
        f"{result['load_average_at_start']} at start, {result['load_average_at_end']} at end "
        f"(2 cores); a run's cgroup costs {result['cgroup_create_remove_ms']} ms to make "
        "and remove.",
        "",
        "| in-process s | sandboxed s | added s | goal |", "|---|---|---|---|",
        f"| {result['in_process_s']} | {result['sandboxed_s']} | {result['added_s']} | "
        f"<= {result['goal_added_s']} |", ""])


def run(quick: bool = False) -> dict:
    result = measure(quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(result, indent=2)), ("md", _markdown(result))):
        tmp = RESULTS / f"secure_room.{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(RESULTS / f"secure_room.{suffix}")
    return result


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
    sys.exit(0)
