"""`python -m parties.node_main`: the process `cogov up` starts for each node."""

import argparse
from pathlib import Path

from parties.server import serve_node
from parties.state import StateDir
from parties.topology import load_topology


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one cogov node.")
    parser.add_argument("--name", required=True)
    parser.add_argument("--topology", required=True, type=Path)
    parser.add_argument("--state", required=True, type=Path)
    args = parser.parse_args()
    serve_node(StateDir(args.state), load_topology(args.topology), args.name)


if __name__ == "__main__":
    main()
