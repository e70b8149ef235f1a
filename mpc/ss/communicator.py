"""A CrypTen `Communicator` that runs on the mutual-TLS channel.

CrypTen reaches its communicator only through `crypten.communicator.get()`; the
session points that (and `is_initialized`) at an instance of this class, so every
share CrypTen exchanges travels as a frame on the party's `MtlsChannel`. No
`torch.distributed` process group is ever created.

Ranks: the computing parties are 0..world_size-1 in the session's order; the dealer
(CrypTen's trusted third party) is rank `world_size`, reachable only by the dealer
client (`mpc.ss.dealer`).
"""

from __future__ import annotations

import torch
from torch.distributed import ReduceOp

from mpc.crypten_compat import load_crypten
from mpc.errors import MalformedInput
from mpc.ss.channel import ChannelError, MtlsChannel
from mpc.ss.wire import (
    FRAME_OBJECT,
    FRAME_TENSORS,
    decode_object,
    decode_tensors,
    encode_object,
    encode_tensors,
)


class _Done:
    """The request object CrypTen `.wait()`s on; our sends and receives complete at once."""

    def wait(self) -> None:
        return None

    def is_completed(self) -> bool:
        return True


def _reduce(tensors: list[torch.Tensor], op) -> torch.Tensor:
    result = tensors[0].clone()
    for t in tensors[1:]:
        if op == ReduceOp.SUM:
            result += t
        elif op == ReduceOp.BXOR:
            result ^= t
        else:
            raise MalformedInput(f"unsupported reduce op {op}")
    return result


Communicator = load_crypten().communicator.Communicator


class ChannelCommunicator(Communicator):
    BYTES_PER_ELEMENT = 8

    def __init__(
        self, channel: MtlsChannel, parties: list[str], dealer: str, timeout: float = 120.0
    ) -> None:
        if channel.me not in parties:
            raise ChannelError(f"{channel.me} is not a computing party")
        self.channel = channel
        self.parties = list(parties)
        self.dealer = dealer
        self.rank = self.parties.index(channel.me)
        self.world_size = len(self.parties)
        self.timeout = timeout
        self._name = channel.me
        self.ttp_group = None
        self.ttp_comm_group = None
        self.reset_communication_stats()

    # -- identity -------------------------------------------------------------------
    @classmethod
    def is_initialized(cls) -> bool:
        return True

    def get_world_size(self) -> int:
        return self.world_size

    def get_rank(self) -> int:
        return self.rank

    def get_ttp_rank(self) -> int:
        return self.world_size

    def set_name(self, name: str) -> None:
        self._name = name

    def get_name(self) -> str:
        return self._name

    def _peer(self, rank: int) -> str:
        if rank == self.world_size:
            return self.dealer
        if not 0 <= rank < self.world_size or rank == self.rank:
            raise ChannelError(f"rank {rank} is not a peer of rank {self.rank}")
        return self.parties[rank]

    def _others(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank]

    # -- point to point -------------------------------------------------------------
    def _send_tensors(self, tensors: list[torch.Tensor], dst: int) -> None:
        self.comm_rounds += 1
        self.comm_bytes += sum(t.nelement() * t.element_size() for t in tensors)
        self.channel.send(self._peer(dst), FRAME_TENSORS, encode_tensors(tensors))

    def _recv_tensors(self, src: int, like: list[torch.Tensor] | None = None) -> list:
        data = self.channel.recv(self._peer(src), FRAME_TENSORS, timeout=self.timeout)
        tensors = decode_tensors(data)
        if like is None:
            return tensors
        # like torch.distributed, only the element count and type must agree
        if len(tensors) != len(like) or any(
            t.nelement() != ref.nelement() or t.dtype != ref.dtype
            for t, ref in zip(tensors, like, strict=True)
        ):
            raise MalformedInput(f"rank {src} sent tensors of an unexpected shape")
        return [t.reshape(ref.shape) for t, ref in zip(tensors, like, strict=True)]

    def send(self, tensor, dst):
        self._send_tensors([tensor], dst)

    def recv(self, tensor, src=None):
        if src is None:
            raise ChannelError("recv needs an explicit source rank")
        return self._recv_tensors(src, [tensor])[0]

    def isend(self, tensor, dst):
        self.send(tensor, dst)
        return _Done()

    def irecv(self, tensor, src=None):
        tensor.copy_(self.recv(tensor, src))
        return _Done()

    def send_obj(self, obj, dst, group=None):
        self.channel.send(self._peer(dst), FRAME_OBJECT, encode_object(obj))

    def recv_obj(self, src, group=None):
        return decode_object(self.channel.recv(self._peer(src), FRAME_OBJECT, self.timeout))

    # -- collectives (all between the computing parties) ------------------------------
    def _as_list(self, value, batched: bool) -> list[torch.Tensor]:
        if batched:
            if not isinstance(value, list):
                raise MalformedInput("batched collective input must be a list")
            return list(value)
        return [value]

    def _exchange(self, mine: list[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
        for r in self._others():
            self._send_tensors(mine, r)
        return {r: self._recv_tensors(r, mine) for r in self._others()}

    def all_reduce(self, input, op=ReduceOp.SUM, batched=False):
        mine = [t.data for t in self._as_list(input, batched)]
        theirs = self._exchange(mine)
        out = [
            _reduce([theirs[r][i] if r != self.rank else mine[i] for r in range(self.world_size)],
                    op)
            for i in range(len(mine))
        ]
        return out if batched else out[0]

    def reduce(self, input, dst, op=ReduceOp.SUM, batched=False):
        mine = [t.data for t in self._as_list(input, batched)]
        if self.rank != dst:
            self._send_tensors(mine, dst)
            return None
        theirs = {r: self._recv_tensors(r, mine) for r in self._others()}
        out = [
            _reduce([theirs[r][i] if r != self.rank else mine[i] for r in range(self.world_size)],
                    op)
            for i in range(len(mine))
        ]
        return out if batched else out[0]

    def gather(self, tensor, dst):
        if self.rank != dst:
            self._send_tensors([tensor.data], dst)
            return [None]
        theirs = {r: self._recv_tensors(r, [tensor.data])[0] for r in self._others()}
        return [theirs[r] if r != self.rank else tensor.data.clone()
                for r in range(self.world_size)]

    def all_gather(self, tensor):
        theirs = self._exchange([tensor.data])
        return [theirs[r][0] if r != self.rank else tensor.data.clone()
                for r in range(self.world_size)]

    def broadcast(self, input, src, group=None, batched=False):
        tensors = self._as_list(input, batched)
        if self.rank == src:
            for r in self._others():
                self._send_tensors([t.data for t in tensors], r)
        else:
            received = self._recv_tensors(src, [t.data for t in tensors])
            for t, got in zip(tensors, received, strict=True):
                t.data.copy_(got)
        return input

    def scatter(self, scatter_list, src, size=None, device=None):
        if self.rank == src:
            for r in self._others():
                self._send_tensors([scatter_list[r].data], r)
            return scatter_list[self.rank].data.clone()
        return self._recv_tensors(src)[0]

    def broadcast_obj(self, obj, src, group=None):
        if self.rank == src:
            for r in self._others():
                self.send_obj(obj, r)
            return obj
        return self.recv_obj(src)

    def barrier(self):
        self._exchange([torch.zeros(0, dtype=torch.int64)])
