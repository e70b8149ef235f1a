"""Three real OS processes on loopback: operator (leader), regulator (follower), dealer.

For tests, benchmarks and single-host demos: each party is a spawned process with its
own CrypTen globals, its own share table and its own TLS identity, talking over the
mTLS channel exactly as separate nodes would. The parent only hands each computing
party its input shares and collects its result shares, as the node layer would.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import time
from dataclasses import dataclass

import numpy as np
import torch

from mpc.certificates import make_pki, tls_contexts
from mpc.claim import ss_shares
from mpc.claim.candidates import CandidateSlots, gather_rows

OPERATOR, REGULATOR, DEALER = "operator", "regulator", "health-authority"
PARTIES = [OPERATOR, REGULATOR]


def _bind_and_learn_addresses(name: str, inbox, outbox) -> tuple[socket.socket, dict]:
    """Bind an ephemeral loopback port, report it, and wait for everyone's addresses."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    outbox.put(("port", name, listener.getsockname()[1]))
    kind, addresses = inbox.get(timeout=120)
    assert kind == "addresses"
    return listener, {k: tuple(v) for k, v in addresses.items()}


def _audit(session) -> dict:
    import torch.distributed as dist

    return {
        "tls": session.channel.connection_info(),
        "transports": {p: type(t).__name__ for p, t in session.channel.transports().items()},
        "torch_distributed_initialized": dist.is_available() and dist.is_initialized(),
        "communicator": type(session.communicator).__name__,
        "stats": session.stats(),
        # tensor messages this party has sent its peer (one per opening or exchange)
        "comm_rounds": session.communicator.comm_rounds,
    }


def _leader_main(material, row_shares, inbox, outbox) -> None:
    from mpc.ss.session import SsSession

    torch.set_num_threads(1)
    listener, addresses = _bind_and_learn_addresses(OPERATOR, inbox, outbox)
    server, client = tls_contexts(material)
    session = SsSession.open(OPERATOR, addresses, PARTIES, DEALER, server, client,
                             listener=listener)
    outbox.put(("ready", OPERATOR, None))
    try:
        while True:
            msg = inbox.get()
            if msg[0] == "close":
                break
            if msg[0] == "audit":
                outbox.put(("audit", OPERATOR, _audit(session)))
                continue
            _, batch_id, claim_blob, row_index, valid = msg
            start = time.perf_counter()
            try:
                claims = ss_shares.unpack(claim_blob, ss_shares.KIND_CLAIMS)
                slots = CandidateSlots(row_index, valid)
                rows = gather_rows(row_shares, slots)
                result = session.evaluate(batch_id, torch.from_numpy(claims),
                                          torch.from_numpy(rows), valid, row_index)
                blob = ss_shares.pack(ss_shares.KIND_RESULT, result.numpy())
                outbox.put(("result", OPERATOR, (batch_id, blob, time.perf_counter() - start)))
            except Exception as exc:  # report, keep the session for the next batch
                outbox.put(("error", OPERATOR, (batch_id, type(exc).__name__, str(exc))))
    finally:
        outbox.put(("closed", OPERATOR, session.stats()))
        session.close()


def _follower_main(material, row_shares, inbox, outbox) -> None:
    from mpc.ss.session import SsSession

    torch.set_num_threads(1)
    listener, addresses = _bind_and_learn_addresses(REGULATOR, inbox, outbox)
    server, client = tls_contexts(material)
    session = SsSession.open(REGULATOR, addresses, PARTIES, DEALER, server, client,
                             listener=listener)
    outbox.put(("ready", REGULATOR, None))
    pending: dict[str, bytes] = {}

    def inputs_for(request):
        while request.batch_id not in pending:
            _, batch_id, blob = inbox.get(timeout=60)
            pending[batch_id] = blob
        blob = pending.pop(request.batch_id)
        claims = ss_shares.unpack(blob, ss_shares.KIND_CLAIMS, (request.n_claims, 3))
        rows = gather_rows(row_shares, CandidateSlots(request.row_index, None))
        return torch.from_numpy(claims), torch.from_numpy(rows)

    def on_result(request, result):
        blob = None if result is None else ss_shares.pack(ss_shares.KIND_RESULT, result.numpy())
        outbox.put(("result", REGULATOR, (request.batch_id, blob, _audit(session))))

    try:
        session.serve_forever(inputs_for, on_result)
    finally:
        outbox.put(("closed", REGULATOR, session.stats()))
        session.close()


def _dealer_main(material, inbox, outbox) -> None:
    from mpc.ss.session import DealerSession

    torch.set_num_threads(1)
    listener, addresses = _bind_and_learn_addresses(DEALER, inbox, outbox)
    server, client = tls_contexts(material)
    dealer = DealerSession.open(DEALER, addresses, PARTIES, server, client,
                                listener=listener)
    outbox.put(("ready", DEALER, None))
    try:
        served = dealer.serve_forever()
    finally:
        dealer.close()
    outbox.put(("closed", DEALER, {"served": served, "channel": dealer.channel.stats()}))


@dataclass
class BatchResult:
    operator_blob: bytes
    regulator_blob: bytes
    seconds: float  # as seen by the caller, queue hops included
    operator_seconds: float  # inside the operator process: the engine alone
    regulator_audit: dict


class LoopbackCluster:
    """Start with the health authority's two row-share tables; evaluate many batches."""

    def __init__(self, row_shares: tuple[np.ndarray, np.ndarray], timeout: float = 120.0):
        self.timeout = timeout
        ctx = mp.get_context("spawn")
        pki = make_pki([OPERATOR, REGULATOR, DEALER])
        self.outbox = ctx.Queue()
        self.leader_in = ctx.Queue()
        self.follower_in = ctx.Queue()
        dealer_in = ctx.Queue()
        self.procs = [
            ctx.Process(target=_leader_main, name=OPERATOR, daemon=True,
                        args=(pki[OPERATOR], row_shares[0], self.leader_in, self.outbox)),
            ctx.Process(target=_follower_main, name=REGULATOR, daemon=True,
                        args=(pki[REGULATOR], row_shares[1], self.follower_in, self.outbox)),
            ctx.Process(target=_dealer_main, name=DEALER, daemon=True,
                        args=(pki[DEALER], dealer_in, self.outbox)),
        ]
        self._stash: list = []
        for p in self.procs:
            p.start()
        ports = {}
        for _ in range(3):
            _, name, port = self._expect("port")
            ports[name] = ("127.0.0.1", port)
        for inbox in (self.leader_in, self.follower_in, dealer_in):
            inbox.put(("addresses", ports))
        ready = {self._expect("ready")[1] for _ in range(3)}
        assert ready == {OPERATOR, REGULATOR, DEALER}

    def _expect(self, kind: str, who: str | None = None):
        deadline = time.monotonic() + self.timeout
        while True:
            for i, msg in enumerate(self._stash):
                if msg[0] in (kind, "error") and (who is None or msg[1] == who):
                    return self._stash.pop(i)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {kind} message from {who or 'any party'}")
            try:
                self._stash.append(self.outbox.get(timeout=0.5))
            except queue.Empty:
                dead = [p.name for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"party processes died: {dead}") from None

    def evaluate(self, batch_id: str, claim_blobs: tuple[bytes, bytes],
                 slots: CandidateSlots) -> BatchResult:
        start = time.perf_counter()
        self.follower_in.put(("claims", batch_id, claim_blobs[1]))
        self.leader_in.put(("eval", batch_id, claim_blobs[0], slots.row_index, slots.valid))
        op = self._expect("result", OPERATOR)
        if op[0] == "error":
            reg = self._expect("result", REGULATOR)
            raise RuntimeError(f"operator failed: {op[2]}; regulator: {reg[2][0:2]}")
        reg = self._expect("result", REGULATOR)
        return BatchResult(op[2][1], reg[2][1], time.perf_counter() - start, op[2][2],
                           reg[2][2])

    def audit_operator(self) -> dict:
        self.leader_in.put(("audit",))
        return self._expect("audit", OPERATOR)[2]

    def close(self) -> dict:
        """Stop all three processes; returns each party's final stats."""
        self.leader_in.put(("close",))
        stats = {}
        try:
            for _ in range(3):
                msg = self._expect("closed")
                stats[msg[1]] = msg[2]
        finally:
            for p in self.procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
        return stats
