"""TLS 1.3 contexts for mutual authentication inside the federation.

Both sides present a certificate from the federation CA and check the other's
against the CA and its revocation list. The server context is rebuilt when the
revocation list changes on disk, so `cogov pki revoke` takes effect on the next
connection without restarting the node.
"""

import os
import ssl
import threading

from parties.runtime.state import StateDir


def _base(purpose: int, state: StateDir, node: str) -> ssl.SSLContext:
    paths = state.node(node)
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(paths.cert, paths.key)
    ctx.load_verify_locations(cafile=state.ca.cert)
    ctx.load_verify_locations(cafile=state.ca.crl)
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(state: StateDir, node: str) -> ssl.SSLContext:
    """A server context for `node` that demands a client certificate."""
    return _base(ssl.PROTOCOL_TLS_SERVER, state, node)


def client_context(state: StateDir, node: str) -> ssl.SSLContext:
    """A client context presenting `node`'s certificate and checking the server's."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, state, node)
    ctx.check_hostname = True
    return ctx


class ReloadingServerContext:
    """Hands out the node's server context, rebuilt when the CRL file changes."""

    def __init__(self, state: StateDir, node: str) -> None:
        self._state = state
        self._node = node
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._ctx: ssl.SSLContext | None = None

    def current(self) -> ssl.SSLContext:
        st = os.stat(self._state.ca.crl)
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if self._ctx is None or stamp != self._stamp:
                self._ctx = server_context(self._state, self._node)
                self._stamp = stamp
            return self._ctx
