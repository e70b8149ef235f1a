"""The federation's topology: nodes, trust domains and the flows allowed between them.

A topology is configuration as data (a TOML file), validated on load. The same
format describes nodes on one laptop (loopback ports) or on several hosts.
"""

import ipaddress
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NODE_NAME = r"^[a-z][a-z0-9-]{0,62}$"


class Role(StrEnum):
    """The paper's roles, one behaviour each (docs/design.md section 2)."""

    HOSPITAL = "hospital"
    HEALTH_AUTHORITY = "health-authority"
    OPERATOR = "operator"
    REGULATOR = "regulator"
    INSURER = "insurer"


class Kind(StrEnum):
    """The kinds of request a topology flow allows (`kinds = [...]` in the topology file)."""

    PING = "ping"
    ADMIN = "admin"  # only the node itself (its local administrator)
    EXPORT = "export"
    INGEST = "ingest"
    OPRF = "oprf"
    MPC = "mpc"
    WITNESS = "witness"
    LEDGER = "ledger"
    PRODUCT = "product"
    CLAIM = "claim"
    CONTRACT = "contract"
    STATS = "stats"
    CATALOGUE = "catalogue"
    PACKAGE = "package"
    SAMPLE = "sample"
    # The log's public face (checkpoints, entries, proofs): any federation certificate may
    # read it, whatever the flows, so the insurer who pays and the hospitals who own the
    # data check the log themselves.
    TRANSPARENCY = "transparency"


class TopologyError(ValueError):
    """A topology file that cannot be read or does not validate; names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TrustDomain(_Strict):
    name: Annotated[str, Field(pattern=NODE_NAME)]
    description: str = ""


class NodeSpec(_Strict):
    name: Annotated[str, Field(pattern=NODE_NAME)]
    role: Role
    trust_domain: str = Field(alias="domain")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)]
    # The secret-sharing engine's own mutual-TLS listener (computing nodes and dealer).
    mpc_port: Annotated[int, Field(ge=1, le=65535)] | None = None

    @property
    def url(self) -> str:
        host = self.host
        try:
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass
        return f"https://{host}:{self.port}"


class Flow(_Strict):
    """`source` may call `target` for requests of the listed kinds.

    Endpoints are node names or `role:<role>` (every node of that role).
    """

    source: str
    target: str
    kinds: Annotated[list[Kind], Field(min_length=1)]


class Topology(_Strict):
    name: str
    # The file says `[[domains]]`: in a topology every domain is a trust domain.
    trust_domains: Annotated[list[TrustDomain], Field(min_length=1, alias="domains")]
    nodes: Annotated[list[NodeSpec], Field(min_length=1)]
    flows: list[Flow] = []

    @model_validator(mode="after")
    def _references_resolve(self) -> "Topology":
        domain_names = [d.name for d in self.trust_domains]
        if len(set(domain_names)) != len(domain_names):
            raise ValueError("domains: names must be unique")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError("nodes: names must be unique")
        addresses = [(n.host, n.port) for n in self.nodes] + [
            (n.host, n.mpc_port) for n in self.nodes if n.mpc_port is not None
        ]
        if len(set(addresses)) != len(addresses):
            raise ValueError("nodes: two nodes share a host and port")
        for i, node in enumerate(self.nodes):
            if node.trust_domain not in domain_names:
                raise ValueError(
                    f"nodes.{i}.domain: unknown trust domain {node.trust_domain!r}")
        roles = {r.value for r in Role}
        for i, flow in enumerate(self.flows):
            for side in ("source", "target"):
                ref = getattr(flow, side)
                if ref.startswith("role:"):
                    if ref[5:] not in roles:
                        raise ValueError(f"flows.{i}.{side}: unknown role {ref[5:]!r}")
                elif ref not in names:
                    raise ValueError(f"flows.{i}.{side}: unknown node {ref!r}")
        return self

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node named {name!r} in topology {self.name!r}")

    def has_node(self, name: str) -> bool:
        return any(n.name == name for n in self.nodes)

    def nodes_with_role(self, role: Role) -> list[NodeSpec]:
        return [n for n in self.nodes if n.role == role]

    def node_of(self, role: Role) -> str:
        """The name of the (first) node of `role`: the serving node of a one-node role."""
        for node in self.nodes:
            if node.role == role:
                return node.name
        raise KeyError(f"topology {self.name!r} has no {role.value} node")

    def allows(self, source: str, target: str, kind: str) -> bool:
        """Whether the topology lets node `source` call node `target` for `kind`."""
        if not (self.has_node(source) and self.has_node(target)):
            return False
        if kind == Kind.TRANSPARENCY:
            return True
        src, dst = self.node(source), self.node(target)
        return any(
            _matches(flow.source, src) and _matches(flow.target, dst) and kind in flow.kinds
            for flow in self.flows
        )


def _matches(ref: str, node: NodeSpec) -> bool:
    return ref == f"role:{node.role.value}" if ref.startswith("role:") else ref == node.name


def load_topology(path: Path | str) -> Topology:
    """Read and validate a topology TOML file; errors name the offending field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TopologyError(f"{path}: no such topology file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Topology.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise TopologyError(f"{path}: {problems}") from exc
