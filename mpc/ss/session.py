"""Long-lived secret-sharing sessions: two computing parties and a dealer.

A session is opened once per node process and evaluates batch after batch on the
same mTLS connections; there is no process group and no per-claim setup. Roles:

- the leader (rank 0, the operator) plans each batch's candidate slots and calls
  `SsSession.evaluate(...)`; it is the only party that talks to the dealer;
- the follower (rank 1, the regulator) runs `SsSession.serve_forever(...)` (or
  `serve_one`) on a thread: for each batch the leader announces (batch id, row
  indices) it asks a callback for its input shares, then runs the same circuit;
- the dealer (the health authority) runs `DealerSession.serve_forever()` on a thread.

Each computing party returns its own result shares; only the insurer adds the two.
Every random value of a session comes from an AES-256-CTR stream (`mpc.ss.prng`), never
from torch's MT19937: opening the session, the two parties swap fresh 32-byte seeds
over the channel (each sends its "next" seed to the other, who keeps it as "prev";
"local" stays private; the leader draws "global"), and the dealer sends each party a
32-byte seed of its own. While a session is installed, CrypTen's samplers refuse any
draw that does not name one of those streams.
CrypTen keeps its communicator, generators and provider in module globals, so one
process hosts at most one computing-party session at a time; evaluations are
serialized by a lock. A lost connection ends the session (open a new one).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from mpc.claim.errors import EngineMismatch
from mpc.claim.ss_circuit import verdict_shares
from mpc.crypten_compat import load_crypten, set_strict_rng, setup_crypto_prng
from mpc.errors import MalformedInput, MpcError
from mpc.ss.channel import ChannelError, MtlsChannel
from mpc.ss.communicator import ChannelCommunicator
from mpc.ss.dealer import DealerClient, serve_dealer
from mpc.ss.wire import (
    FRAME_OBJECT,
    FRAME_TENSORS,
    decode_object,
    decode_tensors,
    encode_object,
    encode_tensors,
)

_ACTIVE: list[SsSession] = []
_ACTIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class BatchRequest:
    """What the leader announces to the follower for one evaluation."""

    batch_id: str
    n_claims: int
    k: int
    row_index: np.ndarray  # int64 [n, k]: which stored rows fill the slots


InputsFor = Callable[[BatchRequest], tuple[torch.Tensor, torch.Tensor]]


def _check_inputs(claims: torch.Tensor, rows: torch.Tensor, n: int, k: int) -> None:
    if not (isinstance(claims, torch.Tensor) and isinstance(rows, torch.Tensor)):
        raise MalformedInput("shares must be tensors")
    if claims.dtype != torch.int64 or tuple(claims.shape) != (n, 3):
        raise MalformedInput(f"claim shares must be int64 [{n}, 3], got {tuple(claims.shape)}")
    if rows.dtype != torch.int64 or tuple(rows.shape) != (n, k, 3):
        raise MalformedInput(f"row shares must be int64 [{n}, {k}, 3], got {tuple(rows.shape)}")


class SharedDealerStream(MpcError):
    """The dealer dealt both computing parties from one stream; the session is refused."""

    http_status = 502


class SsSession:
    """A computing party's session: open once, evaluate many batches."""

    def __init__(self, channel: MtlsChannel, parties: list[str], dealer: str,
                 timeout: float = 120.0) -> None:
        if len(parties) != 2:
            raise MalformedInput("the claim check runs between exactly two computing parties")
        self.channel = channel
        self.parties = list(parties)
        self.dealer = dealer
        self.rank = self.parties.index(channel.me)
        self.peer = self.parties[1 - self.rank]
        self.timeout = timeout
        self._lock = threading.Lock()
        self._saved: dict | None = None
        self.batches = 0
        self.dealer_client: DealerClient | None = None

    @classmethod
    def open(
        cls,
        me: str,
        addresses: Mapping[str, tuple[str, int]],
        parties: list[str],
        dealer: str,
        server_context: ssl.SSLContext,
        client_context: ssl.SSLContext,
        timeout: float = 30.0,
        listener: socket.socket | None = None,
    ) -> SsSession:
        """Connect to the other party and the dealer and set CrypTen up on the channel."""
        with _ACTIVE_LOCK:
            if _ACTIVE:
                raise MpcError("this process already hosts a secret-sharing session")
            wanted = {p: addresses[p] for p in [*parties, dealer]}
            channel = MtlsChannel.open(me, wanted, server_context, client_context, timeout,
                                       listener)
            session = cls(channel, parties, dealer)
            try:
                session._install()
            except BaseException:
                session._uninstall()
                channel.close()
                raise
            _ACTIVE.append(session)
            return session

    # -- CrypTen wiring ---------------------------------------------------------------
    def _install(self) -> None:
        crypten = load_crypten()
        comm = crypten.communicator
        TTPClient = crypten.mpc.provider.ttp_provider.TTPClient

        communicator = ChannelCommunicator(self.channel, self.parties, self.dealer,
                                           self.timeout)
        self._saved = {
            "get": comm.get,
            "is_initialized": comm.is_initialized,
            "provider": crypten.cfg.mpc.provider,
            "generators": {key: dict(g) for key, g in crypten.generators.items()},
        }
        comm.get = lambda: communicator
        comm.is_initialized = lambda: True
        crypten.cfg.mpc.provider = "TTP"  # the dealer: never the trusted *first* party
        setup_crypto_prng(communicator)  # 32-byte pairwise/local/global seeds, on the channel
        set_strict_rng(True)
        self.dealer_client = DealerClient(self.channel, self.dealer, self.rank, self.timeout)
        self._refuse_a_shared_dealer_stream()
        TTPClient._TTPClient__instance = self.dealer_client
        self.communicator = communicator

    def _refuse_a_shared_dealer_stream(self) -> None:
        """Each party's dealer stream must be its own: with the regulator's stream the
        operator would replay its triples and unmask every product it opens."""
        assert self.dealer_client is not None
        mine = self.dealer_client.seed_digest
        self.channel.send(self.peer, FRAME_OBJECT, encode_object({"dealer_stream": mine}))
        theirs = decode_object(self.channel.recv(self.peer, FRAME_OBJECT, self.timeout))
        if not isinstance(theirs, dict) or not isinstance(theirs.get("dealer_stream"), str):
            raise EngineMismatch("the other party sent no dealer-stream digest")
        if theirs["dealer_stream"] == mine:
            raise SharedDealerStream("the dealer gave both computing parties the same stream")

    def _uninstall(self) -> None:
        if self._saved is None:
            return
        crypten = load_crypten()
        comm = crypten.communicator
        TTPClient = crypten.mpc.provider.ttp_provider.TTPClient

        comm.get = self._saved["get"]
        comm.is_initialized = self._saved["is_initialized"]
        crypten.cfg.mpc.provider = self._saved["provider"]
        for key, saved in self._saved["generators"].items():
            crypten.generators[key].clear()
            crypten.generators[key].update(saved)
        set_strict_rng(False)
        TTPClient._TTPClient__instance = None
        self._saved = None

    # -- evaluation -------------------------------------------------------------------
    def evaluate(
        self,
        batch_id: str,
        claim_shares: torch.Tensor,
        row_shares: torch.Tensor,
        slot_valid: np.ndarray,
        row_index: np.ndarray,
    ) -> torch.Tensor:
        """Leader: announce the batch, then return this party's [n, 3] result shares."""
        if self.rank != 0:
            raise MpcError("only the leader (rank 0) starts a batch; the follower serves")
        n, k = int(row_index.shape[0]), int(row_index.shape[1])
        _check_inputs(claim_shares, row_shares, n, k)
        if slot_valid.shape != (n, k):
            raise MalformedInput("slot_valid must be [n, k]")
        with self._lock:
            self.channel.send(self.peer, FRAME_OBJECT, encode_object(
                {"type": "batch", "batch": batch_id, "n": n, "k": k}))
            self.channel.send(self.peer, FRAME_TENSORS, encode_tensors(
                [torch.from_numpy(np.ascontiguousarray(row_index, dtype=np.int64))]))
            reply = decode_object(self.channel.recv(self.peer, FRAME_OBJECT, self.timeout))
            if not isinstance(reply, dict) or reply.get("batch") != batch_id:
                raise EngineMismatch(f"follower answered {reply!r} to batch {batch_id}")
            if not reply.get("ok"):
                raise EngineMismatch(f"follower refused batch {batch_id}: {reply.get('detail')}")
            result = verdict_shares(0, claim_shares, row_shares,
                                    torch.from_numpy(np.asarray(slot_valid, dtype=bool)))
            self.batches += 1
            return result

    def serve_one(self, inputs_for: InputsFor) -> tuple[BatchRequest, torch.Tensor | None]:
        """Follower: wait for the next batch, fetch inputs, evaluate; None if refused."""
        if self.rank != 1:
            raise MpcError("only the follower serves batches")
        with self._lock:
            header = decode_object(self.channel.recv(self.peer, FRAME_OBJECT, None))
            (row_index,) = decode_tensors(self.channel.recv(self.peer, FRAME_TENSORS,
                                                            self.timeout))
            if not isinstance(header, dict) or header.get("type") != "batch":
                raise EngineMismatch(f"unexpected message from the leader: {header!r}")
            request = BatchRequest(str(header["batch"]), int(header["n"]), int(header["k"]),
                                   row_index.numpy())
            try:
                if request.row_index.shape != (request.n_claims, request.k):
                    raise MalformedInput("row index does not match the batch shape")
                claims, rows = inputs_for(request)
                _check_inputs(claims, rows, request.n_claims, request.k)
            except Exception as exc:  # any refusal leaves both parties ready for the next
                self.channel.send(self.peer, FRAME_OBJECT, encode_object(
                    {"batch": request.batch_id, "ok": False,
                     "detail": f"{type(exc).__name__}: {exc}"}))
                return request, None
            self.channel.send(self.peer, FRAME_OBJECT, encode_object(
                {"batch": request.batch_id, "ok": True}))
            result = verdict_shares(1, claims, rows, None)
            self.batches += 1
            return request, result

    def serve_forever(
        self,
        inputs_for: InputsFor,
        on_result: Callable[[BatchRequest, torch.Tensor | None], None],
        stop: threading.Event | None = None,
    ) -> None:
        """Follower loop: serve batches until the leader closes the session or `stop`."""
        while stop is None or not stop.is_set():
            try:
                request, result = self.serve_one(inputs_for)
            except ChannelError:
                return
            on_result(request, result)

    def stats(self) -> dict:
        return {
            "batches": self.batches,
            "channel": self.channel.stats(),
            "dealer_requests": self.dealer_client.requests if self.dealer_client else 0,
        }

    def close(self) -> None:
        if self.rank == 0 and self.dealer_client is not None:
            self.dealer_client.terminate()
        self._uninstall()
        self.channel.close()
        with _ACTIVE_LOCK, contextlib.suppress(ValueError):
            _ACTIVE.remove(self)

    def __enter__(self) -> SsSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DealerSession:
    """The dealer's side: connect to both computing parties, then deal until closed."""

    def __init__(self, channel: MtlsChannel, parties: list[str]) -> None:
        self.channel = channel
        self.parties = list(parties)
        self.served = 0

    @classmethod
    def open(
        cls,
        me: str,
        addresses: Mapping[str, tuple[str, int]],
        parties: list[str],
        server_context: ssl.SSLContext,
        client_context: ssl.SSLContext,
        timeout: float = 30.0,
        listener: socket.socket | None = None,
    ) -> DealerSession:
        wanted = {p: addresses[p] for p in [*parties, me]}
        return cls(MtlsChannel.open(me, wanted, server_context, client_context, timeout,
                                    listener), parties)

    def serve_forever(self, stop: threading.Event | None = None) -> int:
        self.served = serve_dealer(self.channel, self.parties, stop)
        return self.served

    def close(self) -> None:
        self.channel.close()
