"""The regulator's step of the OPRF chain: it relays an authenticated insurer's blinded
points to the operator, naming that insurer as the data user.

    insurer: r·H(id)  ->  regulator (authenticates the insurer, relays, names it)
             ->  operator (asks the health authority for k1, applies k2 of the
                 insurer's shared domain)  ->  back;  insurer: r^-1·k2·k1·r·H(id) = T_d(id)

The regulator sees only blinded points. A refusal of the operator (`RateLimited`,
`DomainDeleted`, ...) propagates as its own typed error: the regulator answers with
the same name, status and detail and records the refusal. The insurer's side is
`parties.domains.client`; the operator's step is `parties.domains.service`.
"""

from fastapi import APIRouter

from parties.domains.api import DOMAIN_TOKENS, EVALUATE, OprfRequest, Points, RelayRequest
from parties.runtime.access import Caller
from parties.runtime.context import NodeContext
from parties.runtime.errors import RemoteError
from parties.runtime.mount import mount
from parties.runtime.service import Service
from parties.runtime.topology import Role


def _relay_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, DOMAIN_TOKENS)
    def relay(body: RelayRequest, caller: Caller) -> Points:
        """Relay an insurer's blinded points to the operator, naming the authenticated insurer."""
        operator = ctx.topology.node_of(Role.OPERATOR)
        try:
            with ctx.client() as client:
                out = client.call(operator, EVALUATE, OprfRequest(
                    scenario=body.scenario, data_user=caller.name, points=body.points))
        except RemoteError as exc:
            ctx.log.event("oprf_refused", data_user=caller.name, error=exc.error,
                          status=exc.http_status)
            raise
        ctx.log.event("oprf_relayed", data_user=caller.name, points=len(body.points))
        return out

    return [router]


REGULATOR_OPRF_SERVICE = Service(
    name="oprf-relay",
    roles=(Role.REGULATOR,),
    routers=_relay_routes,
)
