"""A Grid wrapper that counts the serialized bytes exchanged with each node per round."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid


@dataclass
class RoundTraffic:
    """Bytes to and from every node, and failed replies, in one round (group id)."""

    down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    messages: int = 0
    errors: int = 0

    def summary(self) -> dict[str, float | int]:
        nodes = set(self.down) | set(self.up)
        count = max(len(nodes), 1)
        up, down = sum(self.up.values()), sum(self.down.values())
        return {
            "clients_contacted": len(nodes),
            "bytes_up_per_client": up / count,
            "bytes_down_per_client": down / count,
            "bytes_up_max": max(self.up.values(), default=0),
            "bytes_total": up + down,
            "messages": self.messages,
            "failed_replies": self.errors,
        }


def serialized_size(message: Message) -> int:
    """Bytes of the protobuf encoding Flower uses on the wire for this message."""
    return message_to_proto(message).ByteSize()


class MeteredGrid(Grid):
    """Delegates to another Grid and meters every message that passes through it."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.rounds: dict[str, RoundTraffic] = defaultdict(RoundTraffic)

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self._inner.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._count_outgoing(messages)
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._inner.pull_messages(message_ids))
        self._count_incoming(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self._count_outgoing(messages)
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        self._count_incoming(replies)
        return replies

    def _count_outgoing(self, messages: list[Message]) -> None:
        with self._lock:
            for msg in messages:
                traffic = self.rounds[msg.metadata.group_id]
                traffic.down[msg.metadata.dst_node_id] += serialized_size(msg)
                traffic.messages += 1

    def _count_incoming(self, replies: list[Message]) -> None:
        with self._lock:
            for msg in replies:
                traffic = self.rounds[msg.metadata.group_id]
                traffic.up[msg.metadata.src_node_id] += serialized_size(msg)
                traffic.messages += 1
                if msg.has_error():
                    traffic.errors += 1
