"""The dealer of correlated randomness (CrypTen's trusted third party) on the channel.

CrypTen's `TrustedThirdParty` provider asks `TTPClient.get()` for a generator shared
with the dealer and, at rank 0 only, for the dealer's correction share of each Beaver
triple (`ttp_request`). `DealerClient` is that client on the mTLS channel; `serve_dealer`
is the dealer's loop, reusing CrypTen's own `TTPServer` arithmetic (triples, squares,
binary triples, wraps, B2A bits). The dealer never sees a share of any input: it only
knows the random tuples it deals.

The generator shared with each party is a `mpc.ss.prng.StreamGenerator` (AES-256-CTR):
at the start of a session the dealer draws one 32-byte seed per party
(`secrets.token_bytes`) and sends it as hex (`{"seed": "<64 hex digits>"}`); it is
never a `torch.Generator`, whose MT19937 output the operator could extrapolate from
one opening of a product with its own plaintext input.

Requests are JSON (function name from a fixed list, sizes as integer lists); the
answer is one int64 tensor frame. The dealer serves until rank 0 says `terminate` or
its connection closes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading

import torch

from mpc.crypten_compat import load_crypten
from mpc.errors import MalformedInput
from mpc.ss.channel import ChannelError, MtlsChannel
from mpc.ss.prng import StreamGenerator, check_seed, new_seed, seed_from_hex
from mpc.ss.wire import FRAME_OBJECT, FRAME_TENSORS, decode_tensors, encode_tensors

_FUNCTIONS = {"additive": 3, "square": 1, "binary": 2, "wraps": 1, "B2A": 1}
_OPS = {"mul", "matmul"}
MAX_TUPLE_ELEMENTS = 1 << 26
TTPServer = load_crypten().mpc.provider.ttp_provider.TTPServer


class DealerClient:
    """Stands in for CrypTen's `TTPClient` instance inside a computing party."""

    def __init__(self, channel: MtlsChannel, dealer: str, rank: int, timeout: float = 120.0):
        self.channel = channel
        self.dealer = dealer
        self.rank = rank
        self.timeout = timeout
        message = _recv_json(channel, dealer, timeout)
        if not isinstance(message, dict) or "seed" not in message:
            raise MalformedInput("dealer sent no seed")
        seed = seed_from_hex(message["seed"])
        self.generator = StreamGenerator(seed)
        # What the two parties compare to make sure each got its own stream (a 256-bit
        # seed's hash says nothing of the stream it keys).
        self.seed_digest = hashlib.sha256(b"cogov-dealer-stream|" + seed).hexdigest()
        self.requests = 0

    def get_generator(self, device=None) -> StreamGenerator:
        if device is not None and torch.device(device).type != "cpu":
            raise MalformedInput("the dealer serves CPU tensors only")
        return self.generator

    def ttp_request(self, func_name, device, *args, **kwargs) -> torch.Tensor:
        if self.rank != 0:
            raise ChannelError("only rank 0 talks to the dealer")
        if kwargs:
            raise MalformedInput(f"unsupported dealer keyword arguments {sorted(kwargs)}")
        encoded = [list(a) if isinstance(a, (torch.Size, tuple, list)) else a for a in args]
        self.channel.send(
            self.dealer, FRAME_OBJECT, _json({"fn": func_name, "args": encoded})
        )
        self.requests += 1
        data = self.channel.recv(self.dealer, FRAME_TENSORS, timeout=self.timeout)
        (tensor,) = decode_tensors(data)
        return tensor

    def terminate(self) -> None:
        with contextlib.suppress(ChannelError):
            self.channel.send(self.dealer, FRAME_OBJECT, _json({"fn": "terminate"}))


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _recv_json(channel: MtlsChannel, peer: str, timeout: float | None):
    data = channel.recv(peer, FRAME_OBJECT, timeout=timeout)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise MalformedInput("bad dealer message") from exc


def _size(value) -> torch.Size:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise MalformedInput(f"bad tensor size {value!r}")
    if math.prod(value) > MAX_TUPLE_ELEMENTS:
        raise MalformedInput("requested tuple too large")
    return torch.Size(value)


class _Tuples:
    """CrypTen's TTPServer arithmetic on one stream per party (32-byte seeds, in rank order)."""

    def __init__(self, seeds: list[bytes]) -> None:
        server = object.__new__(TTPServer)
        server.device = "cpu"
        server.generators = [StreamGenerator(check_seed(seed)) for seed in seeds]
        server.generators_cuda = [None] * len(seeds)
        self.server = server

    def answer(self, request) -> torch.Tensor:
        if not isinstance(request, dict) or request.get("fn") not in _FUNCTIONS:
            raise MalformedInput(f"unknown dealer request {request!r}")
        fn, args = request["fn"], request.get("args")
        if not isinstance(args, list) or len(args) != _FUNCTIONS[fn]:
            raise MalformedInput(f"bad arguments for {fn}")
        if fn == "additive":
            if args[2] not in _OPS:
                raise MalformedInput(f"unsupported triple op {args[2]!r}")
            return self.server.additive(_size(args[0]), _size(args[1]), args[2])
        if fn == "binary":
            return self.server.binary(_size(args[0]), _size(args[1]))
        return getattr(self.server, fn)(_size(args[0]))


def serve_dealer(
    channel: MtlsChannel,
    parties: list[str],
    stop: threading.Event | None = None,
) -> int:
    """Deal tuples to the computing `parties` (rank order) until told to stop.

    Returns the number of requests served. Run it on its own thread or process.
    """
    seeds = [new_seed() for _ in parties]
    for party, seed in zip(parties, seeds, strict=True):
        channel.send(party, FRAME_OBJECT, _json({"seed": seed.hex()}))
    tuples = _Tuples(seeds)
    served = 0
    while stop is None or not stop.is_set():
        try:
            request = _recv_json(channel, parties[0], timeout=0.5 if stop else None)
        except ChannelError as exc:
            if "timed out" in str(exc):
                continue
            break  # rank 0 went away: the session is over
        except MalformedInput:
            break
        if isinstance(request, dict) and request.get("fn") == "terminate":
            break
        try:
            result = tuples.answer(request)
        except MalformedInput:
            break  # a confused client gets no more tuples; it will see the channel close
        channel.send(parties[0], FRAME_TENSORS, encode_tensors([result]))
        served += 1
    return served
