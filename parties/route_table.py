"""The route x role table, generated from the code (each route's CallerPolicy).

`cogov docs routes` writes it to `docs/routes.md`; a test fails when the file
is stale, so the published table is always the enforced one.
"""

import tempfile
from pathlib import Path

from parties.capabilities import services_for
from parties.node import open_node
from parties.runtime import pki
from parties.runtime.access import route_policies
from parties.runtime.app import build_node_app
from parties.runtime.state import StateDir
from parties.runtime.topology import Role, Topology, load_topology

HEADER = """# Routes and who may call them

Generated from the code by `cogov docs routes` (do not edit). Each route
declares the kind of request it serves and the roles that may call it; the
node also requires the topology to allow a flow of that kind from the caller
to itself. `self` means only the node's own local administrator (its own
certificate); on the operator, admin routes also need a second factor
(`cogov admin login`).
"""


def route_rows(topology: Topology) -> list[tuple[str, str, str, str, str]]:
    """(hosting role, method, path, kind, callers) for every guarded route."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        state = StateDir(Path(tmp))
        pki.init_federation(state, topology)
        for role in Role:
            nodes = topology.nodes_with_role(role)
            if not nodes:
                continue
            ctx = open_node(state, topology, nodes[0].name)
            try:
                app = build_node_app(ctx, [r for s in services_for(role) for r in s.routers(ctx)])
                for method, path, policy in route_policies(app.routes):
                    rows.append((role.value, method, path, policy.kind,
                                 ", ".join(policy.describe_roles())))
            finally:
                ctx.store.close()
    return rows


def render_route_table(topology: Topology) -> str:
    lines = [HEADER, "| node role | method | path | kind | callers |",
             "|---|---|---|---|---|"]
    lines += [f"| {r} | {m} | `{p}` | {k} | {c} |" for r, m, p, k, c in route_rows(topology)]
    return "\n".join(lines) + "\n"


def default_table() -> str:
    return render_route_table(
        load_topology(Path(__file__).resolve().parents[1] / "topologies" / "suzhou.toml")
    )
