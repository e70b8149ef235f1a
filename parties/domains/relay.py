"""The regulator's step of the OPRF chain: it relays an authenticated insurer's signed
batch of blinded points to the operator.

    insurer: B = r·H(id), signed  ->  regulator (the caller must be the insurer who signed)
             ->  operator (Z' = k2·B of the signing insurer's shared domain, then asks the
                 health authority for Z = k1·Z'; both steps proven)  ->  back;
    insurer: checks both proofs, r^-1·Z = k1·k2·H(id) = T_d(id)

The regulator sees only blinded points and cannot name a data user: the batch names the
insurer who signed it, and the regulator relays it only for that insurer's own mTLS
connection. A refusal of the operator or the authority (`OprfBudgetSpent`,
`BatchReplayed`, `DomainDeleted`, ...) propagates as its own typed error: the regulator
answers with the same name, status and detail and records the refusal. The insurer's
side is `parties.domains.client`; the operator's step is `parties.domains.service`.
"""

from fastapi import APIRouter

from parties.domains.api import (
    DOMAIN_TOKENS,
    EVALUATE,
    BatchSignatureInvalid,
    EvaluatedBatch,
    SignedBatch,
)
from parties.domains.batch import insurer_keys, verify_batch
from parties.runtime.access import Caller
from parties.runtime.context import NodeContext
from parties.runtime.errors import RemoteError
from parties.runtime.mount import mount
from parties.runtime.service import Service
from parties.runtime.topology import Role


def _relay_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, DOMAIN_TOKENS)
    def relay(body: SignedBatch, caller: Caller) -> EvaluatedBatch:
        """Relay the calling insurer's signed batch of blinded points to the operator."""
        if body.data_user != caller.name:
            ctx.log.event("oprf_refused", data_user=caller.name, named=body.data_user,
                          error="BatchSignatureInvalid")
            raise BatchSignatureInvalid(
                f"{caller.name} relays only its own batches, not {body.data_user}'s")
        verify_batch(body, insurer_keys(ctx))
        operator = ctx.topology.node_of(Role.OPERATOR)
        try:
            with ctx.client() as client:
                out = client.call(operator, EVALUATE, body)
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
