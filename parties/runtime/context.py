"""What a role behaviour sees of the node it runs in.

Role code (what a hospital does) is written against this context and never
against the server, so the same behaviour runs under any runtime.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from parties.runtime.client import DEFAULT_TIMEOUT_S, NodeClient
from parties.runtime.node_log import NodeLog
from parties.runtime.pki import federation_signing_keys, load_signing_key
from parties.runtime.secrets import NodeSecrets
from parties.runtime.state import NodePaths, StateDir
from parties.runtime.store import NodeStore
from parties.runtime.topology import NodeSpec, Topology

T = TypeVar("T")


@dataclass
class NodeContext:
    name: str
    topology: Topology
    state: StateDir
    store: NodeStore
    log: NodeLog
    # One object per type for the node's lifetime (see `component`), and per thread.
    _components: dict[type, object] = field(default_factory=dict, repr=False)
    _thread_local: threading.local = field(default_factory=threading.local, repr=False)
    _components_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def spec(self) -> NodeSpec:
        return self.topology.node(self.name)

    @property
    def paths(self) -> NodePaths:
        return self.state.node(self.name)

    def component(self, cls: type[T], factory: Callable[[], T] | None = None) -> T:
        """This node's one `cls` (made by `factory`, default `cls(self)`, on first use).

        Capabilities keep their long-lived per-node objects (a log, a session host,
        a cache) here, each under its own type, so a lookup is typed and never guessed.
        """
        found = self._components.get(cls)
        if found is None:
            with self._components_lock:
                found = self._components.get(cls)
                if found is None:
                    found = factory() if factory is not None else cls(self)  # type: ignore[call-arg]
                    self._components[cls] = found
        return found  # type: ignore[return-value]

    def close(self) -> None:
        """Close every component that can be closed (worker pools, connections), then the store."""
        for found in self._components.values():
            close = getattr(found, "close", None)
            if callable(close):
                close()
        self.store.close()

    def per_thread(self, cls: type[T], factory: Callable[[], T]) -> T:
        """One `factory()` result per thread and type: for objects holding a SQLite
        connection, which must not run two transactions at once from two request threads."""
        found = self._thread_local.__dict__.get(cls)
        if found is None:
            found = self._thread_local.__dict__[cls] = factory()
        return found

    @cached_property
    def signing_key(self) -> Ed25519PrivateKey:
        """This node's Ed25519 signing key (log entries, approvals, signatures)."""
        return load_signing_key(self.state, self.name)

    def signing_public_keys(self) -> dict[str, bytes]:
        """Every node's CA-certified signing public key, by node name."""
        return self._signing_public_keys

    @cached_property
    def _signing_public_keys(self) -> dict[str, bytes]:
        return federation_signing_keys(self.state, [n.name for n in self.topology.nodes])

    @cached_property
    def secrets(self) -> NodeSecrets:
        """The node's KEK-protected keys (data keys, xID keys)."""
        return NodeSecrets(self.paths, self.store)

    def client(self, timeout: float | None = None) -> NodeClient:
        """A mutual-TLS client that calls other nodes as this node (default timeout if None)."""
        return NodeClient(self.state, self.topology, self.name, log=self.log,
                          timeout=timeout or DEFAULT_TIMEOUT_S)
