"""What a role behaviour sees of the node it runs in.

Role code (what a hospital does) is written against this context and never
against the server, so the same behaviour runs under any runtime.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from parties.runtime.node_log import NodeLog
from parties.runtime.pki import federation_signing_keys, load_signing_key
from parties.runtime.secrets import NodeSecrets
from parties.runtime.state import NodePaths, StateDir
from parties.runtime.store import NodeStore
from parties.runtime.topology import NodeSpec, Topology

if TYPE_CHECKING:
    from parties.runtime.client import NodeClient

T = TypeVar("T")


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

    def per_thread(self, key: str, factory: Callable[[], T]) -> T:
        """One `factory()` result per thread: for objects holding a SQLite connection,
        which must not run two transactions at once from two request threads."""
        local = self.extras.setdefault(f"per_thread:{key}", threading.local())
        assert isinstance(local, threading.local)
        found = getattr(local, "value", None)
        if found is None:
            found = local.value = factory()
        return found

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        """This node's Ed25519 signing key (log entries, approvals, signatures)."""
        key = self.extras.get("signing_key")
        if key is None:
            key = self.extras["signing_key"] = load_signing_key(self.state, self.name)
        assert isinstance(key, Ed25519PrivateKey)
        return key

    def signing_public_keys(self) -> dict[str, bytes]:
        """Every node's CA-certified signing public key, by node name."""
        keys = self.extras.get("signing_public_keys")
        if keys is None:
            names = [n.name for n in self.topology.nodes]
            keys = self.extras["signing_public_keys"] = federation_signing_keys(self.state, names)
        assert isinstance(keys, dict)
        return keys

    @property
    def secrets(self) -> NodeSecrets:
        """The node's KEK-protected keys (data keys, xID keys)."""
        secrets = self.extras.get("secrets")
        if secrets is None:
            secrets = self.extras["secrets"] = NodeSecrets(self.paths, self.store)
        assert isinstance(secrets, NodeSecrets)
        return secrets

    def client(self, timeout: float | None = None) -> "NodeClient":
        """A mutual-TLS client that calls other nodes as this node (default timeout if None)."""
        from parties.runtime.client import DEFAULT_TIMEOUT_S, NodeClient

        return NodeClient(self.state, self.topology, self.name, log=self.log,
                          timeout=timeout or DEFAULT_TIMEOUT_S)
