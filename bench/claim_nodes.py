"""Benchmark of the claim check through the nodes: plain, he and ss on loopback.

Real node processes (all eight of the Suzhou topology, mutual TLS on loopback) with
generated data ingested through the circulation chain; the insurer uses
`parties.claims.client.Client`. Measured in one run, for each mode:

* single-claim latency p50/p99, end to end at the insurer: `cold` = the claimant's
  domain token is fetched through the blinded OPRF chain for the query (insurer ->
  regulator -> operator -> health authority and back), `warm` = the token is cached
  (it is stable for the domain's life);
* batch throughput for 1,000 and (not quick) 10,000 claims of one insurer, claims/s
  end to end, OPRF included (a fresh token cache per batch; one OPRF batch for the
  batch's distinct claimants), median of repeats;
* bytes: insurer <-> regulator (request and response bodies), regulator <-> operator
  (sealed envelope and answer), operator <-> regulator/dealer MPC frames (ss);
* ratio of each to plain measured in the same run;
* receipts: every single-claim time above includes checking the answer's receipt (one
  consistency proof and the cosigned checkpoint fetched from the log); then, for fresh
  ss claims, the time from the answer (its entry was appended just before it left) until
  the witnesses' cosigned checkpoint includes the entry (witnesses poll every 0.5 s),
  goal <= 1 s, and the receipt's size on the wire.

Consents are issued (an Ed25519 signature each; format v2 carries no id commitment, so
no scrypt) and registered once before timing: that is the consent intake, not a
per-query cost; its cost per consent is reported too. Goals (measured, not asserted):
single claim p50 <= 100 ms in ss and he; batches >= 1,000 claims/s.
Run: `python -m bench.claim_nodes
[--quick]`; writes bench/results/latest/claim_nodes.json and .md.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from governance.consent import Consent
from governance.contracts import load_contract, parse_contract, sign_contract
from mpc.claim.constants import DEFAULT_K, MODES
from parties.admin.api import ENROLL
from parties.admin.cli import login_with_saved_secret, secret_file
from parties.agreements.api import REGISTER_CONTRACT
from parties.claims.cli import consumer_keys, issue_consents
from parties.claims.client import Client
from parties.federation_cli import init_federation
from parties.runtime import pki, supervisor
from parties.runtime.client import NodeClient
from parties.runtime.node_log import read_log
from parties.runtime.state import StateDir, write_private
from parties.runtime.topology import load_topology

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "latest"
SUZHOU = REPO / "topologies" / "suzhou.toml"
CONTRACT = REPO / "scenarios" / "claim_check" / "contracts" / "claim-check-insurer-a.toml"
INSURER = "insurer-a"
# The agreements capability's contract route, not declared as a `Route` yet.


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _write_topology(dest: Path) -> Path:
    """The Suzhou topology on free loopback ports."""
    raw = tomllib.loads(SUZHOU.read_text())
    ports = iter(_free_ports(2 * len(raw["nodes"])))
    lines = [f'name = "{raw["name"]}"']
    for d in raw["domains"]:
        lines += ["[[domains]]", f'name = "{d["name"]}"']
    for n in raw["nodes"]:
        n["port"] = next(ports)
        if "mpc_port" in n:
            n["mpc_port"] = next(ports)
        lines += ["[[nodes]]"] + [f"{k} = {json.dumps(v)}" for k, v in n.items()]
    for f in raw["flows"]:
        lines += ["[[flows]]", f'source = "{f["source"]}"', f'target = "{f["target"]}"',
                  f"kinds = {json.dumps(f['kinds'])}"]
    path = dest / "topology.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cogov(*args: str) -> None:
    """Run a `cogov` command (the scenario's generator and ingest chain) in a subprocess."""
    subprocess.run([str(Path(sys.executable).parent / "cogov"), *args],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@dataclass
class Setup:
    root: Path
    state: StateDir
    topology_path: Path
    claims: pd.DataFrame
    policies: pd.DataFrame
    consents: dict[str, Consent]
    seconds: dict


def _setup(root: Path, patients: int, claims: int) -> Setup:
    seconds = {}
    started = time.perf_counter()
    data = root / "data"
    _cogov("data", "generate", "--out", str(data), "--patients", str(patients),
           "--claims", str(claims), "--seed", "13")
    state = StateDir(root / "state")
    topology_path = _write_topology(root)
    topology = load_topology(topology_path)
    init_federation(state, topology)  # the log's first checkpoint pinned, as `pki init` does
    os.environ.setdefault("COGOV_OPRF_IDS_PER_DAY", "1000000000")  # measure, not throttle
    rows = supervisor.up(state, topology, topology_path)
    bad = [r for r in rows if r.status != "ok"]
    if bad:
        raise RuntimeError(f"nodes failed to start: {bad}")
    with NodeClient(state, topology, "operator") as client:
        enrollment = client.call("operator", ENROLL)
    write_private(secret_file(state, "operator"), enrollment.secret.encode())
    login_with_saved_secret(state, topology, "operator")
    seconds["federation_up"] = time.perf_counter() - started
    started = time.perf_counter()
    _cogov("govern", "ingest", "--data", str(data), "--state", str(state.root),
           "--topology", str(topology_path))
    seconds["ingest"] = time.perf_counter() - started
    terms = load_contract(CONTRACT).model_dump(mode="json")
    terms["contract_id"] = "bench-insurer-a"
    terms["allowed_outputs"] = [*terms["allowed_outputs"], "mode.ss", "mode.he", "mode.plain"]
    # The bench checks each claimant's consent many times over (three modes, cold and warm,
    # repeated batches): its own contract buys a budget no run exhausts.
    terms["quota"] = {"queries_per_day": 10**6, "rows_per_query": 10**5, "rows_per_day": 10**8,
                      "checks_per_consent_per_day": 10**6}
    contract = parse_contract(terms)
    signed = None
    for party in contract.parties:
        signed = sign_contract(signed or contract, party, pki.load_signing_key(state, party))
    assert signed is not None
    with NodeClient(state, topology, "regulator") as client:  # the product owner registers
        client.call("regulator", REGISTER_CONTRACT, signed)
    frame = pd.read_csv(data / "claims.csv", dtype={"national_id": str})
    frame = frame[frame["insurer"] == INSURER].reset_index(drop=True)
    started = time.perf_counter()
    consents = issue_consents(consumer_keys(data / "consumer_keys.jsonl"), frame["national_id"],
                              INSURER)
    seconds["issue_consents"] = time.perf_counter() - started
    policies = pd.read_csv(data / "policies.csv", dtype={"national_id": str})
    with Client(INSURER, state=state, topology=topology, contract_id="bench-insurer-a",
                policies=policies) as client:
        started = time.perf_counter()
        client.register_consents(consents.values())
        seconds["register_consents"] = time.perf_counter() - started
    return Setup(root, state, topology_path, frame, policies, consents, seconds)


def _client(setup: Setup, batch_size: int = 10_000) -> Client:
    return Client(INSURER, state=setup.state, topology=load_topology(setup.topology_path),
                  contract_id="bench-insurer-a", policies=setup.policies,
                  batch_size=batch_size)


def _node_bytes(setup: Setup, request_ids: set[str]) -> dict:
    """Regulator <-> operator and MPC bytes of these requests (their log ids), from the
    operator's log."""
    out = {"regulator_operator": 0, "mpc_operator_regulator": 0, "mpc_operator_dealer": 0}
    found = 0
    for event in read_log(setup.state.node("operator").log):
        if event["event"] == "claims_computed" and event.get("request_id") in request_ids:
            found += 1
            out["regulator_operator"] += event["envelope_bytes"] + event["answer_bytes"]
            mpc = event.get("mpc_bytes") or {}
            out["mpc_operator_regulator"] += mpc.get("regulator", 0)
            out["mpc_operator_dealer"] += mpc.get("health-authority", 0)
    if not found:  # a zero here would be a number nobody measured
        raise RuntimeError("the operator logged no computation for these requests")
    return out


def _single(setup: Setup, client: Client, mode: str, repeats: int, cold: bool) -> dict:
    times = []
    claims = setup.claims
    # Warm and cold check other claims: a claim asked before (same mode) is answered from the
    # regulator's book without computing, which is not what this measures.
    first = 0 if cold else repeats
    for i in range(repeats):
        row = claims.iloc[(first + i) % len(claims)]
        if cold:
            client.forget_tokens()
        started = time.perf_counter()
        client.check_one(national_id=row.national_id, hospital_id=row.hospital_id,
                         visit_date=row.visit_date, claimed_fen=int(row.claimed_fen),
                         diagnosis_code=row.diagnosis_code, claim_id=row.claim_id,
                         consent=setup.consents[row.national_id], mode=mode,
                         request_id=f"bench-{mode}-{'cold' if cold else 'warm'}-{i}")
        times.append(time.perf_counter() - started)
    return {"p50_ms": round(1000 * statistics.median(times), 1),
            "p99_ms": round(1000 * _percentile(times, 0.99), 1), "repeats": repeats}


def _cosigned_latency(setup: Setup, client: Client, repeats: int) -> dict:
    """Answer -> entry in a checkpoint both witnesses cosigned, for fresh ss claims."""
    waits, sizes = [], []
    view = client.log_view()
    for i in range(repeats):
        row = setup.claims.iloc[(3 * repeats + i) % len(setup.claims)]
        client.check_one(national_id=row.national_id, hospital_id=row.hospital_id,
                         visit_date=row.visit_date, claimed_fen=int(row.claimed_fen),
                         diagnosis_code=row.diagnosis_code, claim_id=row.claim_id,
                         consent=setup.consents[row.national_id], mode="ss",
                         request_id=f"bench-cosigned-{i}")
        answered = time.perf_counter()
        if not view.confirm(timeout_s=30):
            raise RuntimeError("the witnesses cosigned no checkpoint with the entry in 30 s")
        waits.append(time.perf_counter() - answered)
        sizes.append(client.last_receipt_bytes)
    return {"answer_to_cosigned_ms_p50": round(1000 * statistics.median(waits), 1),
            "answer_to_cosigned_ms_p99": round(1000 * _percentile(waits, 0.99), 1),
            "goal_ms": 1000, "receipt_json_bytes_max": max(sizes), "repeats": repeats}


def _batch(setup: Setup, mode: str, n: int, repeats: int) -> dict:
    claims = setup.claims
    if len(claims) < n:  # more claims than generated: the same claims again under new ids
        claims = pd.concat([claims] * -(-n // len(claims)), ignore_index=True)
        claims["claim_id"] = [f"B{i:07d}" for i in range(len(claims))]
    runs, rids, result = [], set(), None
    for r in range(repeats):
        # Each repeat in another order: the same batch in the same order is the same question,
        # which the regulator answers from its book without computing.
        batch = claims.head(n)
        batch = pd.concat([batch.iloc[r:], batch.iloc[:r]], ignore_index=True)
        with _client(setup, batch_size=n) as client:
            rid = f"bench-batch-{mode}-{n}-{r}"
            if mode == "he":
                client.he_public()  # key generation and context upload: once per insurer key
            started = time.perf_counter()
            result = client.check(batch, setup.consents, mode, request_id=rid)
            result = result.sort_values("claim_id", ignore_index=True)
            runs.append(time.perf_counter() - started)
            # the nodes know a request by its log id; a batch split in parts is `rid-0000`...
            rids |= {client.log_id(r) for r in [rid, *(f"{rid}-{i:04d}" for i in range(n))]}
            insurer_bytes = client.bytes_sent + client.bytes_received
    seconds = statistics.median(runs)
    return {"seconds_all": [round(s, 3) for s in runs], "seconds": round(seconds, 3),
            "claims_per_s": round(n / seconds, 1),
            "distinct_claimants": int(batch["national_id"].nunique()),
            "insurer_bytes": insurer_bytes,
            "node_bytes": {k: v // repeats for k, v in _node_bytes(setup, rids).items()},
            "verdicts": result}


def run(quick: bool = False) -> dict:
    root = Path(tempfile.mkdtemp(prefix="cogov-bench-claims-"))
    patients, claims = (800, 2400) if quick else (3000, 22000)
    try:
        setup = _setup(root, patients, claims)
    except BaseException:
        if (root / "topology.toml").exists():
            supervisor.down(StateDir(root / "state"), load_topology(root / "topology.toml"))
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        repeats_single = 20 if quick else 50
        repeats_batch = 2 if quick else 3
        sizes = (1000,) if quick else (1000, 10_000)
        single: dict = {}
        with _client(setup) as client:
            client.he_public()
            for mode in MODES:
                single[mode] = {"cold": _single(setup, client, mode, repeats_single, True),
                                "warm": _single(setup, client, mode, repeats_single, False)}
            receipts = _cosigned_latency(setup, client, repeats_single)
        batches: dict = {}
        for n in sizes:
            batches[str(n)] = {}
            for mode in MODES:
                batches[str(n)][mode] = _batch(setup, mode, n, repeats_batch)
            reference = batches[str(n)]["plain"].pop("verdicts")
            for mode in ("he", "ss"):
                got = batches[str(n)][mode].pop("verdicts")
                batches[str(n)][mode]["agrees_with_plain"] = bool(got.equals(reference))
            batches[str(n)]["plain"]["agrees_with_plain"] = True
        for mode in ("he", "ss"):
            for kind in ("cold", "warm"):
                single[mode][kind]["ratio_to_plain"] = round(
                    single[mode][kind]["p50_ms"] / single["plain"][kind]["p50_ms"], 1)
            for n in sizes:
                b = batches[str(n)][mode]
                b["slowdown_vs_plain"] = round(b["seconds"] / batches[str(n)]["plain"]["seconds"],
                                               1)
                b["bytes_vs_plain"] = round(
                    b["insurer_bytes"] / batches[str(n)]["plain"]["insurer_bytes"], 1)
        per_consent = setup.seconds["issue_consents"] / max(1, len(setup.consents))
        result = {
            "k": DEFAULT_K,
            "cores": os.cpu_count(),
            "load_average": round(os.getloadavg()[0], 1),
            "data": {"patients": patients, "claims_of_insurer": len(setup.claims),
                     "claimants": len(setup.consents)},
            "setup_seconds": {k: round(v, 1) for k, v in setup.seconds.items()},
            "consent_intake_ms_per_consent": round(1000 * per_consent, 1),
            "single_claim": single,
            "receipts": receipts,
            "batches": batches,
            "goals": {
                "single_p50_ms_le_100": {m: single[m]["cold"]["p50_ms"] <= 100
                                         for m in ("ss", "he")},
                "answer_to_cosigned_p50_le_1s": receipts["answer_to_cosigned_ms_p50"] <= 1000,
                "batch_ge_1000_per_s": {f"{n}/{m}": batches[str(n)][m]["claims_per_s"] >= 1000
                                        for n in sizes for m in MODES},
            },
        }
    finally:
        supervisor.down(setup.state, load_topology(setup.topology_path), grace=5.0)
        shutil.rmtree(root, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "claim_nodes.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "claim_nodes.md").write_text(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    lines = [
        "# Claim check through the nodes",
        "",
        f"K = {r['k']}; {r['cores']} cores (shared, load {r['load_average']}); "
        f"{r['data']['claims_of_insurer']:,} claims of {r['data']['claimants']:,} claimants. "
        f"Consent issue (Ed25519, no id commitment): {r['consent_intake_ms_per_consent']} ms per "
        "consent, once.",
        "",
        "| mode | single cold p50 ms | cold p99 | warm p50 ms | warm p99 | vs plain (cold) |",
        "|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        s = r["single_claim"][mode]
        lines.append(f"| {mode} | {s['cold']['p50_ms']} | {s['cold']['p99_ms']} | "
                     f"{s['warm']['p50_ms']} | {s['warm']['p99_ms']} | "
                     f"{s['cold'].get('ratio_to_plain', 1.0)} |")
    rc = r["receipts"]
    lines += ["", f"Receipts (in every single-claim time above): the entry is in a checkpoint "
              f"both witnesses cosigned {rc['answer_to_cosigned_ms_p50']} ms after the answer "
              f"(p50; p99 {rc['answer_to_cosigned_ms_p99']} ms; goal <= 1,000 ms); a receipt "
              f"is at most {rc['receipt_json_bytes_max']} B of JSON."]
    lines += ["", "| batch | mode | seconds | claims/s | claimants | insurer bytes | "
              "regulator-operator bytes | MPC bytes (reg / dealer) | agrees |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n, modes in r["batches"].items():
        for mode, b in modes.items():
            nb = b["node_bytes"]
            lines.append(f"| {n} | {mode} | {b['seconds']} | {b['claims_per_s']} | "
                         f"{b['distinct_claimants']} | {b['insurer_bytes']:,} | "
                         f"{nb['regulator_operator']:,} | {nb['mpc_operator_regulator']:,} / "
                         f"{nb['mpc_operator_dealer']:,} | {b['agrees_with_plain']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
