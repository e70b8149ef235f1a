"""The runtime's own routes, served by every node: health, ping and its refusal record."""

from pydantic import BaseModel

from parties.runtime.routes import Kind, Route


class Health(BaseModel):
    node: str
    role: str
    trust_domain: str
    status: str
    schema_versions: dict[str, int]


class Pong(BaseModel):
    node: str
    role: str
    trust_domain: str
    caller: str
    caller_trust_domain: str


class Refusal(BaseModel):
    at: str
    request_id: str | None
    caller: str | None
    route: str
    error: str
    detail: str | None


HEALTH = Route("GET", "/v1/health", Kind.PING, None, Health, tag="runtime")
PING = Route("GET", "/v1/ping", Kind.PING, None, Pong, tag="runtime")
REFUSALS = Route("GET", "/v1/admin/refusals", Kind.ADMIN, None, list[Refusal], tag="runtime")
