"""What a role behaviour sees of the node it runs in.

Role code (what a hospital does) is written against this context and never
against the server, so the same behaviour runs under any runtime.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from parties.node_log import NodeLog
from parties.state import NodePaths, StateDir
from parties.store import NodeStore
from parties.topology import NodeSpec, Topology

if TYPE_CHECKING:
    from parties.client import NodeClient


@dataclass
class NodeContext:
    name: str
    topology: Topology
    state: StateDir
    store: NodeStore
    log: NodeLog
    extras: dict[str, object] = field(default_factory=dict)

    @property
    def spec(self) -> NodeSpec:
        return self.topology.node(self.name)

    @property
    def paths(self) -> NodePaths:
        return self.state.node(self.name)

    def client(self) -> "NodeClient":
        """A mutual-TLS client that calls other nodes as this node."""
        from parties.client import NodeClient

        return NodeClient(self.state, self.topology, self.name, log=self.log)
