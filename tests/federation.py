"""Helpers to run real node processes on free loopback ports in a temp dir."""

import socket
import time
import tomllib
from pathlib import Path

from parties.admin.api import ENROLL
from parties.runtime import pki, supervisor
from parties.runtime.request_ids import log_request_id, pair_key
from parties.runtime.state import StateDir
from parties.runtime.topology import Topology, load_topology

REPO = Path(__file__).resolve().parents[1]
SUZHOU = REPO / "topologies" / "suzhou.toml"


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def write_topology(dest: Path, nodes: list[str] | None = None) -> Path:
    """The Suzhou topology on free ports, optionally restricted to some nodes."""
    raw = tomllib.loads(SUZHOU.read_text())
    if nodes is not None:
        raw["nodes"] = [n for n in raw["nodes"] if n["name"] in nodes]
        keep = set(nodes)
        raw["flows"] = [
            f for f in raw["flows"]
            if (f["source"].startswith("role:") or f["source"] in keep)
            and (f["target"].startswith("role:") or f["target"] in keep)
        ]
    ports = iter(free_ports(2 * len(raw["nodes"])))
    for node in raw["nodes"]:
        node["port"] = next(ports)
        if "mpc_port" in node:
            node["mpc_port"] = next(ports)
    lines = [f'name = "{raw["name"]}"']
    for d in raw["domains"]:
        lines += ["[[domains]]", f'name = "{d["name"]}"']
    for n in raw["nodes"]:
        lines += ["[[nodes]]"] + [f'{k} = {v!r}'.replace("'", '"') for k, v in n.items()]
    for f in raw["flows"]:
        kinds = ", ".join(f'"{k}"' for k in f["kinds"])
        lines += ["[[flows]]", f'source = "{f["source"]}"', f'target = "{f["target"]}"',
                  f"kinds = [{kinds}]"]
    path = dest / "topology.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Federation:
    """Real node processes of a topology, started with the supervisor."""

    def __init__(self, root: Path, nodes: list[str] | None = None) -> None:
        self.state = StateDir(root / "state")
        self.topology_path = write_topology(root, nodes)
        self.topology: Topology = load_topology(self.topology_path)
        pki.init_federation(self.state, self.topology)

    def up(self) -> list[supervisor.NodeStatus]:
        rows = supervisor.up(self.state, self.topology, self.topology_path)
        bad = [r for r in rows if r.status != "ok"]
        if bad:
            logs = {r.name: self.state.node(r.name).stdout.read_text()[-2000:] for r in bad}
            raise RuntimeError(f"nodes failed to start: {bad}\n{logs}")
        if any(n.role.value == "operator" for n in self.topology.nodes):
            self.admin_login()
        return rows

    def admin_login(self, node: str = "operator") -> None:
        """Enroll the operator's second factor (once) and open an admin session."""
        from parties.admin.cli import login_with_saved_secret, secret_file
        from parties.runtime.client import NodeClient
        from parties.runtime.session_file import saved_session
        from parties.runtime.state import write_private

        token = saved_session(self.state.node(node))
        if token and int(token.split(".")[0]) > time.time() + 60:
            return

        if not secret_file(self.state, node).exists():
            with NodeClient(self.state, self.topology, node) as client:
                enrollment = client.call(node, ENROLL)
            write_private(secret_file(self.state, node), enrollment.secret.encode())
        login_with_saved_secret(self.state, self.topology, node)

    def down(self) -> dict[str, str]:
        return supervisor.down(self.state, self.topology, grace=5.0)

    def log_id(self, caller: str, target: str, request_id: str) -> str:
        return request_log_id(self.state, caller, target, request_id)


def request_log_id(state: StateDir, caller: str, target: str, request_id: str) -> str:
    """The id `target` knows `caller`'s `request_id` by (`parties.runtime.request_ids`)."""
    public = pki.federation_signing_keys(state, [target])[target]
    return log_request_id(pair_key(pki.load_signing_key(state, caller), public), request_id)
