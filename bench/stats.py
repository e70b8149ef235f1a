"""Benchmark of the regulator statistic's server-side work at 10k and 100k claimants.

What one `claimant_self_pay` query costs once the claimants were checked, per step of the
real code, each on a real SQLite file:

* regulator: `ConsentRegistry.in_force` over the insurer's N stored consents (each a
  signed consent document; their subject commitments are random, not scrypt of an id,
  since issuing 100k scrypt commitments is the consumers' apps' work, not the query's);
* the wire: the `OperatorSelfPay` body with N consent ids, encoded and validated;
* operator: `consented_tokens` over N checked claimants, the intersection with the
  visitors' clipped self-pay (N visitors, half of them claimants) and the two discrete
  Laplace draws (`parties.stats.noise`, ε = 1).

Not measured here: reading and decrypting the circulated visits (`read_visits`, shared
with every operator product and measured by `bench.claim_nodes`), TLS and the log append
(one entry). Goal (measured, not asserted): the statistic at 100k claimants in <= 15 s on
2 cores. Run: `python -m bench.stats [--quick]`; writes bench/results/latest/stats.json
and .md.
"""

import json
import os
import secrets
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.consent import (
    CONSENT_DOMAIN,
    Consent,
    ConsentRegistry,
    ConsentTerms,
    DataScope,
    SubjectBinding,
)
from governance.ledger.signing import public_key_hex, sign_document
from mpc.claim.constants import RECORD_COLUMNS, VERDICT_OUTPUTS
from parties.claims.checked_claimants import MIGRATIONS, consented_tokens, record_checked
from parties.stats.api import STATISTIC, STATISTIC_COLUMNS, OperatorSelfPay, SelfPayQuery
from parties.stats.noise import noised

RESULTS = Path(__file__).parent / "results" / "latest"
INSURER = "insurer-a"
MAX_VALUE = 10_000_000


def _consent(key: Ed25519PrivateKey, now: datetime) -> Consent:
    consent_id = f"consent-{secrets.token_hex(16)}"
    terms = ConsentTerms(
        consent_id=consent_id,
        subject=SubjectBinding(id_commitment=secrets.token_hex(32), public_key=public_key_hex(key)),
        insurer=INSURER, purpose="claim_settlement",
        scope=DataScope(columns=RECORD_COLUMNS, outputs=(*VERDICT_OUTPUTS, STATISTIC)),
        not_before=now - timedelta(hours=1), not_after=now + timedelta(days=300),
        nonce=secrets.token_hex(16))
    return Consent(terms=terms, signature=sign_document(key, CONSENT_DOMAIN,
                                                        terms.model_dump(mode="json")))


def _store(path: Path) -> SimpleNamespace:
    return SimpleNamespace(store=SimpleNamespace(conn=_connect(path), lock=threading.Lock()))


def _connect(path: Path) -> sqlite3.Connection:
    # WAL with synchronous=NORMAL: no fsync per commit, as the nodes' stores run
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _setup(root: Path, n: int) -> tuple[ConsentRegistry, SimpleNamespace, list[str], dict]:
    now = datetime.now(UTC)
    registry = ConsentRegistry(_connect(root / "regulator.db"), secrets.token_bytes(32))
    key = Ed25519PrivateKey.generate()
    consents = [_consent(key, now) for _ in range(n)]
    for c in consents:
        registry.store(c, now)
    operator = _store(root / "operator.db")
    operator.store.conn.executescript(MIGRATIONS[0])
    tokens = [secrets.token_bytes(32) for _ in range(n)]
    record_checked(operator, INSURER, "domain-1",
                   zip(tokens, [c.consent_id for c in consents], strict=True))
    # n visitors at the hospital in the window, half of them claimants
    visitors = tokens[: n // 2] + [secrets.token_bytes(32) for _ in range(n - n // 2)]
    values = {t: secrets.randbelow(MAX_VALUE) for t in visitors}
    return registry, operator, [c.consent_id for c in consents], values


def _once(registry: ConsentRegistry, operator: SimpleNamespace, values: dict) -> dict:
    t0 = time.perf_counter()
    in_force = registry.in_force(INSURER, "claim_settlement", datetime.now(UTC),
                                 scenario="claim_check", columns=STATISTIC_COLUMNS,
                                 outputs=[STATISTIC])
    t1 = time.perf_counter()
    body = OperatorSelfPay(insurer=INSURER, contract_id="claim-check-insurer-a-2026",
                           query=SelfPayQuery(hospital="hospital-1", month="2025-04",
                                              through="2026-03"),
                           epsilon_milli=1000, max_value=MAX_VALUE, consents_in_force=in_force)
    body = OperatorSelfPay.model_validate_json(body.model_dump_json())
    t2 = time.perf_counter()
    claimants = consented_tokens(operator, INSURER, "domain-1", body.consents_in_force)
    matched = [v for t, v in values.items() if t in claimants]
    epsilon = body.epsilon_each()
    noised(len(matched), 1, epsilon)
    noised(sum(matched), MAX_VALUE, epsilon)
    t3 = time.perf_counter()
    return {"regulator_consents_s": t1 - t0, "wire_s": t2 - t1, "operator_s": t3 - t2,
            "total_s": t3 - t0, "matched": len(matched)}


def run(quick: bool = False) -> dict:
    sizes = [10_000] if quick else [10_000, 100_000]
    results: dict = {"load_average_before": os.getloadavg()[0], "cores": os.cpu_count(),
                     "sizes": {}}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            registry, operator, _, values = _setup(Path(tmp), n)
            setup_s = time.perf_counter() - started
            runs = [_once(registry, operator, values) for _ in range(3)]
        results["sizes"][str(n)] = {
            "setup_s": round(setup_s, 1),
            **{k: round(statistics.median(r[k] for r in runs), 3)
               for k in ("regulator_consents_s", "wire_s", "operator_s", "total_s")},
            "matched": runs[0]["matched"], "load_average": os.getloadavg()[0]}
    results["goal_100k_s"] = 15
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stats.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "stats.md").write_text(_markdown(results))
    return results


def _markdown(r: dict) -> str:
    lines = ["# The regulator statistic: server-side latency", "",
             f"{r['cores']} cores, load average {r['load_average_before']:.2f} before the run "
             "(shared machine). Median of 3 queries. Goal: <= 15 s at 100k claimants.", "",
             "| claimants | consents in force (regulator) s | wire s | operator s | total s |"
             " load |", "|---|---|---|---|---|---|"]
    for n, s in r["sizes"].items():
        lines.append(f"| {int(n):,} | {s['regulator_consents_s']} | {s['wire_s']} | "
                     f"{s['operator_s']} | {s['total_s']} | {s['load_average']:.2f} |")
    lines += ["", "Not included: reading and decrypting the circulated visits at the operator "
              "(see claim_nodes), TLS, one log append."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
