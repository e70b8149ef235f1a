"""The computing side of the claim check: operator, regulator (follower) and dealer.

The operator holds the anonymized visits (`circ_visits`, opened with its keyring) and
each insurer's domain tokens (`domain_tokens`). Per domain it builds a *domain table*:
the rows in a fixed order, the candidate index keyed by (domain token, hospital),
the person behind each token and that person's consumer key as the health authority
delivered it (`circ_persons`). The table is rebuilt when a new publication is
registered.

Where the record shares come from (`ss`): on the first `ss` query of a domain table
the operator splits the three needed fields of every row (`share_visit_rows`) and
pushes the regulator's share table, keyed by a fresh table id, over mTLS (kind
`mpc`); the regulator keeps it in memory only, never sees a plaintext record, and
gets a new table (fresh randomness) whenever the operator rebuilds or restarts.

Secret-sharing sessions are long-lived, one per node process, kept up by a
background thread on each of the three nodes: the operator leads (rank 0), the
regulator follows (rank 1), the health authority deals CrypTen's correlated
randomness; all three talk over their `mpc_port` with the nodes' own federation
certificates (TLS 1.3, mutual). When a peer goes away the session is torn down and
re-opened; a query arriving meanwhile waits for it, then fails with
`ComputeUnavailable` (nothing billed).

What each computing node learns: the operator sees which anonymous rows each claim
is checked against (its K candidate slots, padded with dummies) and the hospital,
never a claim value; the regulator sees the row numbers of the slots (announced by
the leader), its random shares, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nacl.public
import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from governance.consent import Consent, ConsentMismatch
from mpc.errors import MalformedInput, MpcError
from parties.claims.service import (
    ANSWER_PURPOSE,
    ENVELOPE_PURPOSE,
    SCENARIO,
    ComputeHead,
    ComputeResult,
    ComputeUnavailable,
    HeContextRegistered,
    UnknownToken,
    frame,
    node_client,
    unframe,
)
from parties.runtime.access import Caller, CallerPolicy
from parties.runtime.batches import read_limited_body
from parties.runtime.context import NodeContext
from parties.runtime.errors import RemoteError
from parties.runtime.node_log import current_request_id
from parties.runtime.sealing import open_sealed, seal, sealing_private_key
from parties.runtime.service import Service
from parties.runtime.tls import client_context, server_context
from parties.runtime.topology import Role

MAX_BODY = 512 * 1024 * 1024
SESSION_OPEN_TIMEOUT_S = 15.0
SESSION_WAIT_S = 45.0  # how long a query waits for a (re)opening session
FOLLOWER_RESULT_WAIT_S = 60.0
SHARE_TABLE_PATH = "/v1/claims/share-tables"
DOMAIN_HEADER = "X-Cogov-Domain"


class UnknownShareTable(MpcError):
    """The follower holds no share table with this id (it restarted, or the table is new)."""

    http_status = 409


class UnknownHeContext(MpcError):
    """No public context with this digest was registered for this insurer."""

    http_status = 404


# --- the operator's domain tables ---------------------------------------------------------


@dataclass
class DomainTable:
    """One insurer domain's rows as the engines need them."""

    domain_id: str
    version: tuple
    rows: np.ndarray  # int64 [n, 3]: admission day, self-pay fen, category
    index: Any  # mpc.claim.CandidateIndex over (token, hospital)
    person_of_token: dict[bytes, bytes]
    key_of_person: dict[bytes, bytes]
    table_id: str = field(default_factory=lambda: secrets.token_hex(8))
    _shares: tuple[np.ndarray, np.ndarray] | None = None

    def shares(self) -> tuple[np.ndarray, np.ndarray]:
        """(operator share, regulator share), split once per table."""
        if self._shares is None:
            from mpc.claim import ss_shares

            self._shares = ss_shares.split(self.rows)
        return self._shares


def _version(ctx: NodeContext, domain_id: str) -> tuple:
    with ctx.store.lock:
        return (domain_id, *ctx.store.conn.execute(
            "SELECT (SELECT COALESCE(MAX(rowid), 0) FROM circ_visits),"
            " (SELECT COUNT(*) FROM circ_registrations),"
            " (SELECT COALESCE(MAX(registered_at), '') FROM circ_registrations),"
            " (SELECT COALESCE(MAX(rowid), 0) FROM circ_persons),"
            " (SELECT token_epoch FROM domains WHERE domain_id = ?)", (domain_id,)).fetchone())


def _build_table(ctx: NodeContext, domain_id: str, version: tuple) -> DomainTable:
    import pandas as pd

    from mpc.claim import CandidateIndex, encode_visit_rows
    from parties.services.circulation import read_visits

    with ctx.store.lock:
        tokens = ctx.store.conn.execute(
            "SELECT visit_ref, token FROM domain_tokens WHERE domain_id = ?", (domain_id,)
        ).fetchall()
        persons = ctx.store.conn.execute("SELECT p1, public_key FROM circ_persons").fetchall()
    visits = read_visits(ctx)
    token_of = {bytes(r): bytes(t) for r, t in tokens}
    if len(visits):
        # (pandas' isin mishandles bytes with NULs: test membership in Python)
        visits = visits[[bytes(r) in token_of for r in visits["visit_ref"]]]
        needed = ["admission_date", "self_pay_fen", "diagnosis_code", "hospital_id"]
        complete = visits[needed].notna().all(axis=1)
        if not complete.all():
            ctx.log.event("claim_rows_incomplete", domain=domain_id,
                          rows=int((~complete).sum()))
        visits = visits[complete].sort_values(
            "visit_ref", key=lambda s: s.map(bytes.hex)).reset_index(drop=True)
    else:
        visits = pd.DataFrame(columns=["visit_ref", "p1", "hospital_id", "admission_date",
                                       "self_pay_fen", "diagnosis_code"])
    row_tokens = [token_of[bytes(r)] for r in visits["visit_ref"]]
    rows = encode_visit_rows(visits) if len(visits) else np.zeros((0, 3), dtype=np.int64)
    keys = list(zip(row_tokens, visits["hospital_id"].astype(str), strict=True))
    person_of_token = {t: bytes(p) for t, p in zip(row_tokens, visits["p1"], strict=True)}
    key_of_person = {bytes(p): bytes(k) for p, k in persons}
    # Persons with a delivered key but no visit held still get an answer (nothing found):
    # their domain token is computed here, once per table, with the domain's key.
    without_visits = sorted(set(key_of_person) - set(person_of_token.values()))
    if without_visits:
        from mpc import xid

        key = ctx.secrets.xid_key(f"domain:{domain_id}")  # operator_domains' key name
        person_of_token.update(zip(xid.rekey(key, without_visits), without_visits, strict=True))
    table = DomainTable(
        domain_id=domain_id, version=version, rows=rows, index=CandidateIndex(keys),
        person_of_token=person_of_token, key_of_person=key_of_person,
    )
    ctx.log.event("claim_table_built", domain=domain_id, rows=len(rows), table=table.table_id)
    return table


class DomainTables:
    """The operator's current table per insurer, rebuilt when its version changes."""

    def __init__(self) -> None:
        self.by_insurer: dict[str, DomainTable] = {}
        self.lock = threading.Lock()


def domain_table(ctx: NodeContext, insurer: str) -> DomainTable:
    """The current table of `insurer`'s claim-check domain (rebuilt after a new publication)."""
    from parties.services.operator_domains import live_domain

    domain_id = live_domain(ctx, SCENARIO, insurer)
    cache = ctx.component(DomainTables, DomainTables)
    tables = cache.by_insurer
    version = _version(ctx, domain_id)
    with cache.lock:
        table = tables.get(insurer)
        if table is None or table.version != version:
            table = tables[insurer] = _build_table(ctx, domain_id, version)
        return table


# --- the operator's HE contexts ---------------------------------------------------------------

class HeContexts:
    """Insurers' registered HE public contexts, parsed once, by (insurer, digest)."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, str], Any] = {}


HE_COMPONENT = "claims_he_contexts"
HE_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE claim_he_contexts (
        insurer TEXT NOT NULL, digest TEXT NOT NULL, context BLOB NOT NULL,
        registered_at TEXT NOT NULL DEFAULT (datetime('now')),
        PRIMARY KEY (insurer, digest)
    )
    """,
)


def store_he_context(ctx: NodeContext, insurer: str, data: bytes) -> str:
    from mpc.he import HePublicContext

    public = HePublicContext.from_bytes(data)  # refuses secret keys and other parameters
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute("INSERT OR IGNORE INTO claim_he_contexts (insurer, digest, context)"
                     " VALUES (?, ?, ?)", (insurer, public.digest, data))
    ctx.component(HeContexts, HeContexts).by_key[(insurer, public.digest)] = public
    ctx.log.event("he_context_registered", insurer=insurer, digest=public.digest)
    return public.digest


def he_context(ctx: NodeContext, insurer: str, digest: str):
    from mpc.he import HePublicContext

    cache = ctx.component(HeContexts, HeContexts).by_key
    found = cache.get((insurer, digest))
    if found is None:
        with ctx.store.lock:
            row = ctx.store.conn.execute(
                "SELECT context FROM claim_he_contexts WHERE insurer = ? AND digest = ?",
                (insurer, digest)).fetchone()
        if row is None:
            raise UnknownHeContext(f"{insurer} registered no HE context {digest[:12]}")
        found = cache[(insurer, digest)] = HePublicContext.from_bytes(bytes(row[0]))
    return found


# --- the operator's evaluation -------------------------------------------------------------


def _sealing_key(ctx: NodeContext) -> nacl.public.PrivateKey:
    return ctx.component(nacl.public.PrivateKey, lambda: sealing_private_key(ctx.signing_key))


def _check_consents(ctx: NodeContext, head: ComputeHead, table: DomainTable,
                    tokens: list[bytes]) -> None:
    """Each claim's consent is signed by the key delivered for the person behind its token."""
    consents: dict[str, Consent] = {}
    for document in head.consents:
        consent = Consent.parse(document)
        if not consent.signature_valid():
            raise ConsentMismatch(f"consent {consent.consent_id}: bad signature")
        if consent.terms.insurer != head.insurer:
            raise ConsentMismatch(f"consent {consent.consent_id} is not given to {head.insurer}")
        consents[consent.consent_id] = consent
    for i, (token, consent_id) in enumerate(zip(tokens, head.consent_of_claim, strict=True)):
        person = table.person_of_token.get(token)
        if person is None:
            raise UnknownToken(f"claim {i}: the token is not one of {head.insurer}'s domain")
        consent = consents.get(consent_id)
        if consent is None:
            raise ConsentMismatch(f"claim {i}: consent {consent_id} was not forwarded")
        delivered = table.key_of_person.get(person)
        if delivered is None or delivered.hex() != consent.terms.subject.public_key:
            raise ConsentMismatch(
                f"claim {i}: consent {consent_id} is not signed by the person behind the token")


def compute(ctx: NodeContext, head: ComputeHead, envelope: bytes) -> tuple[ComputeResult, bytes]:
    """Open the insurer's envelope, check consents against the person, evaluate, seal."""
    from mpc.claim import evaluate_he, evaluate_plain

    rid = current_request_id.get()
    t0 = time.perf_counter()
    sealed_head, payload = open_sealed(_sealing_key(ctx), ENVELOPE_PURPOSE, envelope)
    tokens, hospitals = sealed_head.get("tokens"), sealed_head.get("hospitals")
    if (sealed_head.get("request_id") != rid or sealed_head.get("mode") != head.mode
            or sealed_head.get("k") != head.k or not isinstance(tokens, list)
            or not isinstance(hospitals, list) or len(tokens) != head.n_claims
            or len(hospitals) != head.n_claims or len(head.consent_of_claim) != head.n_claims):
        raise MalformedInput("the envelope does not match this request")
    try:
        token_bytes = [bytes.fromhex(t) for t in tokens]
        reply_key = bytes.fromhex(sealed_head["reply_key"])
    except (ValueError, TypeError, KeyError) as exc:
        raise MalformedInput("malformed token or reply key in the envelope") from exc
    if any(len(t) != 32 for t in token_bytes) or len(reply_key) != 32:
        raise MalformedInput("tokens and the reply key are 32-byte values")
    ctx.log.event("claims_compute_started", insurer=head.insurer, mode=head.mode,
                  claims=head.n_claims)
    t1 = time.perf_counter()
    table = domain_table(ctx, head.insurer)
    t2 = time.perf_counter()
    _check_consents(ctx, head, table, token_bytes)
    slots = table.index.plan(list(zip(token_bytes, map(str, hospitals), strict=True)), head.k)
    started = time.perf_counter()
    if head.mode == "plain":
        answer = evaluate_plain(payload, table.rows, slots)
    elif head.mode == "he":
        if head.he_context is None:
            raise MalformedInput("he requests name their public context")
        answer = evaluate_he(he_context(ctx, head.insurer, head.he_context), payload,
                             table.rows, slots)
    else:
        host = leader_host(ctx)
        before = host.traffic()
        answer = host.evaluate(ctx, rid or "", table, payload, slots)
        mpc_bytes = {peer: host.traffic().get(peer, 0) - sent for peer, sent in before.items()}
    compute_ms = round((time.perf_counter() - started) * 1000)
    sealed = seal(reply_key, ANSWER_PURPOSE,
                  {"request_id": rid, "mode": head.mode, "n": head.n_claims}, answer)
    ctx.log.event("claims_computed", insurer=head.insurer, mode=head.mode,
                  claims=head.n_claims, compute_ms=compute_ms, table=table.table_id,
                  envelope_bytes=len(envelope), answer_bytes=len(sealed),
                  ms={"open": round((t1 - t0) * 1000, 1), "table": round((t2 - t1) * 1000, 1),
                      "consents_plan": round((started - t2) * 1000, 1),
                      "seal": round((time.perf_counter() - started) * 1000 - compute_ms, 1)},
                  mpc_bytes=mpc_bytes if head.mode == "ss" else {})
    return ComputeResult(records_touched=head.n_claims * head.k, compute_ms=compute_ms,
                         table_id=table.table_id if head.mode == "ss" else None), sealed


# --- secret-sharing sessions ----------------------------------------------------------------


def _session_nodes(ctx: NodeContext) -> tuple[str, str, str]:
    """(leader, follower, dealer) node names: operator, regulator, health authority."""
    topo = ctx.topology
    return (topo.nodes_with_role(Role.OPERATOR)[0].name,
            topo.nodes_with_role(Role.REGULATOR)[0].name,
            topo.nodes_with_role(Role.HEALTH_AUTHORITY)[0].name)


def _addresses(ctx: NodeContext) -> dict[str, tuple[str, int]]:
    out = {}
    for name in _session_nodes(ctx):
        spec = ctx.topology.node(name)
        if spec.mpc_port is None:
            raise MpcError(f"node {name} has no mpc_port in the topology")
        out[name] = (spec.host, spec.mpc_port)
    return out


class SessionHost(ABC):
    """Keeps this node's secret-sharing session up for the node's life (a background thread).

    Subclasses say how this node's party opens its session and what it does with it.
    """

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.session: Any = None
        self.up = threading.Event()
        self.lock = threading.RLock()
        self.generation = 0
        self.stop = threading.Event()

    @abstractmethod
    def _open(self) -> Any:
        """Open this party's session (blocks until the peers are connected)."""

    @abstractmethod
    def _run(self, session: Any) -> None:
        """Serve the session until it ends."""

    def loop(self) -> None:
        import torch

        torch.set_num_threads(1)
        while not self.stop.is_set():
            try:
                session = self._open()
            except Exception as exc:  # a peer is not there yet: try again
                self.ctx.log.event("mpc_session_waiting", error=type(exc).__name__,
                                   detail=str(exc)[:200])
                time.sleep(0.5)
                continue
            with self.lock:
                self.session = session
                self.generation += 1
                self.up.set()
            self.ctx.log.event("mpc_session_open", generation=self.generation,
                               peers=session.channel.peers)
            try:
                self._run(session)
            except Exception as exc:
                self.ctx.log.event("mpc_session_error", error=type(exc).__name__,
                                   detail=str(exc)[:200])
            finally:
                self.teardown(session)

    def teardown(self, session: Any) -> None:
        with self.lock:
            if self.session is session:
                self.up.clear()
                self.session = None
        try:
            session.close()
        except Exception as exc:
            self.ctx.log.event("mpc_session_close_failed", error=type(exc).__name__)
        self.ctx.log.event("mpc_session_closed", generation=self.generation)

    def wait(self, timeout: float = SESSION_WAIT_S) -> Any:
        if not self.up.wait(timeout):
            raise ComputeUnavailable(
                "the secret-sharing session between operator, regulator and health authority "
                f"is not up (waited {timeout:.0f} s); nothing was billed, retry later")
        with self.lock:
            if self.session is None:
                raise ComputeUnavailable("the secret-sharing session just closed; retry")
            return self.session

    def _contexts(self):
        return server_context(self.ctx.state, self.ctx.name), client_context(
            self.ctx.state, self.ctx.name)


def _peer_gone(session: Any) -> bool:
    return any(t.is_closing() for t in session.channel.transports().values())


class LeaderHost(SessionHost):
    """The operator: rank 0, starts each batch, talks to the dealer."""

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self.pushed: set[str] = set()
        self.broken = threading.Event()

    def _open(self) -> Any:
        from mpc.ss.session import SsSession

        leader, follower, dealer = _session_nodes(self.ctx)
        server, client = self._contexts()
        return SsSession.open(self.ctx.name, _addresses(self.ctx), [leader, follower], dealer,
                              server, client, timeout=SESSION_OPEN_TIMEOUT_S)

    def _run(self, session: Any) -> None:
        self.pushed.clear()  # the follower may be a fresh process: push tables again
        self.broken.clear()
        while not self.stop.is_set():
            if self.broken.wait(0.2) or _peer_gone(session):
                return

    def traffic(self) -> dict[str, int]:
        """Bytes exchanged so far with each session peer (sent + received, frame bytes)."""
        session = self.session
        if session is None:
            return {}
        return {peer: s["sent"] + s["received"] for peer, s in session.channel.stats().items()}

    def evaluate(self, ctx: NodeContext, rid: str, table: DomainTable, payload: bytes,
                 slots: Any) -> bytes:
        from mpc.claim import evaluate_ss_leader
        from mpc.claim.errors import EngineMismatch
        from mpc.ss.channel import ChannelError

        session = self.wait()
        for attempt in range(2):
            if table.table_id not in self.pushed:
                push_share_table(ctx, table)
                self.pushed.add(table.table_id)
            try:
                with self.lock:
                    return evaluate_ss_leader(session, f"{rid}|{table.table_id}", payload,
                                              table.shares()[0], slots)
            except EngineMismatch as exc:
                if "UnknownShareTable" not in str(exc) or attempt:
                    raise
                self.pushed.discard(table.table_id)  # the follower restarted: push again
            except ChannelError as exc:
                self.broken.set()
                raise ComputeUnavailable(f"the secret-sharing session broke: {exc}; nothing "
                                         "was billed, retry with the same request id") from None
        raise ComputeUnavailable("the follower did not take the share table")


def push_share_table(ctx: NodeContext, table: DomainTable) -> None:
    """Hand the regulator its share of the domain's rows (over mTLS, kind mpc)."""
    from mpc.claim import ss_shares

    _, follower, _ = _session_nodes(ctx)
    blob = ss_shares.pack(ss_shares.KIND_ROWS, table.shares()[1])
    try:
        node_client(ctx).request(
            follower, "PUT", f"{SHARE_TABLE_PATH}/{table.table_id}", kind="mpc", content=blob,
            headers={DOMAIN_HEADER: table.domain_id, "Content-Type": "application/octet-stream"})
    except RemoteError as exc:
        raise ComputeUnavailable(f"the regulator did not take the share table: {exc}") from None
    ctx.log.event("share_table_pushed", domain=table.domain_id, table=table.table_id,
                  rows=len(table.rows), bytes=len(blob))


class FollowerHost(SessionHost):
    """The regulator: rank 1; holds its share tables and the claims' shares it was sent."""

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self.tables: dict[str, np.ndarray] = {}
        self.table_of_domain: dict[str, str] = {}
        self.pending: dict[str, bytes] = {}
        self.results: dict[str, bytes] = {}
        self.done: dict[str, threading.Event] = {}
        self.state_lock = threading.Lock()

    def _open(self) -> Any:
        from mpc.ss.session import SsSession

        leader, follower, dealer = _session_nodes(self.ctx)
        server, client = self._contexts()
        return SsSession.open(self.ctx.name, _addresses(self.ctx), [leader, follower], dealer,
                              server, client, timeout=SESSION_OPEN_TIMEOUT_S)

    def _run(self, session: Any) -> None:
        session.serve_forever(self._inputs_for, self._on_result, self.stop)

    def keep_table(self, table_id: str, domain_id: str, blob: bytes) -> int:
        from mpc.claim import ss_shares

        shares = ss_shares.unpack(blob, ss_shares.KIND_ROWS)
        if shares.ndim != 2 or shares.shape[1] != 3:
            raise MalformedInput("a share table is int64 [rows, 3]")
        with self.state_lock:
            old = self.table_of_domain.get(domain_id)
            if old is not None and old != table_id:
                self.tables.pop(old, None)
            self.tables[table_id] = shares
            self.table_of_domain[domain_id] = table_id
        return len(shares)

    def expect(self, rid: str, claim_share: bytes) -> None:
        with self.state_lock:
            self.pending[rid] = claim_share
            self.results.pop(rid, None)
            self.done[rid] = threading.Event()

    def result(self, rid: str, timeout: float = FOLLOWER_RESULT_WAIT_S) -> bytes:
        event = self.done.get(rid)
        if event is None or not event.wait(timeout):
            raise ComputeUnavailable("the regulator's share of the result did not arrive")
        with self.state_lock:
            return self.results[rid]

    def forget(self, rid: str) -> None:
        with self.state_lock:
            self.pending.pop(rid, None)
            self.results.pop(rid, None)
            self.done.pop(rid, None)

    def _inputs_for(self, request: Any):
        from mpc.claim import ss_follower_inputs

        rid, _, table_id = request.batch_id.rpartition("|")
        with self.state_lock:
            payload = self.pending.get(rid)
            shares = self.tables.get(table_id)
        if payload is None:
            raise MalformedInput(f"no claim share was sent for request {rid}")
        if shares is None:
            raise UnknownShareTable(f"no share table {table_id}")
        return ss_follower_inputs(request, payload, shares)

    def _on_result(self, request: Any, result: Any) -> None:
        from mpc.claim import ss_result_payload

        if result is None:  # refused (e.g. table unknown): the leader retries or fails
            return
        rid = request.batch_id.rpartition("|")[0]
        with self.state_lock:
            if rid in self.done:
                self.results[rid] = ss_result_payload(result)
                self.done[rid].set()


class DealerHost(SessionHost):
    """The health authority: deals CrypTen's correlated randomness to the two parties."""

    def _open(self) -> Any:
        from mpc.ss.session import DealerSession

        leader, follower, _ = _session_nodes(self.ctx)
        server, client = self._contexts()
        return DealerSession.open(self.ctx.name, _addresses(self.ctx), [leader, follower],
                                  server, client, timeout=SESSION_OPEN_TIMEOUT_S)

    def _run(self, session: Any) -> None:
        stop = threading.Event()

        def watch() -> None:  # the follower may vanish while the leader stays: start over
            while not stop.wait(0.2):
                if _peer_gone(session):
                    session.close()
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            session.serve_forever(self.stop)
        finally:
            stop.set()


def _host(ctx: NodeContext, cls: type[SessionHost]) -> Any:
    return ctx.component(SessionHost, lambda: cls(ctx))


def leader_host(ctx: NodeContext) -> LeaderHost:
    return _host(ctx, LeaderHost)


def follower_host(ctx: NodeContext) -> FollowerHost:
    return _host(ctx, FollowerHost)


def dealer_host(ctx: NodeContext) -> DealerHost:
    return _host(ctx, DealerHost)


def _background(get: Callable[[NodeContext], SessionHost]) -> Callable[[NodeContext], None]:
    def run(ctx: NodeContext) -> None:
        try:
            _addresses(ctx)
        except (IndexError, MpcError) as exc:  # no such node, or no mpc_port: no ss mode
            ctx.log.event("mpc_session_disabled", reason=str(exc) or type(exc).__name__)
            return
        get(ctx).loop()

    return run


# --- routes ------------------------------------------------------------------------------------


class ShareTableKept(BaseModel):
    table_id: str
    rows: int


def _operator_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter(prefix="/v1/claims", tags=["claim check (computing)"])
    regulator = CallerPolicy("product", (Role.REGULATOR,))

    @router.post("/compute", response_class=Response)
    async def post_compute(request: Request, caller: Caller = Depends(regulator)) -> Response:
        """Evaluate a batch the regulator authorized (binary: ComputeHead + sealed envelope)."""
        body = await read_limited_body(request, MAX_BODY)
        head, envelope = unframe(ComputeHead, body)
        result, answer = await run_in_threadpool(compute, ctx, head, envelope)
        return Response(frame(result, answer), media_type="application/octet-stream")

    @router.post("/he-contexts", response_model=HeContextRegistered)
    async def post_he_context(request: Request,
                              caller: Caller = Depends(regulator)) -> HeContextRegistered:
        """Keep an insurer's public TenSEAL context (relayed by the regulator)."""
        body = await read_limited_body(request, 16 * 1024 * 1024)
        try:
            size = int.from_bytes(body[:4], "big")
            head = json.loads(body[4:4 + size])
            insurer = str(head["insurer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedInput("malformed HE context upload") from exc
        digest = await run_in_threadpool(store_he_context, ctx, insurer, body[4 + size:])
        return HeContextRegistered(digest=digest)

    return [router]


def _follower_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter(prefix="/v1/claims", tags=["claim check (computing)"])

    @router.put("/share-tables/{table_id}", response_model=ShareTableKept)
    async def put_share_table(table_id: str, request: Request,
                              caller: Caller = Depends(CallerPolicy("mpc", (Role.OPERATOR,)))
                              ) -> ShareTableKept | JSONResponse:
        """The regulator's additive share of a domain's rows (random on its own)."""
        if not table_id.isalnum() or len(table_id) > 64:
            raise MalformedInput("bad table id")
        domain = request.headers.get(DOMAIN_HEADER, "")
        body = await read_limited_body(request, MAX_BODY)
        rows = follower_host(ctx).keep_table(table_id, domain, body)
        ctx.log.event("share_table_kept", table=table_id, domain=domain, rows=rows,
                      sha256=hashlib.sha256(body).hexdigest()[:16])
        return ShareTableKept(table_id=table_id, rows=rows)

    return [router]


OPERATOR_COMPUTE_SERVICE = Service(
    name="claims-compute",
    roles=(Role.OPERATOR,),
    routers=_operator_routes,
    components=((HE_COMPONENT, HE_MIGRATIONS),),
    background=_background(leader_host),
)

REGULATOR_FOLLOWER_SERVICE = Service(
    name="claims-follower",
    roles=(Role.REGULATOR,),
    routers=_follower_routes,
    background=_background(follower_host),
)

DEALER_SERVICE = Service(
    name="claims-dealer",
    roles=(Role.HEALTH_AUTHORITY,),
    routers=lambda ctx: [],
    background=_background(dealer_host),
)
