"""Build a node's FastAPI app: identity, request ids, typed errors, role routes.

The runtime is the same for every node; what differs is the role behaviour's
router, mounted by `build_node_app`.
"""

import re
import time
from collections.abc import Awaitable, Callable, Iterable

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import compile_path

from parties.runtime.access import Caller, route_policies
from parties.runtime.api import HEALTH, PING, REFUSALS, Health, Pong, Refusal
from parties.runtime.context import NodeContext
from parties.runtime.errors import (
    TYPED_ERROR_BASES,
    IdentityMismatch,
    NodeError,
    NotAuthenticated,
    RemoteError,
    UnknownNode,
    error_detail,
)
from parties.runtime.mount import mount
from parties.runtime.node_log import NODE_HEADER, REQUEST_ID_HEADER, current_request_id
from parties.runtime.request_ids import log_request_id, new_log_id, pair_key
from parties.runtime.routes import Kind

# Bodies are cut off before they are read: any request may carry at most
# MAX_BODY_BYTES, except routes of the bulk computing kinds (share tables, sealed
# claim batches between computing nodes), which enforce their own limit as they read.
MAX_BODY_BYTES = 64 * 1024 * 1024
BULK_BODY_BYTES = 512 * 1024 * 1024
BULK_KINDS = frozenset({Kind.MPC, Kind.PRODUCT})


class BodyTooLarge(NodeError):
    """The declared body exceeds what the route accepts; refused before it is read."""

    http_status = 413


# The framework's own refusals (unparsable body, unknown path, wrong method) get a name
# too, so every error a node answers is typed and recorded.
HTTP_ERROR_NAMES = {400: "MalformedRequest", 404: "NotFound", 405: "MethodNotAllowed"}


class LengthRequired(NodeError):
    """A body sent without Content-Length (chunked) cannot be bounded before reading."""

    http_status = 411


def _error_body(error: str, detail: str, request_id: str | None) -> dict:
    return {"error": error, "detail": detail, "request_id": request_id}


def _identify(request: Request, ctx: NodeContext) -> Caller:
    peer = (request.scope.get("extensions") or {}).get("tls")
    if not peer:
        raise NotAuthenticated("no verified federation certificate")
    name = peer["node"]
    if not ctx.topology.has_node(name):
        raise UnknownNode(f"certificate subject {name!r} is not a node of this federation")
    claimed = request.headers.get(NODE_HEADER)
    if claimed is not None and claimed != name:
        raise IdentityMismatch(
            f"caller claims to be {claimed!r} but its certificate names {name!r}"
        )
    return Caller(ctx.topology.node(name))


def _body_limit_of(bulk_paths: list[re.Pattern[str]], path: str) -> int:
    return BULK_BODY_BYTES if any(p.match(path) for p in bulk_paths) else MAX_BODY_BYTES


def _body_refusal(request: Request, limit: int) -> NodeError | None:
    """Why the request's body is refused before a byte of it is read, or None."""
    if "chunked" in request.headers.get("transfer-encoding", "").lower():
        return LengthRequired("request bodies must declare their Content-Length")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return BodyTooLarge(f"body of {declared} bytes exceeds {limit}")
    return None


def build_node_app(ctx: NodeContext, routers: Iterable[APIRouter] = ()) -> FastAPI:
    spec = ctx.spec
    app = FastAPI(
        title=f"cogov node {spec.name}",
        description=f"Role `{spec.role.value}` in trust domain `{spec.trust_domain}`. "
        "Every call needs a federation client certificate (mutual TLS 1.3).",
        version="0.1.0",
    )
    app.state.node_name = ctx.name
    app.state.topology = ctx.topology
    app.state.ctx = ctx
    pair_keys: dict[tuple[str, bytes], bytes] = {}  # (caller, its key) -> request-id key

    def log_id_of(caller: Caller, claimed: str) -> str:
        public = ctx.signing_public_keys()[caller.name]
        found = pair_keys.get((caller.name, public))
        if found is None:
            found = pair_keys[(caller.name, public)] = pair_key(ctx.signing_key, public)
        return log_request_id(found, claimed)

    def refuse(
        request: Request, exc: Exception, status: int, error: str | None = None
    ) -> JSONResponse:
        rid = current_request_id.get()
        caller = getattr(request.state, "caller", None)
        caller_name = caller.name if caller else None
        # A relayed refusal keeps the remote's name even when this process lacks its class.
        error = error or (exc.error if isinstance(exc, RemoteError) else type(exc).__name__)
        detail = error_detail(exc)
        kept = getattr(exc, "log_detail", None) or detail  # the cause, for this node only
        ctx.log.event(
            "refused", route=request.url.path, method=request.method, caller=caller_name,
            error=error, detail=kept, status=status,
        )
        ctx.store.record_refusal(rid, caller_name, request.url.path, error, kept)
        retry_after = getattr(exc, "retry_after_s", None)  # RFC 9110 §10.2.3, in seconds
        return JSONResponse(_error_body(error, detail, rid), status_code=status,
                            headers=None if retry_after is None else {
                                "Retry-After": str(retry_after)})

    @app.middleware("http")
    async def identity_and_request_id(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # Until the caller's id is checked the request is known by a fresh id: the raw
        # header is client input, never logged, stored or forwarded.
        rid = new_log_id()
        token = current_request_id.set(rid)
        started = time.perf_counter()
        try:
            try:
                request.state.caller = _identify(request, ctx)
                claimed = request.headers.get(REQUEST_ID_HEADER)
                if claimed is not None:
                    rid = log_id_of(request.state.caller, claimed)
                    current_request_id.set(rid)
                too_big = _body_refusal(request, _body_limit_of(bulk_paths, request.url.path))
                if too_big is not None:
                    raise too_big
            except NodeError as exc:
                response = refuse(request, exc, exc.http_status)
                if isinstance(exc, BodyTooLarge | LengthRequired):
                    # The unread body is still arriving: close rather than read it.
                    response.headers["Connection"] = "close"
                return response
            response = await call_next(request)
            response.headers[REQUEST_ID_HEADER] = rid
            ctx.log.event(
                "request", method=request.method, route=request.url.path,
                caller=request.state.caller.name, status=response.status_code,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )
            return response
        finally:
            current_request_id.reset(token)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return refuse(request, ValueError(fields), 422)

    @app.exception_handler(HTTPException)
    async def framework_refusal(request: Request, exc: HTTPException) -> JSONResponse:
        name = HTTP_ERROR_NAMES.get(exc.status_code, "HttpError")
        response = refuse(request, ValueError(exc.detail), exc.status_code, name)
        response.headers.update(exc.headers or {})
        return response

    async def typed_error(request: Request, exc: Exception) -> JSONResponse:
        return refuse(request, exc, exc.http_status)  # type: ignore[attr-defined]

    for base in TYPED_ERROR_BASES:
        app.add_exception_handler(base, typed_error)

    runtime = APIRouter()

    @mount(runtime, HEALTH)
    def health(caller: Caller) -> Health:
        return Health(
            node=spec.name, role=spec.role.value, trust_domain=spec.trust_domain, status="ok",
            schema_versions=ctx.store.versions,
        )

    @mount(runtime, PING)
    def ping(caller: Caller) -> Pong:
        return Pong(
            node=spec.name, role=spec.role.value, trust_domain=spec.trust_domain,
            caller=caller.name, caller_trust_domain=caller.spec.trust_domain,
        )

    @mount(runtime, REFUSALS)
    def refusals(caller: Caller, limit: int = 100) -> list[Refusal]:
        """The most recent refused requests recorded in this node's store."""
        with ctx.store.lock:
            rows = ctx.store.conn.execute(
                "SELECT at, request_id, caller, route, error, detail FROM refusals"
                " ORDER BY id DESC LIMIT ?", (max(1, min(limit, 1000)),),
            ).fetchall()
        return [Refusal(at=r[0], request_id=r[1], caller=r[2], route=r[3], error=r[4],
                        detail=r[5]) for r in rows]

    for router in (runtime, *routers):
        app.include_router(router)
    bulk_paths = [
        compile_path(path)[0] for _, path, policy in route_policies(app.routes)
        if policy.kind in BULK_KINDS
    ]
    return app
