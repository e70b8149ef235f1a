"""The agreements capability's contract: consents and contracts registered at the serving node.

The serving node (the regulator, which serves the product) keeps the consumers' signed
consents, which insurers register, and the parties' signed contracts and terminations;
every registration is recorded in the federation's log. The documents themselves and
their signatures are `governance.consent` and `governance.contracts`.
"""

from pydantic import BaseModel

from governance.consent import Consent, ConsentRevocation
from governance.contracts import ContractError, ContractTermination, SignedContract
from parties.runtime.routes import Kind, Route
from parties.runtime.topology import Role, Topology

SERVING_ROLE = Role.REGULATOR  # serves the product and owns it: it registers its contracts
DATA_OWNER_ROLE = Role.HOSPITAL  # each data owner takes a share of every bill
PACKAGE_RUN_SCENARIO = "package_run"
# Per scenario: the role of its data users, and of the node that serves it and appends its
# meters. A claim check is answered by the regulator for an insurer; a package is run by
# the data provider (the health authority) for the developer, the regulator.
DATA_USER_ROLES: dict[str, Role] = {"claim_check": Role.INSURER,
                                    PACKAGE_RUN_SCENARIO: Role.REGULATOR}
METERING_ROLES: dict[str, Role] = {"claim_check": Role.REGULATOR,
                                   PACKAGE_RUN_SCENARIO: Role.HEALTH_AUTHORITY}
# The roles every node of which must be a party to (so sign) each scenario's product
# contract, besides its data users: the product owner, the operator, the data provider
# and the data owners (each hospital, whose records the product answers from).
REQUIRED_SIGNATORY_ROLES: dict[str, tuple[Role, ...]] = {
    "claim_check": (Role.REGULATOR, Role.OPERATOR, Role.HEALTH_AUTHORITY, Role.HOSPITAL),
    PACKAGE_RUN_SCENARIO: (Role.REGULATOR, Role.OPERATOR, Role.HEALTH_AUTHORITY, Role.HOSPITAL),
}


class ContractSignatoriesMissing(ContractError):
    """The contract does not name every party its scenario requires, or names a data user
    that is not a data user's node."""

    http_status = 400


class DataOwnerShareMissing(ContractError):
    """A data owner party of the contract is given no share of its revenue."""

    http_status = 400


def required_signatories(topology: Topology, scenario: str) -> set[str]:
    """The nodes that must be parties to a product contract of `scenario`: every node of
    each required role (a federation lacking one of the roles can make no such contract)."""
    roles = REQUIRED_SIGNATORY_ROLES.get(scenario)
    if roles is None:
        raise ContractSignatoriesMissing(f"no product contract is defined for {scenario!r}")
    required = set()
    for role in roles:
        nodes = topology.nodes_with_role(role)
        if not nodes:
            raise ContractSignatoriesMissing(
                f"a {scenario} contract needs a {role.value} node to sign it; the federation "
                "has none")
        required.update(n.name for n in nodes)
    return required


def serving_node(topology: Topology) -> str:
    """The node that keeps the federation's consents and contracts."""
    return topology.node_of(SERVING_ROLE)


def metering_node(topology: Topology, scenario: str) -> str:
    """The node that serves `scenario`'s contracts: the only one whose meters are billed."""
    role = METERING_ROLES.get(scenario)
    if role is None:
        raise ContractSignatoriesMissing(f"no product contract is defined for {scenario!r}")
    return topology.node_of(role)


def package_output(package: str) -> str:
    """The output a package-run contract allows for the package named `package`."""
    return f"package.{package}"


class Registered(BaseModel):
    id: str
    status: str


# A consent is registered by the insurer it is given to, on the claim flow it serves.
REGISTER_CONSENT = Route("POST", "/v1/consents", Kind.CLAIM, Consent, Registered,
                         roles=(Role.INSURER,), tag="agreements")
REVOKE_CONSENT = Route("POST", "/v1/admin/consents/revocations", Kind.ADMIN, ConsentRevocation,
                       Registered, tag="agreements")
# The product owner registers its contracts (carrying the parties' signatures); only a
# contract's parties read it.
REGISTER_CONTRACT = Route("POST", "/v1/contracts", Kind.CONTRACT, SignedContract, Registered,
                          roles=(SERVING_ROLE,), tag="agreements")
CONTRACT = Route("GET", "/v1/contracts/{contract_id}", Kind.CONTRACT, None, SignedContract,
                 tag="agreements")
TERMINATE_CONTRACT = Route("POST", "/v1/contracts/{contract_id}/termination", Kind.CONTRACT,
                           ContractTermination, Registered, tag="agreements")
