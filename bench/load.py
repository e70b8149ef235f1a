"""Load test: many concurrent insurer clients against the claim product on loopback.

Real node processes (all eight of the Suzhou topology, mutual TLS on loopback), data
ingested through the circulation chain (the setup of `bench.claim_nodes`). Each client
is its own `parties.claims.client.Client` (its own mTLS connection as insurer-a) in its own
thread, checking one claim per request in `ss` mode with a fresh request id, back to
back, until the deadline; then every client stops by itself.

The peer measured in the same run is the runtime's ping route at the regulator through the
same mTLS stack with the same number of clients: the runtime's floor, so the product's
cost shows as a ratio. Reported per phase: requests, errors (zero expected; each
kind counted), latency p50/p99 and throughput; and the machine's load average before and
after the run. Bounded: `clients` x `seconds`, each request with a client timeout; the run
ends even if a node stalls.

Run: `python -m bench.load [--quick]`; writes bench/results/latest/load.json and .md.
Full: 200 clients, 60 s on the product (20 s on ping); quick: 20 clients, 10 s (5 s).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from parties.claims.api import CHECK
from parties.runtime import supervisor
from parties.runtime.api import PING
from parties.runtime.client import NodeClient
from parties.runtime.state import StateDir
from parties.runtime.topology import load_topology

RESULTS = Path(__file__).parent / "results" / "latest"
MODE = "ss"
REQUEST_TIMEOUT_S = 120.0


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _Phase:
    """Latencies and errors of one phase, shared by its client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.samples: dict[str, str] = {}

    def ok(self, seconds: float) -> None:
        with self.lock:
            self.latencies.append(seconds)

    def failed(self, exc: BaseException) -> None:
        kind = getattr(exc, "error", None) or type(exc).__name__
        with self.lock:
            self.errors[kind] += 1
            self.samples.setdefault(kind, str(exc)[:300])

    def summary(self, clients: int, seconds: float) -> dict:
        n = len(self.latencies)
        return {
            "clients": clients,
            "seconds": round(seconds, 2),
            "requests": n,
            "errors": sum(self.errors.values()),
            "errors_by_kind": dict(self.errors),
            "error_samples": self.samples,
            "p50_ms": _ms(_percentile(self.latencies, 0.50)),
            "p99_ms": _ms(_percentile(self.latencies, 0.99)),
            "max_ms": _ms(max(self.latencies) if self.latencies else None),
            "throughput_per_s": round(n / seconds, 2) if seconds else None,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _drive(clients: int, seconds: float, make, step, close) -> dict:
    """`clients` threads each running `step(handle, i)` in a loop until the deadline."""
    phase = _Phase()
    window: list[float] = []  # [start, deadline], set once every client is connected
    ready = threading.Barrier(clients + 1, action=lambda: window.extend(
        (time.monotonic(), time.monotonic() + seconds)))

    def client_loop(index: int) -> None:
        handle = None
        try:
            handle = make(index)
        except BaseException as exc:
            phase.failed(exc)
        ready.wait()
        i = 0
        while handle is not None and time.monotonic() < window[1]:
            started = time.monotonic()
            try:
                step(handle, index, i)
                phase.ok(time.monotonic() - started)
            except Exception as exc:
                phase.failed(exc)
            i += 1
        if handle is not None:
            close(handle)

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True)
               for k in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    started, deadline = window
    for t in threads:
        t.join(timeout=max(0.0, deadline + REQUEST_TIMEOUT_S + 10 - time.monotonic()))
    elapsed = time.monotonic() - started
    result = phase.summary(clients, elapsed)
    result["stragglers"] = sum(t.is_alive() for t in threads)
    return result


def _ping_phase(setup, clients: int, seconds: float) -> dict:
    topology = load_topology(setup.topology_path)

    def make(_: int) -> NodeClient:
        return NodeClient(setup.state, topology, "insurer-a", timeout=REQUEST_TIMEOUT_S)

    def step(client: NodeClient, k: int, i: int) -> None:
        client.call("regulator", PING)

    return _drive(clients, seconds, make, step, lambda c: c.close())


def _product_phase(setup, clients: int, seconds: float, tokens: dict[str, bytes]) -> dict:
    from bench.claim_nodes import _client

    claims = setup.claims

    def make(_: int):
        client = _client(setup, batch_size=1)
        client._http.close()
        client._http = NodeClient(client.state, client.topology, client.insurer,
                                  timeout=REQUEST_TIMEOUT_S)
        client._tokens.update(tokens)  # tokens are stable for the domain's life
        return client

    def step(client, k: int, i: int) -> None:
        row = claims.iloc[(k * 7919 + i) % len(claims)]
        # `+ i`: a new claim each time. A claim asked before is answered from the regulator's
        # book without computing; the budget is the bench contract's (`bench.claim_nodes`).
        client.check_one(national_id=row.national_id, hospital_id=row.hospital_id,
                         visit_date=row.visit_date, claimed_fen=int(row.claimed_fen) + i,
                         diagnosis_code=row.diagnosis_code, claim_id=row.claim_id,
                         consent=setup.consents[row.national_id], mode=MODE,
                         request_id=f"load-{k}-{i}-{uuid.uuid4().hex[:8]}")

    return _drive(clients, seconds, make, step, lambda c: c.close())


def _billed(setup, prefix: str = "load-") -> dict:
    """`query_answered` entries of the load requests: each answered request billed once."""
    import sqlite3

    conn = sqlite3.connect(f"file:{setup.state.node('operator').db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT request_id, COUNT(*) FROM ledger_entries WHERE kind = 'query_answered'"
            " AND request_id LIKE ? GROUP BY request_id", (prefix + "%",)).fetchall()
    finally:
        conn.close()
    return {"requests_billed": len(rows), "billed_more_than_once": sum(c > 1 for _, c in rows)}


def _tracebacks(setup) -> dict[str, str]:
    """The last traceback each node printed, to explain errors the clients saw."""
    found = {}
    for spec in load_topology(setup.topology_path).nodes:
        text = setup.state.node(spec.name).stdout.read_text(errors="replace")
        at = text.rfind("Traceback (most recent call last)")
        if at >= 0:
            block = text[at:]
            found[spec.name] = block[:block.find("\n\n") if "\n\n" in block else 20000][-3000:]
    return found


def run(quick: bool = False) -> dict:
    from bench.claim_nodes import _client, _setup

    clients = 20 if quick else 200
    product_s = 10.0 if quick else 60.0
    ping_s = 5.0 if quick else 20.0
    load_before = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="cogov-bench-load-"))
    setup = None
    try:
        setup = _setup(root, patients=400 if quick else 2000, claims=100 if quick else 400)
        with _client(setup) as warm:
            warm.tokens(list(setup.claims["national_id"]))  # one OPRF batch, shared
            tokens = dict(warm._tokens)
        ping = _ping_phase(setup, clients, ping_s)
        product = _product_phase(setup, clients, product_s, tokens)
        time.sleep(3.0)  # metering runs after each answer
        product["metering"] = _billed(setup)
        if product["errors"]:
            product["node_tracebacks"] = _tracebacks(setup)
    finally:
        if setup is not None:
            supervisor.down(setup.state, load_topology(setup.topology_path), grace=5.0)
        elif (root / "state").exists() and (root / "topology.toml").exists():
            supervisor.down(StateDir(root / "state"), load_topology(root / "topology.toml"))
        if setup is not None and locals().get("product", {}).get("errors"):
            product["kept_state"] = str(root)  # node logs to explain the errors
        else:
            shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()[0]
    result = {
        "benchmark": "load",
        "quick": quick,
        "target": f"{CHECK.method} {CHECK.path} at the regulator ({MODE} mode, one claim per "
                  "request), all eight nodes on loopback over mutual TLS",
        "peer": f"{PING.method} {PING.path} at the regulator, same clients, same mTLS stack",
        "product": product,
        "ping": ping,
        "ratios": {
            "p50_product_over_ping": _ratio(product["p50_ms"], ping["p50_ms"]),
            "throughput_ping_over_product": _ratio(ping["throughput_per_s"],
                                                   product["throughput_per_s"]),
        },
        "machine_note": f"load average (1 min) {load_before:.2f} before the run, "
                        f"{load_after:.2f} after",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "load.md").write_text(_markdown(result))
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _markdown(r: dict) -> str:
    lines = [
        f"# Load ({'quick' if r['quick'] else 'full'})", "",
        f"Target: {r['target']}. Peer: {r['peer']}.", "",
        "| phase | clients | seconds | requests | errors | p50 ms | p99 ms | req/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("product", "ping"):
        p = r[name]
        lines.append(f"| {name} | {p['clients']} | {p['seconds']} | {p['requests']} | "
                     f"{p['errors']} | {p['p50_ms']} | {p['p99_ms']} | "
                     f"{p['throughput_per_s']} |")
    lines += ["", f"Ratios: {json.dumps(r['ratios'])}",
              f"Metering: {json.dumps(r['product'].get('metering'))}",
              f"Machine: {r['machine_note']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
