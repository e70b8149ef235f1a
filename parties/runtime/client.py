"""Call other nodes as this node: mutual TLS, request ids, typed errors.

The client checks the topology before sending (a forbidden flow never leaves
the node) and checks that the server's certificate names the node it meant to
reach, not merely some federation member.
"""

import ssl
from collections.abc import Mapping
from typing import Any, TypeVar

import httpx
from cryptography import x509
from pydantic import BaseModel, TypeAdapter

from parties.runtime.errors import (
    FlowNotAllowed,
    NodeUnavailable,
    PeerIdentityMismatch,
    remote_error,
)
from parties.runtime.node_log import (
    NODE_HEADER,
    REQUEST_ID_HEADER,
    NodeLog,
    current_request_id,
    new_request_id,
)
from parties.runtime.pki import certificate_node_name
from parties.runtime.routes import Kind, Raw, Route
from parties.runtime.session_file import SESSION_HEADER, saved_session
from parties.runtime.state import StateDir
from parties.runtime.tls import client_context
from parties.runtime.topology import Topology

DEFAULT_TIMEOUT_S = 30.0

Resp = TypeVar("Resp")


class NodeClient:
    """An HTTPS client holding `me`'s certificate."""

    def __init__(
        self,
        state: StateDir,
        topology: Topology,
        me: str,
        *,
        log: NodeLog | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.me = me
        self.state = state
        self.topology = topology
        self.log = log
        # A local administrator's second-factor session, sent only to this node itself.
        self._admin_session = saved_session(state.node(me))
        self._http = httpx.Client(
            verify=context or client_context(state, me), timeout=timeout
        )

    def __enter__(self) -> "NodeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        target: str,
        method: str,
        path: str,
        *,
        kind: Kind,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        check_flow: bool = True,
    ) -> httpx.Response:
        """Send one request to node `target`; raise the remote's typed error on refusal."""
        spec = self.topology.node(target)
        if check_flow and target != self.me and not self.topology.allows(self.me, target, kind):
            if self.log:
                self.log.event("refused_outbound", target=target, kind=kind, path=path)
            raise FlowNotAllowed(
                f"the topology does not allow {self.me} to make {kind!r} calls to {target}"
            )
        rid = current_request_id.get() or new_request_id()
        sent = {NODE_HEADER: self.me, REQUEST_ID_HEADER: rid, **(headers or {})}
        if target == self.me and self._admin_session:
            sent.setdefault(SESSION_HEADER, self._admin_session)
        try:
            # Streamed, so the server's certificate is checked while the connection is
            # still open: a response that closes it (413, 500) would take the TLS session
            # information with it once the body is read.
            with self._http.stream(
                method, spec.url + path, json=json, content=content, headers=sent
            ) as response:
                self._check_server_identity(response, target)
                response.read()
        except httpx.TransportError as exc:
            if self.log:
                self.log.event("call_failed", target=target, path=path, error=repr(exc))
            raise NodeUnavailable(f"{target} at {spec.url}: {exc}") from exc
        if self.log:
            self.log.event("call", target=target, path=path, status=response.status_code,
                           request_id=rid)
        if response.status_code >= 400:
            try:
                body = response.json()
                error, detail = body.get("error", "Error"), body.get("detail", "")
            except ValueError:
                error, detail = "Error", response.text[:200]
            raise remote_error(response.status_code, str(error), str(detail))
        return response

    def call(
        self,
        target: str,
        route: Route[Any, Resp],
        body: BaseModel | None = None,
        *,
        params: Mapping[str, str | int] | None = None,
        query: Mapping[str, str | int] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Resp:
        """Call `route` on `target`: the typed response, or the remote's typed error raised.

        `body` is the route's request model; `content` its bytes when the route's
        request is `Raw`. A `Raw` response comes back as bytes.
        """
        if route.request is None and (body is not None or content is not None):
            raise TypeError(f"{route.method} {route.path} takes no body")
        if body is not None and not isinstance(body, route.request):
            raise TypeError(f"{route.path} takes {route.request.__name__}, not "
                            f"{type(body).__name__}")
        response = self.send(
            target, route, params=params, query=query, content=content, headers=headers,
            json=None if body is None else body.model_dump(mode="json"),
        )
        if route.response is Raw:
            return response.content  # type: ignore[return-value]
        if route.response is None:
            return None  # type: ignore[return-value]
        return _adapter(route.response).validate_json(response.content)

    def send(
        self,
        target: str,
        route: Route,
        *,
        params: Mapping[str, str | int] | None = None,
        query: Mapping[str, str | int] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        check_flow: bool = True,
    ) -> httpx.Response:
        """Send anything to a declared route and return the HTTP response (refusals raised).

        For callers that need the response itself or must send what the route's model
        would refuse: attack tests, status checks. Everything else uses `call`.
        """
        path = route.url(**(params or {}))
        if query:
            path += "?" + str(httpx.QueryParams(dict(query)))
        return self.request(target, route.method, path, kind=route.kind, json=json,
                            content=content, headers=headers, check_flow=check_flow)

    @staticmethod
    def _check_server_identity(response: httpx.Response, target: str) -> None:
        stream = response.extensions.get("network_stream")
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        if ssl_object is None:
            raise PeerIdentityMismatch(f"no TLS session information for {target}")
        der = ssl_object.getpeercert(True)
        name = certificate_node_name(x509.load_der_x509_certificate(der))
        if name != target:
            raise PeerIdentityMismatch(f"expected node {target!r}, the server is {name!r}")


_adapters: dict[Any, TypeAdapter] = {}


def _adapter(response_type: Any) -> TypeAdapter:
    found = _adapters.get(response_type)
    if found is None:
        found = _adapters[response_type] = TypeAdapter(response_type)
    return found
