"""Shared helpers of the reliability and attack tests: logs, stores, raw clients.

Everything here reads real artefacts (node logs, SQLite stores) or opens real
connections; nothing stands in for a component.
"""

import hashlib
import socket
import sqlite3
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from parties.runtime.node_log import NODE_HEADER, read_log
from parties.runtime.state import StateDir
from tests.federation import Federation

T = TypeVar("T")

# Tables that a refused request is expected to touch: the refusal record itself,
# and the log's own tables when a refusal is recorded as a log entry.
REFUSAL_TABLES = frozenset({
    "refusals", "ledger_entries", "ledger_nodes", "ledger_tree_heads", "ledger_cosignatures",
    "witness_heads", "witness_incidents", "sqlite_sequence",
})


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, every: float = 0.1) -> T:
    """Poll `predicate` until it returns something truthy (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


def events(fed: Federation, node: str, event: str | None = None) -> list[dict[str, Any]]:
    """The JSON-lines records of a node's log (optionally of one event)."""
    return [e for e in read_log(fed.state.node(node).log) if event is None or e["event"] == event]


def read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)


def table_counts(db: Path, skip: frozenset[str] = frozenset()) -> dict[str, int]:
    """Row count of every table of a store (read-only, so a running node is undisturbed)."""
    conn = read_only(db)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {n: conn.execute(f'SELECT COUNT(*) FROM "{n}"').fetchone()[0]
                for n in sorted(names) if n not in skip}
    finally:
        conn.close()


def refusal_rows(fed: Federation, node: str) -> list[tuple[str | None, str, str, str | None]]:
    """(request id, route, error, detail) of every refusal a node recorded in its store."""
    conn = read_only(fed.state.node(node).db)
    try:
        return conn.execute(
            "SELECT request_id, route, error, detail FROM refusals ORDER BY id").fetchall()
    finally:
        conn.close()


def ledger_kinds(fed: Federation, operator: str = "operator") -> list[str]:
    """The kinds of the operator's log entries, in log order."""
    conn = read_only(fed.state.node(operator).db)
    try:
        return [r[0] for r in conn.execute(
            "SELECT kind FROM ledger_entries ORDER BY leaf_index")]
    finally:
        conn.close()


def ledger_entries(fed: Federation, operator: str = "operator") -> list[tuple[str, str, bytes]]:
    """(kind, request id, leaf bytes) of every log entry, in log order."""
    conn = read_only(fed.state.node(operator).db)
    try:
        return [(r[0], r[1], bytes(r[2])) for r in conn.execute(
            "SELECT kind, request_id, leaf FROM ledger_entries ORDER BY leaf_index")]
    finally:
        conn.close()


def rows_checksum(rows: list[tuple]) -> str:
    """Order-independent checksum of a multiset of rows."""
    digests = sorted(hashlib.sha256(repr(r).encode()).hexdigest() for r in rows)
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def node_address(fed: Federation, node: str) -> tuple[str, int]:
    spec = fed.topology.node(node)
    return spec.host, spec.port


def tls_context_for(state: StateDir, node: str) -> ssl.SSLContext:
    """A client context carrying `node`'s certificate (hostname checked against the SAN)."""
    from parties.runtime.tls import client_context

    return client_context(state, node)


def raw_request(
    fed: Federation, caller: str, target: str, method: str, path: str, *,
    content: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30,
) -> httpx.Response:
    """An HTTPS request with `caller`'s certificate, bypassing NodeClient's own checks."""
    url = fed.topology.node(target).url + path
    sent = {NODE_HEADER: caller, **(headers or {})}
    with httpx.Client(verify=tls_context_for(fed.state, caller), timeout=timeout) as http:
        return http.request(method, url, content=content, headers=sent)


def open_tls(fed: Federation, caller: str, target: str, timeout: float = 10) -> ssl.SSLSocket:
    """A finished mutual-TLS connection to `target` as `caller`, nothing sent yet."""
    host, port = node_address(fed, target)
    sock = socket.create_connection((host, port), timeout=timeout)
    return tls_context_for(fed.state, caller).wrap_socket(sock, server_hostname=host)


def closed_by_peer(sock: socket.socket, within: float) -> float | None:
    """Seconds until the peer closed `sock` (EOF or reset), or None if it stayed open."""
    started = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - started < within:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (ConnectionError, ssl.SSLError, OSError):
            return time.monotonic() - started
    return None


# --- a federation ready for the claim check ---------------------------------------------

CONTRACTS = Path(__file__).resolve().parents[1] / "scenarios" / "claim_check" / "contracts"
ALL_NODES = ["hospital-1", "hospital-2", "hospital-3", "health-authority", "operator",
             "regulator", "insurer-a", "insurer-b"]


class ClaimWorld:
    """All eight nodes up, generated data ingested, domains made, both insurers' contracts
    signed by every party and in force. Consents are issued on demand with the consumers'
    keys from the generated data, as the consumers' apps would."""

    def __init__(self, root: Path, *, patients: int = 200, claims: int = 24,
                 env: dict[str, str] | None = None) -> None:
        import os

        from scenarios.claim_check.generator import generate

        self.root = root
        self.data = root / "data"
        generate(self.data, patients=patients, claims=claims, seed=23, progress=False)
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            self.fed = Federation(root, nodes=ALL_NODES)
            self.fed.up()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self._load()

    @classmethod
    def attach(cls, fed: Federation, data: Path) -> "ClaimWorld":
        """A world over an already running federation (e.g. nodes in network namespaces)."""
        world = cls.__new__(cls)
        world.root, world.data, world.fed = data.parent, data, fed
        world._load()
        return world

    def _load(self) -> None:
        import json

        import pandas as pd

        self.claims = pd.read_csv(self.data / "claims.csv", dtype={"national_id": str})
        self.policies = pd.read_csv(self.data / "policies.csv", dtype={"national_id": str})
        self.keys = {}  # national id -> the consumer app's master seed (hex)
        for line in (self.data / "consumer_keys.jsonl").read_text().splitlines():
            row = json.loads(line)
            self.keys[row["national_id"]] = row["master_seed"]

    def consent_key(self, national_id: str, insurer: str = "insurer-a"):
        """The person's consent signing key for `insurer`, as their app derives it."""
        from governance.consent import consent_signing_key

        return consent_signing_key(bytes.fromhex(self.keys[national_id]), insurer)

    def cli(self, *args: str) -> str:
        from typer.testing import CliRunner

        from scenarios.cli import app

        result = CliRunner().invoke(app, [*args, "--state", str(self.fed.state.root),
                                          "--topology", str(self.fed.topology_path)])
        assert result.exit_code == 0, result.output
        return result.output

    def ingest(self) -> None:
        self.cli("govern", "ingest", "--data", str(self.data), "--batch-rows", "200")

    def sign_contracts(self, checks_per_consent_per_day: int | None = None) -> None:
        """Every party signs the scenario's contracts; a test that checks one consent many
        times over buys a larger daily check budget."""
        from governance.contracts import SignedContract, load_contract, sign_contract
        from parties.agreements.cli import post_contract
        from parties.runtime.pki import load_signing_key

        for insurer in ("insurer-a", "insurer-b"):
            terms = load_contract(CONTRACTS / f"claim-check-{insurer}.toml")
            if checks_per_consent_per_day is not None:
                terms = terms.model_copy(update={"quota": terms.quota.model_copy(
                    update={"checks_per_consent_per_day": checks_per_consent_per_day})})
            signed = SignedContract(terms=terms)
            for party in signed.terms.parties:
                signed = sign_contract(signed, party, load_signing_key(self.fed.state, party))
            post_contract(self.fed.state, self.fed.topology, signed, "regulator")

    def consent(self, national_id: str, insurer: str = "insurer-a", *,
                key_of: str | None = None):
        """A consent for `insurer` presented for `national_id`, signed with the key of the
        person `key_of` (default: that person's own)."""
        from datetime import UTC, datetime, timedelta

        from governance.consent import issue_consent
        from mpc.claim.constants import RECORD_COLUMNS, VERDICT_OUTPUTS

        key = self.consent_key(key_of or national_id, insurer)
        now = datetime.now(UTC)
        return issue_consent(
            key, insurer=insurer, purpose="claim_settlement",
            columns=RECORD_COLUMNS, outputs=VERDICT_OUTPUTS,
            not_before=now - timedelta(minutes=5), not_after=now + timedelta(days=30))

    def client(self, insurer: str = "insurer-a"):
        from parties.claims.client import Client

        return Client(insurer, state=self.fed.state, topology=self.fed.topology,
                      policies=self.policies, timeout=300)

    def claims_of(self, insurer: str, n: int | None = None):
        frame = self.claims[self.claims["insurer"] == insurer].reset_index(drop=True)
        return frame if n is None else frame.head(n)

    def down(self) -> None:
        self.fed.down()
