"""A framed, mutual-TLS channel between named parties.

Every party listens on its own address; a party dials each peer whose name sorts
before its own and accepts the others, so each pair holds exactly one TLS 1.3
connection. The TLS work runs in one asyncio loop on a background thread (asyncio's
SSL transport keeps reads and writes on one OpenSSL object in one thread); callers on
other threads send without blocking and receive from a per-peer queue. A peer is who
its certificate says it is: the expected party name must appear in the certificate's
DNS names or common name, checked on both ends.

Frames are `kind (1 byte) | length (8 bytes, big endian) | payload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from mpc.errors import MpcError

_HEADER = struct.Struct("!BQ")
MAX_FRAME = 1 << 31
_HELLO = 0x48
_CLOSED = object()


class ChannelError(MpcError):
    """The channel could not be set up, lost a peer, or received a bad frame."""

    http_status = 502


@dataclass
class PeerLink:
    name: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    inbox: queue.Queue = field(default_factory=queue.Queue)
    bytes_sent: int = 0
    bytes_received: int = 0

    def tls_info(self) -> dict:
        obj = self.writer.get_extra_info("ssl_object")
        return {
            "tls_version": obj.version() if obj else None,
            "cipher": obj.cipher()[0] if obj else None,
            "peer_names": sorted(certificate_names(obj.getpeercert())) if obj else [],
        }


def certificate_names(cert: Mapping | None) -> set[str]:
    """DNS subject-alternative names and common names of a decoded peer certificate."""
    if not cert:
        return set()
    names = {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}
    for rdn in cert.get("subject", ()):
        names.update(value for key, value in rdn if key == "commonName")
    return names


class MtlsChannel:
    """Open with `MtlsChannel.open(...)`; then `send`/`recv` frames by peer name."""

    def __init__(self, me: str) -> None:
        self.me = me
        self._links: dict[str, PeerLink] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"mtls-{me}", daemon=True
        )
        self._server: asyncio.base_events.Server | None = None
        self._closed = False

    @classmethod
    def open(
        cls,
        me: str,
        addresses: Mapping[str, tuple[str, int]],
        server_context: ssl.SSLContext,
        client_context: ssl.SSLContext,
        timeout: float = 30.0,
        listener: socket.socket | None = None,
    ) -> MtlsChannel:
        """Connect `me` to every other party in `addresses` (name -> (host, port)).

        `listener`, if given, is an already bound socket to accept on (its port is the
        one `addresses[me]` names); otherwise `me` binds `addresses[me]` itself.
        """
        if me not in addresses:
            raise ChannelError(f"{me} is not in the address map")
        for ctx, side in ((server_context, "server"), (client_context, "client")):
            if ctx.verify_mode != ssl.CERT_REQUIRED:
                raise ChannelError(f"the {side} context must require peer certificates")
        channel = cls(me)
        channel._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            channel._establish(dict(addresses), server_context, client_context, timeout,
                               listener),
            channel._loop,
        )
        try:
            future.result(timeout + 5)
        except BaseException as exc:
            channel.close()
            if isinstance(exc, ChannelError):
                raise
            raise ChannelError(f"{me}: channel setup failed: {exc!r}") from exc
        return channel

    @property
    def peers(self) -> list[str]:
        return sorted(self._links)

    async def _establish(self, addresses, server_context, client_context, timeout,
                         listener) -> None:
        accept_from = {p for p in addresses if p > self.me}
        dial_to = sorted(p for p in addresses if p < self.me)
        accepted: asyncio.Queue = asyncio.Queue()

        async def on_accept(reader, writer):
            try:
                name = await self._greet_as_server(reader, writer, accept_from)
            except Exception as exc:  # refuse the connection, keep listening
                writer.close()
                await accepted.put(exc)
                return
            await accepted.put((name, reader, writer))

        if listener is not None:
            self._server = await asyncio.start_server(on_accept, sock=listener,
                                                      ssl=server_context)
        elif accept_from:
            host, port = addresses[self.me]
            self._server = await asyncio.start_server(
                on_accept, host, port, ssl=server_context
            )
        deadline = time.monotonic() + timeout
        for peer in dial_to:
            await self._dial(peer, addresses[peer], client_context, deadline)
        while accept_from - set(self._links):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(accept_from - set(self._links))
                raise ChannelError(f"{self.me}: peers {missing} did not connect")
            try:
                item = await asyncio.wait_for(accepted.get(), remaining)
            except TimeoutError:
                continue
            if isinstance(item, Exception):
                continue  # an impostor or a failed handshake; the real peer may still come
            name, reader, writer = item
            if name in self._links:
                writer.close()
                continue
            self._add_link(name, reader, writer)
        if self._server is not None:
            self._server.close()  # the session's membership is fixed from here on
            self._server = None

    async def _dial(self, peer, address, client_context, deadline) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        address[0], address[1], ssl=client_context, server_hostname=peer
                    ),
                    max(0.1, deadline - time.monotonic()),
                )
            except (OSError, TimeoutError) as exc:
                last = exc
                await asyncio.sleep(0.05)
                continue
            self._check_peer(writer, peer)
            payload = self.me.encode()
            writer.write(_HEADER.pack(_HELLO, len(payload)) + payload)
            await writer.drain()
            try:  # the acceptor acknowledges only after checking our certificate
                kind, length = _HEADER.unpack(await asyncio.wait_for(
                    reader.readexactly(_HEADER.size), max(0.1, deadline - time.monotonic())))
                ack = await reader.readexactly(length) if length <= 256 else b""
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError,
                    ssl.SSLError) as exc:
                writer.close()
                raise ChannelError(f"{self.me}: {peer} refused the connection") from exc
            if kind != _HELLO or ack != peer.encode():
                writer.close()
                raise ChannelError(f"{self.me}: bad acknowledgement from {peer}")
            self._add_link(peer, reader, writer)
            return
        raise ChannelError(f"{self.me}: could not reach {peer} at {address}: {last!r}")

    async def _greet_as_server(self, reader, writer, expected: set[str]) -> str:
        kind, length = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        if kind != _HELLO or length > 256:
            raise ChannelError("bad hello frame")
        name = (await reader.readexactly(length)).decode()
        if name not in expected:
            raise ChannelError(f"unexpected party {name!r}")
        self._check_peer(writer, name)
        ack = self.me.encode()
        writer.write(_HEADER.pack(_HELLO, len(ack)) + ack)
        await writer.drain()
        return name

    @staticmethod
    def _check_peer(writer, name: str) -> None:
        obj = writer.get_extra_info("ssl_object")
        if obj is None or obj.version() != "TLSv1.3":
            writer.close()
            raise ChannelError(f"connection to {name} is not TLS 1.3")
        if name not in certificate_names(obj.getpeercert()):
            writer.close()
            raise ChannelError(f"certificate does not name {name}")

    def _add_link(self, name, reader, writer) -> None:
        link = PeerLink(name, reader, writer)
        self._links[name] = link
        self._loop.create_task(self._pump(link))

    async def _pump(self, link: PeerLink) -> None:
        try:
            while True:
                kind, length = _HEADER.unpack(await link.reader.readexactly(_HEADER.size))
                if length > MAX_FRAME:
                    raise ChannelError(f"frame of {length} bytes from {link.name}")
                payload = await link.reader.readexactly(length)
                link.bytes_received += _HEADER.size + length
                link.inbox.put((kind, payload))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, ChannelError):
            pass
        finally:
            link.inbox.put(_CLOSED)

    def send(self, peer: str, kind: int, payload: bytes | bytearray | memoryview) -> None:
        """Queue one frame to `peer`; returns at once (the loop thread writes it)."""
        link = self._link(peer)
        data = _HEADER.pack(kind, len(payload)) + bytes(payload)
        link.bytes_sent += len(data)
        self._loop.call_soon_threadsafe(link.writer.write, data)

    def recv(self, peer: str, kind: int, timeout: float | None = None) -> bytes:
        """The next frame from `peer`; it must be of `kind`."""
        link = self._link(peer)
        try:
            item = link.inbox.get(timeout=timeout)
        except queue.Empty as exc:
            raise ChannelError(f"{self.me}: timed out waiting for {peer}") from exc
        if item is _CLOSED:
            link.inbox.put(_CLOSED)
            raise ChannelError(f"{self.me}: connection to {peer} closed")
        got, payload = item
        if got != kind:
            raise ChannelError(f"{self.me}: expected frame kind {kind} from {peer}, got {got}")
        return payload

    def _link(self, peer: str) -> PeerLink:
        if self._closed:
            raise ChannelError(f"{self.me}: channel closed")
        try:
            return self._links[peer]
        except KeyError:
            raise ChannelError(f"{self.me}: no connection to {peer!r}") from None

    def stats(self) -> dict[str, dict[str, int]]:
        """Bytes sent and received per peer (frame bytes, before TLS overhead)."""
        return {
            name: {"sent": link.bytes_sent, "received": link.bytes_received}
            for name, link in self._links.items()
        }

    def connection_info(self) -> dict[str, dict]:
        """TLS version, cipher and certificate names of every peer connection."""
        return {name: link.tls_info() for name, link in self._links.items()}

    def transports(self) -> dict[str, object]:
        """The underlying transports (for audits: each one is an asyncio SSL transport)."""
        return {name: link.writer.transport for name, link in self._links.items()}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shutdown():
            if self._server is not None:
                self._server.close()
            for link in self._links.values():
                link.writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(link.writer.wait_closed(), 2)

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        for link in self._links.values():
            link.inbox.put(_CLOSED)

    def __enter__(self) -> MtlsChannel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
