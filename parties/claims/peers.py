"""The computing nodes of the claim check and how they reach each other.

The operator computes (it leads the secret-sharing sessions), the regulator serves the
product and follows, the health authority deals the correlated randomness. Calls between
them go through one long-lived mutual-TLS client per node process.
"""

from parties.runtime.client import NodeClient
from parties.runtime.context import NodeContext
from parties.runtime.topology import Role

PEER_TIMEOUT_S = 300.0  # one call computes a whole batch, up to `api.MAX_CLAIMS` claims


def node_client(ctx: NodeContext) -> NodeClient:
    """This node's client for calls between computing nodes (kept-alive connections, no
    handshake per call)."""
    return ctx.component(NodeClient, lambda: ctx.client(PEER_TIMEOUT_S))


def operator_node(ctx: NodeContext) -> str:
    return ctx.topology.node_of(Role.OPERATOR)


def session_nodes(ctx: NodeContext) -> tuple[str, str, str]:
    """(leader, follower, dealer) node names: operator, regulator, health authority."""
    topo = ctx.topology
    return (topo.node_of(Role.OPERATOR),
            topo.node_of(Role.REGULATOR),
            topo.node_of(Role.HEALTH_AUTHORITY))
