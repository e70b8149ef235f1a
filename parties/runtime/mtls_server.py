"""Serve an ASGI app over mutual TLS, logging every refused handshake.

asyncio's own TLS server drops failed handshakes silently. Here the listening
socket is plain TCP and each connection is upgraded with `loop.start_tls`, so a
client with no certificate, another CA's, an expired or a revoked one is refused
and the refusal is written to the node's log with its reason. After the
handshake, uvicorn's HTTP/1.1 protocol takes over, and the verified peer
certificate is handed to the app in `scope["extensions"]["tls"]`.

Slow clients are cut off: a handshake must finish within HANDSHAKE_TIMEOUT_S,
and a connection that waits for request headers (a slowloris client sending
them byte by byte, or one that sends nothing) for HEADER_TIMEOUT_S is closed.
uvicorn alone would wait forever: its keep-alive timer stops at the first byte.

It needs the standard asyncio loop: uvloop may deliver the ClientHello to the
protocol before `start_tls` runs, even with reading paused.
"""

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509
from uvicorn.protocols.http.h11_impl import H11Protocol

from parties.runtime.pki import certificate_node_name

HANDSHAKE_TIMEOUT_S = 10.0
HEADER_TIMEOUT_S = 10.0
_WATCH_EVERY_S = 1.0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    return f"connection failed during handshake: {exc!r}"


def _with_peer(app: Any, der: bytes) -> Any:
    cert = x509.load_der_x509_certificate(der)
    peer = {
        "node": certificate_node_name(cert),
        "serial": format(cert.serial_number, "x"),
    }

    async def app_with_peer(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "tls": peer}}
        await app(scope, receive, send)

    return app_with_peer


def mutual_tls_protocol(
    context: Callable[[], ssl.SSLContext],
    on_refused: Callable[[str, str], None],
    on_dropped: Callable[[str, str], None] | None = None,
) -> type[asyncio.Protocol]:
    """A uvicorn `http=` protocol class that performs the mutual-TLS handshake itself.

    `on_refused(peer, reason)` hears of failed handshakes, `on_dropped(peer, reason)`
    of connections closed for sending their request headers too slowly.
    """

    class MutualTlsProtocol(asyncio.Protocol):
        def __init__(self, **kwargs: Any) -> None:
            self._kwargs = kwargs
            self._loop: asyncio.AbstractEventLoop = kwargs.get("_loop") or asyncio.get_event_loop()
            self._inner: H11Protocol | None = None
            self._handshake: asyncio.Task | None = None
            # Application data can arrive between the end of the handshake and the
            # moment the coroutine resumes; it is held here until HTTP takes over.
            self._early: list[bytes] = []
            self._early_eof = False
            self._where = "unknown"
            self._tls: Any = None
            self._idle_since: float | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # Read nothing until start_tls has put the TLS layer in place, or the
            # ClientHello would reach this protocol instead of the TLS layer.
            transport.pause_reading()  # type: ignore[attr-defined]
            peer = transport.get_extra_info("peername")
            where = f"{peer[0]}:{peer[1]}" if peer else "unknown"
            self._where = where
            self._handshake = self._loop.create_task(self._upgrade(transport, where))

        async def _upgrade(self, transport: Any, where: str) -> None:
            try:
                tls = await self._loop.start_tls(
                    transport, self, context(), server_side=True,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
                )
            except (OSError, TimeoutError, ConnectionError) as exc:
                on_refused(where, _describe(exc))
                transport.close()
                return
            if tls is None or tls.is_closing():
                return
            der = tls.get_extra_info("ssl_object").getpeercert(binary_form=True)
            inner = H11Protocol(**self._kwargs)
            inner.app = _with_peer(inner.app, der)
            self._inner = inner
            self._tls = tls
            # Each finished response opens a fresh window for the next request's headers.
            finish = inner.on_response_complete

            def on_response_complete() -> None:
                self._idle_since = time.monotonic()
                finish()

            inner.on_response_complete = on_response_complete  # type: ignore[method-assign]
            inner.connection_made(tls)
            self._idle_since = time.monotonic()
            self._loop.call_later(_WATCH_EVERY_S, self._watch_headers)
            for chunk in self._early:
                inner.data_received(chunk)
            self._early.clear()
            if self._early_eof:
                inner.eof_received()

        def _watch_headers(self) -> None:
            """Close the connection once it has waited HEADER_TIMEOUT_S for request headers."""
            inner, tls = self._inner, self._tls
            if inner is None or tls is None or tls.is_closing():
                return
            cycle = inner.cycle
            now = time.monotonic()
            if cycle is not None and not cycle.response_complete:
                self._idle_since = None  # a request is being read or answered
            elif self._idle_since is None:
                self._idle_since = now
            elif now - self._idle_since > HEADER_TIMEOUT_S:
                if on_dropped is not None:
                    on_dropped(self._where, f"no complete request headers within "
                                            f"{HEADER_TIMEOUT_S:g} s")
                tls.close()
                return
            self._loop.call_later(_WATCH_EVERY_S, self._watch_headers)

        def data_received(self, data: bytes) -> None:
            if self._inner is not None:
                self._inner.data_received(data)
            else:
                self._early.append(data)

        def eof_received(self) -> bool | None:
            if self._inner is None:
                self._early_eof = True
                return True
            return self._inner.eof_received()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._inner is not None:
                self._inner.connection_lost(exc)
            elif self._handshake is not None and not self._handshake.done():
                self._handshake.cancel()

        def pause_writing(self) -> None:
            if self._inner is not None:
                self._inner.pause_writing()

        def resume_writing(self) -> None:
            if self._inner is not None:
                self._inner.resume_writing()

    return MutualTlsProtocol
