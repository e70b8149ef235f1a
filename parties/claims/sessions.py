"""The claim check's secret-sharing sessions: operator (leader), regulator (follower) and
health authority (dealer).

Sessions are long-lived, one per node process, kept up by a background thread on each of
the three nodes: the operator leads (rank 0), the regulator follows (rank 1), the health
authority deals CrypTen's correlated randomness; all three talk over their `mpc_port`
with the nodes' own federation certificates (TLS 1.3, mutual). When a peer goes away the
session is torn down and re-opened; a query arriving meanwhile waits for it, then fails
with `ComputeUnavailable` (nothing billed).

Where the record shares come from: on the first `ss` query of a shared-domain table the
operator splits the three needed fields of every row and pushes the regulator's share
table, keyed by a fresh table id, over mTLS (`api.SHARE_TABLE`, kind `mpc`); the
regulator keeps it in memory only, never sees a plaintext record, and gets a new table
(fresh randomness) whenever the operator rebuilds or restarts. The regulator sees the
row numbers of the slots (announced by the leader), its random shares, and nothing else.

Those row numbers are positions in the table's own secret order (`parties.claims.tables`:
a fresh random permutation per domain and per build, including after every k2[d] and k1
rotation), and the dummies among them are uniform draws from the OS CSPRNG
(`mpc.claim.candidates`). So a visit's row number in insurer-a's share table and batches
is independent of its row number in insurer-b's, and of its row number before a rebuild:
the regulator cannot link the two insurers' claims about one person by row numbers.
"""

import hashlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from mpc.claim import evaluate_ss_leader, ss_follower_inputs, ss_result_payload, ss_shares
from mpc.claim.errors import EngineMismatch
from mpc.errors import MalformedInput, MpcError
from mpc.ss.channel import ChannelError
from parties.claims.api import (
    SHARE_TABLE,
    SHARE_TABLE_DOMAIN_HEADER,
    ComputeUnavailable,
    ShareTableKept,
    UnknownShareTable,
)
from parties.claims.peers import node_client, session_nodes
from parties.claims.tables import SharedDomainTable
from parties.runtime.access import Caller
from parties.runtime.batches import read_limited_body
from parties.runtime.context import NodeContext
from parties.runtime.errors import RemoteError
from parties.runtime.mount import mount
from parties.runtime.service import Service
from parties.runtime.tls import client_context, server_context
from parties.runtime.topology import Role

MAX_SHARE_TABLE_BYTES = 512 * 1024 * 1024
SESSION_OPEN_TIMEOUT_S = 15.0
SESSION_WAIT_S = 45.0  # how long a query waits for a (re)opening session
FOLLOWER_RESULT_WAIT_S = 60.0


def _addresses(ctx: NodeContext) -> dict[str, tuple[str, int]]:
    out = {}
    for name in session_nodes(ctx):
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
        import torch  # loaded by the three computing nodes only, when their session starts

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
        from mpc.ss.session import SsSession  # CrypTen: loaded when a session opens

        leader, follower, dealer = session_nodes(self.ctx)
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

    def evaluate(self, ctx: NodeContext, rid: str, table: SharedDomainTable, payload: bytes,
                 slots: Any) -> bytes:
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


def push_share_table(ctx: NodeContext, table: SharedDomainTable) -> None:
    """Hand the regulator its share of the shared domain's rows (over mTLS, kind mpc)."""
    _, follower, _ = session_nodes(ctx)
    blob = ss_shares.pack(ss_shares.KIND_ROWS, table.shares()[1])
    try:
        node_client(ctx).call(
            follower, SHARE_TABLE, params={"table_id": table.table_id}, content=blob,
            headers={SHARE_TABLE_DOMAIN_HEADER: table.domain_id,
                     "Content-Type": "application/octet-stream"})
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
        from mpc.ss.session import SsSession  # CrypTen: loaded when a session opens

        leader, follower, dealer = session_nodes(self.ctx)
        server, client = self._contexts()
        return SsSession.open(self.ctx.name, _addresses(self.ctx), [leader, follower], dealer,
                              server, client, timeout=SESSION_OPEN_TIMEOUT_S)

    def _run(self, session: Any) -> None:
        session.serve_forever(self._inputs_for, self._on_result, self.stop)

    def keep_table(self, table_id: str, domain_id: str, blob: bytes) -> int:
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
        from mpc.ss.session import DealerSession  # CrypTen: loaded when a session opens

        leader, follower, _ = session_nodes(self.ctx)
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


def session_background(get: Callable[[NodeContext], SessionHost]
                       ) -> Callable[[NodeContext], None]:
    """A service's background work: keep this node's session up (if the topology has one)."""
    def run(ctx: NodeContext) -> None:
        try:
            _addresses(ctx)
        except (IndexError, MpcError) as exc:  # no such node, or no mpc_port: no ss mode
            ctx.log.event("mpc_session_disabled", reason=str(exc) or type(exc).__name__)
            return
        get(ctx).loop()

    return run


# --- the follower's route and the services ---------------------------------------------------


def _follower_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, SHARE_TABLE)
    async def put_share_table(table_id: str, request: Request, caller: Caller) -> ShareTableKept:
        """The regulator's additive share of a shared domain's rows (random on its own)."""
        if not table_id.isalnum() or len(table_id) > 64:
            raise MalformedInput("bad table id")
        domain = request.headers.get(SHARE_TABLE_DOMAIN_HEADER, "")
        body = await read_limited_body(request, MAX_SHARE_TABLE_BYTES)
        rows = follower_host(ctx).keep_table(table_id, domain, body)
        ctx.log.event("share_table_kept", table=table_id, domain=domain, rows=rows,
                      sha256=hashlib.sha256(body).hexdigest()[:16])
        return ShareTableKept(table_id=table_id, rows=rows)

    return [router]


REGULATOR_FOLLOWER_SERVICE = Service(
    name="claims-follower",
    roles=(Role.REGULATOR,),
    routers=_follower_routes,
    background=session_background(follower_host),
)

DEALER_SERVICE = Service(
    name="claims-dealer",
    roles=(Role.HEALTH_AUTHORITY,),
    routers=lambda ctx: [],
    background=session_background(dealer_host),
)
