"""kill -9 nodes at random points during log appends, ingestion and claim batches.

A fixed seed picks the victims and the moments. After every restart
(`parties.runtime.supervisor.start_node`) the tests check that the log verifies; at
the end, that no row was lost or duplicated (counts and digests against the
source), that no query was billed twice (`query_answered` entries per request
id) and that every retried piece of work completed with the right result.

Log appends are idempotent (an entry's signature identifies it), so the appending
client here retries blindly: after a failed append it re-sends the whole batch,
and the test checks nothing was stored twice. It also counts the appends that
were committed although the client saw the crash (the lost-response case).
"""

import contextlib
import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

from governance.ledger import SignedTreeHead, decode_leaf, make_event, sign_event, verify_log
from parties.ingest.api import (
    CIRCULATION_SUMMARY,
    GOVERNANCE_SUMMARY,
    HOSPITAL_EXPORT,
    PUBLISH,
    ExportRequest,
    PublishRequest,
)
from parties.ingest.authority import visits_digest
from parties.ledger.api import APPEND_ENTRIES, EntryBatch
from parties.runtime import supervisor
from parties.runtime.client import NodeClient
from parties.runtime.errors import NodeError
from parties.runtime.pki import federation_signing_keys, load_signing_key
from parties.runtime.routes import Route
from tests.attack_helpers import ClaimWorld, ledger_entries, wait_for
from tests.federation import Federation

pytestmark = pytest.mark.slow

SEED = 20261126
LOG_KILLS = 26
INGEST_KILLS = 12
CLAIM_KILLS = 12


@dataclass
class Crashes:
    """What the injector did: victims in order, and how many kills interrupted work."""

    victims: list[str] = field(default_factory=list)
    interrupted: int = 0


def kill9(fed: Federation, node: str) -> None:
    """SIGKILL the node's whole process group, reap it, leave its PID file behind."""
    pid = supervisor.running_pid(fed.state, node)
    assert pid is not None, f"{node} is not running"
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not supervisor._alive(pid), timeout=10, every=0.02)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def restart(fed: Federation, node: str) -> None:
    supervisor.start_node(fed.state, fed.topology_path, node)
    health = supervisor.wait_healthy(fed.state, fed.topology, [node], timeout=90)
    assert health[node] == "ok", (health, fed.state.node(node).stdout.read_text()[-3000:])


def snapshot(fed: Federation) -> tuple[list[bytes], SignedTreeHead]:
    """The operator's entries and latest head, read in one transaction (a consistent cut)."""
    conn = sqlite3.connect(fed.state.node("operator").db, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN")
        leaves = [bytes(r[0]) for r in conn.execute(
            "SELECT leaf FROM ledger_entries ORDER BY leaf_index")]
        row = conn.execute("SELECT tree_size, log_id, root_hash, timestamp_ms, signature"
                           " FROM ledger_tree_heads ORDER BY tree_size DESC LIMIT 1").fetchone()
        conn.execute("COMMIT")
    finally:
        conn.close()
    head = SignedTreeHead(tree_size=row[0], log_id=row[1], root_hash=bytes(row[2]).hex(),
                          timestamp_ms=row[3], signature=bytes(row[4]).hex())
    return leaves, head


def assert_log_verifies(fed: Federation) -> int:
    leaves, head = snapshot(fed)
    keys = federation_signing_keys(fed.state, [n.name for n in fed.topology.nodes])
    report = verify_log(leaves, head, [], keys)
    assert report.ok, report.summary()
    assert head.tree_size == len(leaves)
    return len(leaves)


# --- log appends ------------------------------------------------------------------------


class Appender(threading.Thread):
    """Appends health-authority entries to the operator's log until stopped; after a failure
    it waits for the log node and re-sends the whole batch."""

    def __init__(self, fed: Federation, operator_up: threading.Event, rng: random.Random):
        super().__init__(daemon=True)
        self.fed, self.operator_up, self.rng = fed, operator_up, rng
        self.key = load_signing_key(fed.state, "health-authority")
        self.stop = threading.Event()
        self.sent: list[str] = []
        self.ambiguous = 0  # appends that failed at the client yet were committed
        self.retried = 0
        self.error: BaseException | None = None

    def _present(self, rids: list[str]) -> set[str]:
        conn = sqlite3.connect(self.fed.state.node("operator").db, timeout=30)
        try:
            marks = ",".join("?" * len(rids))
            return {r[0] for r in conn.execute(
                f"SELECT request_id FROM ledger_entries WHERE request_id IN ({marks})", rids)}
        finally:
            conn.close()

    def _post(self, client: NodeClient, entries: list) -> None:
        client.call("operator", APPEND_ENTRIES, EntryBatch(entries))

    def run(self) -> None:
        try:
            n = 0
            with NodeClient(self.fed.state, self.fed.topology, "health-authority",
                            timeout=30) as client:
                while not self.stop.is_set():
                    batch = []
                    for _ in range(self.rng.randint(1, 5)):
                        rid = f"crash-log-{n:05d}"
                        n += 1
                        batch.append(sign_event(make_event(
                            "data_registered", "health-authority", rid,
                            {"dataset": rid, "rows": n}), self.key))
                    pending = batch
                    while pending:
                        try:
                            self._post(client, pending)
                            pending = []
                        except NodeError:
                            assert self.operator_up.wait(timeout=120), "operator never came back"
                            time.sleep(0.05)
                            here = self._present([e.event.request_id for e in pending])
                            assert len(here) in (0, len(pending)), "a batch was half appended"
                            self.ambiguous += bool(here)
                            self.retried += 1  # blindly: the log drops what it already has
                    self.sent += [e.event.request_id for e in batch]
                    time.sleep(self.rng.uniform(0.005, 0.03))  # a busy node, not a flood
        except BaseException as exc:  # surfaced by the test thread
            self.error = exc


def test_log_appends_survive_kill_9(tmp_path):
    rng = random.Random(SEED)
    fed = Federation(tmp_path, nodes=["health-authority", "operator", "regulator"])
    fed.up()
    crashes = Crashes()
    operator_up = threading.Event()
    operator_up.set()
    appender = Appender(fed, operator_up, random.Random(SEED + 1))
    try:
        appender.start()
        for _ in range(LOG_KILLS):
            time.sleep(rng.uniform(0.05, 0.5))
            victim = rng.choice(["operator", "operator", "operator", "regulator",
                                 "health-authority"])
            if victim == "operator":
                operator_up.clear()
            kill9(fed, victim)
            crashes.victims.append(victim)
            restart(fed, victim)
            operator_up.set()
            assert_log_verifies(fed)
            assert appender.error is None, appender.error
        appender.stop.set()
        appender.join(timeout=120)
        assert appender.error is None, appender.error
        assert not appender.is_alive()
        size = assert_log_verifies(fed)
        stored = Counter(rid for kind, rid, _ in ledger_entries(fed)
                         if rid.startswith("crash-log-"))
        assert sorted(stored) == sorted(appender.sent)  # nothing lost, nothing extra
        assert set(stored.values()) == {1}  # nothing duplicated
        assert size >= len(appender.sent)
        crashes.interrupted = appender.retried + appender.ambiguous
        # Witnesses still countersign the log after the crashes (the CLI asks them first).
        from typer.testing import CliRunner

        from scenarios.cli import app

        verified = CliRunner().invoke(app, ["ledger", "verify", "--state", str(fed.state.root),
                                            "--topology", str(fed.topology_path)])
        assert verified.exit_code == 0, verified.output
        assert "health-authority" in verified.output and "regulator" in verified.output
        print(f"\nlog: {len(crashes.victims)} kills {Counter(crashes.victims)}, "
              f"{len(appender.sent)} entries, {appender.retried} retried, "
              f"{appender.ambiguous} committed before the client saw the crash")
    finally:
        appender.stop.set()
        fed.down()


# --- ingestion and claims ---------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # enough claims that no two of the claim batches below ask the same question (one asked
    # again is answered from the regulator's book, not computed)
    w = ClaimWorld(tmp_path_factory.mktemp("crash"), patients=200, claims=80)
    yield w
    w.down()


def _admin_call(fed: Federation, node: str, route: Route, body: BaseModel) -> BaseModel:
    with NodeClient(fed.state, fed.topology, node, timeout=300) as client:
        return client.call(node, route, body)


def _crash_during(fed: Federation, rng: random.Random, work, victims: list[str],
                  crashes: Crashes, *, max_delay: float) -> None:
    """Run `work()` in a thread, kill -9 one victim at a random moment, restart it, and
    run `work()` again until it succeeds."""
    outcome: dict = {}

    def attempt() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    time.sleep(rng.uniform(0.0, max_delay))
    victim = rng.choice(victims)
    kill9(fed, victim)
    crashes.victims.append(victim)
    restart(fed, victim)
    if fed.topology.node(victim).role.value == "operator":
        fed.admin_login()
    thread.join(timeout=300)
    assert not thread.is_alive(), "work hung after a crash"
    if "error" in outcome:
        crashes.interrupted += 1
        deadline = time.monotonic() + 120
        while True:
            try:
                work()
                return
            except NodeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def test_ingestion_survives_kill_9(world):
    rng = random.Random(SEED + 2)
    fed = world.fed
    crashes = Crashes()
    raw = sorted((world.data / "raw").iterdir())
    kills_per_export = [INGEST_KILLS // 2 // len(raw)] * len(raw)
    for path, kills in zip(raw, kills_per_export, strict=True):
        hospital = path.stem
        for _ in range(kills):
            _crash_during(fed, rng, lambda h=hospital, p=path: _admin_call(
                fed, h, HOSPITAL_EXPORT, ExportRequest(path=str(p), batch_rows=25)),
                [hospital, "health-authority"], crashes, max_delay=1.0)
    while len(crashes.victims) < INGEST_KILLS:
        _crash_during(fed, rng, lambda: _admin_call(
            fed, "health-authority", PUBLISH, PublishRequest(batch_rows=25)),
            ["health-authority", "operator"], crashes, max_delay=1.5)
    assert_log_verifies(fed)

    truth = pq.read_table(world.data / "ground_truth" / "visits.parquet").to_pandas()
    with NodeClient(fed.state, fed.topology, "health-authority") as client:
        governed = client.call("health-authority", GOVERNANCE_SUMMARY)
    for hospital, part in truth.groupby("hospital_id"):
        held = governed.hospitals[hospital]
        assert held.rows == len(part)  # no row lost or duplicated at the authority
        assert held.digest == visits_digest(part)
    publication = _admin_call(fed, "health-authority", PUBLISH, PublishRequest(batch_rows=25))
    assert publication.sent == 0  # everything already arrived
    with NodeClient(fed.state, fed.topology, "operator") as client:
        held = client.call("operator", CIRCULATION_SUMMARY)
    assert held.rows == len(truth)
    assert held.digest == publication.digest
    assert held.by_hospital == truth.groupby("hospital_id").size().to_dict()
    # The CLI's full run on top (consumer keys, domains) adds no visit.
    world.ingest()
    with NodeClient(fed.state, fed.topology, "operator") as client:
        again = client.call("operator", CIRCULATION_SUMMARY)
    assert again.rows == len(truth) and again.digest == held.digest
    print(f"\ningestion: {len(crashes.victims)} kills {Counter(crashes.victims)}, "
          f"{crashes.interrupted} interrupted work")


def test_claim_batches_survive_kill_9(world):
    rng = random.Random(SEED + 3)
    fed = world.fed
    world.sign_contracts(checks_per_consent_per_day=1000)  # retries under kills spend checks
    claims = world.claims_of("insurer-a")
    consents = {nid: world.consent(nid) for nid in claims["national_id"].unique()}
    crashes = Crashes()
    results: dict[str, pd.DataFrame] = {}
    with world.client() as client:
        client.register_consents(consents.values())
        client.tokens(list(claims["national_id"]))  # the OPRF chain is not under test here
        for i in range(CLAIM_KILLS):
            rid = f"crash-claim-{i:03d}"
            batch = claims.iloc[[(2 * i) % len(claims), (2 * i + 1) % len(claims)]]

            def work(rid=rid, batch=batch):
                results[rid] = client.check(batch, consents, "ss", request_id=rid)

            _crash_during(fed, rng, work, ["regulator", "operator", "health-authority"],
                          crashes, max_delay=0.4)
            time.sleep(1.0)  # let a restarted regulator void what it never released
    assert_log_verifies(fed)
    for rid in results:
        assert wait_for(lambda r=rid: _count(fed, r) >= 1, timeout=20), rid
    assert {rid: _count(fed, rid) for rid in results} == dict.fromkeys(results, 1)
    truth = pd.read_csv(world.data / "ground_truth" / "claims_truth.csv", dtype=str)
    truth = truth.set_index("claim_id")
    for verdicts in results.values():
        for row in verdicts.itertuples(index=False):
            for column in ("visit_found", "amount_consistent", "diagnosis_covered"):
                assert str(getattr(row, column)).lower() == truth.at[row.claim_id, column]
    conn = sqlite3.connect(fed.state.node("regulator").db)
    try:
        left = conn.execute("SELECT COUNT(*) FROM claim_requests WHERE status = 'pending'"
                            " OR (status != 'answered' AND usage_id IS NOT NULL)").fetchone()[0]
    finally:
        conn.close()
    assert left == 0  # no reservation of a request that died with a node is held
    print(f"\nclaims: {len(crashes.victims)} kills {Counter(crashes.victims)}, "
          f"{crashes.interrupted} interrupted batches, all {len(results)} completed")


def _count(fed: Federation, rid: str) -> int:
    """Billable meters of the insurer's request `rid`: its `query_answered` entries, less
    those of answers the regulator withheld (voided by a `query_withheld` entry)."""
    log_id = fed.log_id("insurer-a", "regulator", rid)
    entries = [decode_leaf(leaf).entry for kind, r, leaf in ledger_entries(fed)
               if r == log_id and kind in ("query_answered", "query_withheld")]
    voided = {e.event.payload["meter_signature"] for e in entries
              if e.event.kind == "query_withheld"}
    return sum(1 for e in entries if e.event.kind == "query_answered"
               and e.signature not in voided)
