"""A node with its role's capabilities: `python -m parties.node` is the process `cogov up`
starts for each node."""

import argparse
from pathlib import Path

from parties.capabilities import services_for
from parties.runtime import server
from parties.runtime.context import NodeContext
from parties.runtime.state import StateDir
from parties.runtime.topology import Topology, load_topology


def open_node(state: StateDir, topology: Topology, name: str) -> NodeContext:
    """The context of node `name` with its role's capabilities: store migrated, log open."""
    return server.open_node(state, topology, name, services_for(topology.node(name).role))


def serve_node(state: StateDir, topology: Topology, name: str) -> None:
    """Serve node `name` with its role's capabilities until SIGTERM/SIGINT."""
    server.serve_node(state, topology, name, services_for(topology.node(name).role))


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one cogov node.")
    parser.add_argument("--name", required=True)
    parser.add_argument("--topology", required=True, type=Path)
    parser.add_argument("--state", required=True, type=Path)
    args = parser.parse_args()
    serve_node(StateDir(args.state), load_topology(args.topology), args.name)


if __name__ == "__main__":
    main()
