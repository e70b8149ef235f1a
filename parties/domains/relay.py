"""A data user's way to its domain tokens: the blinded OPRF chain, seen from the insurer.

    insurer: r·H(id)  ->  regulator (authenticates the insurer, relays, names it)
             ->  operator (asks the health authority for k1, applies k2 of the
                 insurer's domain)  ->  back;  insurer: r^-1·k2·k1·r·H(id) = T_d(id)

No key holder sees an id (r·H(id) is a uniformly random group element); the
insurer cannot compute a token alone. The regulator's relay is the service
`REGULATOR_OPRF_SERVICE` here; the operator's step is in
`parties.services.operator_domains`.
"""

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from mpc import xid
from parties.runtime.access import Caller, CallerPolicy
from parties.runtime.client import NodeClient
from parties.runtime.context import NodeContext
from parties.runtime.errors import RemoteError
from parties.runtime.service import Service
from parties.runtime.topology import Role

CHUNK = 1000  # points per request (the operator's limit)
DEFAULT_SCENARIO = "claim_check"


class RelayRequest(BaseModel):
    scenario: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")] = DEFAULT_SCENARIO
    points: Annotated[list[Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]],
                      Field(min_length=1, max_length=CHUNK)]


class RelayedPoints(BaseModel):
    points: list[str]


def domain_tokens(
    node: NodeContext | NodeClient, ids: Sequence[str | bytes], *,
    scenario: str = DEFAULT_SCENARIO,
) -> list[bytes]:
    """T_d(id) for each id, d being the caller's domain in `scenario` (caller: an insurer).

    `node` is the insurer's `NodeContext` or a `NodeClient` holding its certificate.
    Raises `parties.runtime.errors.RemoteError` with the operator's typed refusal
    (`RateLimited` 429, `DomainDeleted` 410, `UnknownDomain` 404, ...).
    """
    if not ids:
        return []
    client = node.client() if isinstance(node, NodeContext) else node
    regulator = client.topology.nodes_with_role(Role.REGULATOR)[0].name
    tokens: list[bytes] = []
    try:
        for start in range(0, len(ids), CHUNK):
            blinded, state = xid.blind(list(ids[start:start + CHUNK]))
            body = client.post(regulator, "/v1/oprf/domain-tokens", kind="oprf", json={
                "scenario": scenario, "points": [p.hex() for p in blinded],
            }).json()
            tokens += xid.unblind(state, [bytes.fromhex(p) for p in body["points"]])
    finally:
        if isinstance(node, NodeContext):
            client.close()
    return tokens


def _relay_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter(prefix="/v1/oprf", tags=["oprf"])

    @router.post("/domain-tokens", response_model=RelayedPoints)
    def relay(
        body: RelayRequest, caller: Caller = Depends(CallerPolicy("oprf", (Role.INSURER,)))
    ) -> RelayedPoints | JSONResponse:
        """Relay an insurer's blinded points to the operator, naming the authenticated insurer."""
        operator = ctx.topology.nodes_with_role(Role.OPERATOR)[0].name
        try:
            with ctx.client() as client:
                out = client.post(operator, "/v1/oprf/evaluate", kind="oprf", json={
                    "scenario": body.scenario, "data_user": caller.name, "points": body.points,
                }).json()
        except RemoteError as exc:
            # Pass the operator's typed refusal through unchanged (RateLimited, DomainDeleted...).
            ctx.log.event("oprf_refused", data_user=caller.name, error=exc.error,
                          status=exc.http_status)
            return JSONResponse({"error": exc.error, "detail": exc.detail},
                                status_code=exc.http_status)
        ctx.log.event("oprf_relayed", data_user=caller.name, points=len(body.points))
        return RelayedPoints(points=out["points"])

    return [router]


REGULATOR_OPRF_SERVICE = Service(
    name="oprf-relay",
    roles=(Role.REGULATOR,),
    routers=_relay_routes,
)
