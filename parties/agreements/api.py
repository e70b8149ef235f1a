"""The agreements capability's contract: consents and contracts registered at the serving node.

The serving node (the regulator, which serves the product) keeps the consumers' signed
consents, which insurers register, and the parties' signed contracts and terminations;
every registration is recorded in the federation's log. The documents themselves and
their signatures are `governance.consent` and `governance.contracts`.
"""

from pydantic import BaseModel

from governance.consent import Consent, ConsentRevocation
from governance.contracts import ContractTermination, SignedContract
from parties.runtime.routes import Kind, Route
from parties.runtime.topology import Role, Topology

SERVING_ROLE = Role.REGULATOR


def serving_node(topology: Topology) -> str:
    """The node that keeps the federation's consents and contracts."""
    return topology.node_of(SERVING_ROLE)


class Registered(BaseModel):
    id: str
    status: str


# A consent is registered by the insurer it is given to, on the claim flow it serves.
REGISTER_CONSENT = Route("POST", "/v1/consents", Kind.CLAIM, Consent, Registered,
                         roles=(Role.INSURER,), tag="agreements")
REVOKE_CONSENT = Route("POST", "/v1/admin/consents/revocations", Kind.ADMIN, ConsentRevocation,
                       Registered, tag="agreements")
REGISTER_CONTRACT = Route("POST", "/v1/contracts", Kind.CONTRACT, SignedContract, Registered,
                          tag="agreements")
CONTRACT = Route("GET", "/v1/contracts/{contract_id}", Kind.CONTRACT, None, SignedContract,
                 tag="agreements")
TERMINATE_CONTRACT = Route("POST", "/v1/contracts/{contract_id}/termination", Kind.CONTRACT,
                           ContractTermination, Registered, tag="agreements")
