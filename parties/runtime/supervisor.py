"""Start, watch and stop the nodes of a topology on this machine.

Each node runs as its own process in its own session (process group), so
stopping a node also stops anything it started. PIDs live in the state dir;
starting twice does not start second copies.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from parties.runtime.api import HEALTH
from parties.runtime.client import NodeClient
from parties.runtime.errors import NodeError
from parties.runtime.state import StateDir
from parties.runtime.topology import Topology


@dataclass(frozen=True)
class NodeStatus:
    name: str
    role: str
    trust_domain: str
    url: str
    pid: int | None
    status: str


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def running_pid(state: StateDir, name: str) -> int | None:
    """The PID of node `name` if its process is alive, else None (stale files removed)."""
    pid_file = state.node(name).pid
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if _alive(pid):
        return pid
    pid_file.unlink(missing_ok=True)
    return None


def start_node(state: StateDir, topology_path: Path, name: str) -> int:
    """Start node `name` unless it already runs; return its PID."""
    pid = running_pid(state, name)
    if pid is not None:
        return pid
    paths = state.node(name)
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.stdout, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "parties.node", "--name", name,
             "--topology", str(topology_path), "--state", str(state.root)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # Written by the parent too, so a second `up` sees the node before it has booted.
    paths.pid.write_text(str(proc.pid))
    return proc.pid


def probe(state: StateDir, topology: Topology, name: str, timeout: float = 2.0) -> str:
    """Ask node `name` for its health over mutual TLS, as itself."""
    try:
        with NodeClient(state, topology, name, timeout=timeout) as client:
            return client.call(name, HEALTH).status
    except NodeError as exc:
        return f"down ({type(exc).__name__})"


def wait_healthy(
    state: StateDir, topology: Topology, names: list[str], timeout: float = 60.0
) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    result = {n: "starting" for n in names}
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            if running_pid(state, name) is None:
                result[name] = "exited (see node.out)"
                pending.discard(name)
                continue
            status = probe(state, topology, name, timeout=1.0)
            if status == "ok":
                result[name] = "ok"
                pending.discard(name)
        if pending:
            time.sleep(0.2)
    return result


def up(
    state: StateDir, topology: Topology, topology_path: Path, names: list[str] | None = None
) -> list[NodeStatus]:
    names = names or [n.name for n in topology.nodes]
    for name in names:
        start_node(state, topology_path, name)
    wait_healthy(state, topology, names)
    return status(state, topology, names)


def status(
    state: StateDir, topology: Topology, names: list[str] | None = None
) -> list[NodeStatus]:
    rows = []
    for name in names or [n.name for n in topology.nodes]:
        spec = topology.node(name)
        pid = running_pid(state, name)
        health = probe(state, topology, name) if pid is not None else "stopped"
        rows.append(NodeStatus(name, spec.role.value, spec.trust_domain, spec.url, pid, health))
    return rows


def stop_node(state: StateDir, name: str, grace: float = 10.0) -> str:
    """SIGTERM the node's process group, then SIGKILL after `grace` seconds."""
    pid = running_pid(state, name)
    if pid is None:
        return "not running"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.1)
    outcome = "stopped"
    if _group_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        outcome = "killed"
    _reap(pid)
    state.node(name).pid.unlink(missing_ok=True)
    return outcome


def _group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().split(") ", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def down(
    state: StateDir, topology: Topology, names: list[str] | None = None, grace: float = 10.0
) -> dict[str, str]:
    names = names or [n.name for n in topology.nodes]
    return {name: stop_node(state, name, grace) for name in names}
