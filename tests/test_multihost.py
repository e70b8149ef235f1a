"""Each node on its own "host": a Linux network namespace with its own IP.

The test builds a private /24 inside namespaces it creates: a switch namespace
holding a bridge, and per node a namespace joined to the bridge by a veth pair.
Nothing is added to the root namespace; the test process itself cannot reach
the nodes, so every driving action runs inside a node's namespace with
`ip netns exec`. The topology file names the nodes by those IPs and the PKI
issues certificates with the IPs as subjectAltNames. Then, across the
namespaces: ping, log appends countersigned by both witnesses and verified
offline, a flow the topology forbids (refused and logged), and the claim
check end to end. Namespaces and processes are removed even on failure.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import tomllib
import types
from pathlib import Path

import pytest

from parties.runtime import pki
from parties.runtime.state import StateDir
from parties.runtime.topology import load_topology
from tests.attack_helpers import events, wait_for
from tests.federation import REPO, SUZHOU, request_log_id

pytestmark = pytest.mark.slow

NODES = ["hospital-1", "hospital-2", "hospital-3", "health-authority", "operator",
         "regulator", "insurer-a", "insurer-b"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"cgvprobe{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"`ip netns add` is not possible here: {exc}"
    return None


class Hosts:
    """A bridge in a switch namespace and one namespace per node on a private /24."""

    def __init__(self, names: list[str]) -> None:
        self.tag = f"{random.randrange(16**4):04x}"
        self.subnet = f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}"
        self.switch = f"cgvsw{self.tag}"
        self.ns = {name: f"cgv{self.tag}n{i}" for i, name in enumerate(names)}
        self.ip = {name: f"{self.subnet}.{10 + i}" for i, name in enumerate(names)}
        self.created: list[str] = []

    def build(self) -> None:
        _run("ip", "netns", "add", self.switch)
        self.created.append(self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i, (name, ns) in enumerate(self.ns.items()):
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            inner, outer = f"cv{self.tag}{i}a", f"cv{self.tag}{i}b"
            _run("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
            _run("ip", "link", "set", inner, "netns", ns)
            _run("ip", "link", "set", outer, "netns", self.switch)
            _run("ip", "-n", self.switch, "link", "set", outer, "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.ip[name]}/24", "dev", inner)
            _run("ip", "-n", ns, "link", "set", inner, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def remove(self) -> None:
        for ns in reversed(self.created):  # deleting a namespace deletes its veth ends
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60)
        self.created.clear()

    def exec(self, name: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[name], *argv]


def _topology(path: Path, hosts: Hosts) -> Path:
    raw = tomllib.loads(SUZHOU.read_text())
    lines = [f'name = "{raw["name"]}-netns"']
    for d in raw["domains"]:
        lines += ["[[domains]]", f'name = "{d["name"]}"']
    for n in raw["nodes"]:
        n["host"] = hosts.ip[n["name"]]
        lines += ["[[nodes]]"] + [f"{k} = {json.dumps(v)}" for k, v in n.items()]
    for f in raw["flows"]:
        lines += ["[[flows]]", f"source = {json.dumps(f['source'])}",
                  f"target = {json.dumps(f['target'])}", f"kinds = {json.dumps(f['kinds'])}"]
    path.write_text("\n".join(lines) + "\n")
    return path


DRIVER = textwrap.dedent('''
    """Driving actions run inside one node's network namespace; prints one JSON line."""
    import json, sys, types
    from pathlib import Path
    from parties.runtime.state import StateDir
    from parties.runtime.topology import load_topology

    action, args = sys.argv[1], json.loads(sys.argv[2])
    state, topo = StateDir(Path(args["state"])), load_topology(Path(args["topology"]))

    def out(value):
        print(json.dumps(value, default=str))

    if action == "wait":
        from parties.runtime.supervisor import wait_healthy
        out(wait_healthy(state, topo, [n.name for n in topo.nodes], timeout=120))
    elif action == "login":
        from tests.federation import Federation
        Federation.admin_login(types.SimpleNamespace(state=state, topology=topo))
        out("ok")
    elif action == "ping":
        from parties.runtime.api import PING
        from parties.runtime.client import NodeClient
        from parties.runtime.errors import NodeError
        try:
            with NodeClient(state, topo, args["source"]) as client:
                r = client.send(args["target"], PING,
                                check_flow=args.get("check_flow", True),
                                headers={"X-Request-ID": args["rid"]})
                stream = r.extensions["network_stream"]
                out({"status": r.status_code, "body": r.json(),
                     "local": stream.get_extra_info("client_addr")[0],
                     "remote": stream.get_extra_info("server_addr")[0]})
        except NodeError as exc:
            out({"status": exc.http_status, "error": getattr(exc, "error", type(exc).__name__)})
    elif action == "record":
        from parties.node import open_node
        from parties.ledger.client import append_entry
        ctx = open_node(state, topo, args["node"])
        for i in range(args["count"]):
            append_entry(ctx, "data_registered", {"dataset": f"netns-{i}", "rows": i})
        ctx.store.close()
        out("ok")
    elif action == "cli":
        from typer.testing import CliRunner
        from scenarios.cli import app
        result = CliRunner().invoke(app, [*args["argv"], "--state", str(state.root),
                                          "--topology", args["topology"]])
        out({"exit_code": result.exit_code, "output": result.output})
    elif action == "claims":
        from tests.attack_helpers import ClaimWorld
        fed = types.SimpleNamespace(state=state, topology=topo,
                                    topology_path=Path(args["topology"]))
        world = ClaimWorld.attach(fed, Path(args["data"]))
        world.ingest()
        world.sign_contracts()
        claims = world.claims_of("insurer-a", 6)
        consents = {nid: world.consent(nid) for nid in claims["national_id"]}
        with world.client() as client:
            client.register_consents(consents.values())
            verdicts = client.check(claims, consents, "ss", request_id=args["rid"])
        out(verdicts.astype(str).to_dict("records"))
''')


@pytest.fixture(scope="module")
def netns(tmp_path_factory):
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("netns")
    hosts = Hosts(NODES)
    procs: list[subprocess.Popen] = []
    try:
        hosts.build()
        topology_path = _topology(root / "topology.toml", hosts)
        topology = load_topology(topology_path)
        state = StateDir(root / "state")
        pki.init_federation(state, topology)
        driver = root / "driver.py"
        driver.write_text(DRIVER)
        python = str(REPO / ".venv" / "bin" / "python")
        if not Path(python).exists():
            python = sys.executable
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for name in NODES:
            paths = state.node(name)
            with open(paths.stdout, "ab") as log:
                procs.append(subprocess.Popen(
                    hosts.exec(name, python, "-m", "parties.node", "--name", name,
                               "--topology", str(topology_path), "--state", str(state.root)),
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, cwd=REPO, env=env))
            # `ip netns exec` execs the node in place: the PID is the node's, as the
            # supervisor records it.
            paths.pid.write_text(str(procs[-1].pid))

        def drive(where: str, action: str, **args) -> object:
            args = {"state": str(state.root), "topology": str(topology_path), **args}
            done = subprocess.run(
                hosts.exec(where, python, str(driver), action, json.dumps(args)),
                capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
            assert done.returncode == 0, done.stderr[-3000:]
            return json.loads(done.stdout.strip().splitlines()[-1])

        health = drive("operator", "wait")
        assert set(health.values()) == {"ok"}, {
            n: state.node(n).stdout.read_text()[-1500:] for n, s in health.items() if s != "ok"}
        assert drive("operator", "login") == "ok"
        yield types.SimpleNamespace(hosts=hosts, state=state, topology=topology,
                              topology_path=topology_path, drive=drive, root=root)
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        hosts.remove()


def test_nodes_are_on_separate_hosts(netns):
    hosts = netns.hosts
    # From the root namespace the private /24 is unreachable: the nodes are elsewhere.
    with pytest.raises(OSError):
        socket.create_connection((hosts.ip["operator"], netns.topology.node("operator").port),
                                 timeout=2).close()
    listed = _run("ip", "netns", "list").stdout
    assert all(ns in listed for ns in hosts.ns.values())
    cert = pki.load_certificate(netns.state.node("operator").cert)
    from cryptography import x509

    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert hosts.ip["operator"] in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]


def test_ping_crosses_hosts_over_mutual_tls(netns):
    result = netns.drive("health-authority", "ping", source="health-authority",
                         target="operator", rid="netns-ping-1")
    assert result["status"] == 200
    assert result["body"]["caller"] == "health-authority"
    assert result["local"] == netns.hosts.ip["health-authority"]
    assert result["remote"] == netns.hosts.ip["operator"]


def test_log_appends_are_witnessed_and_verify_across_hosts(netns):
    assert netns.drive("health-authority", "record", node="health-authority", count=4) == "ok"
    assert netns.drive("regulator", "record", node="regulator", count=2) == "ok"
    verified = netns.drive("operator", "cli", argv=["ledger", "verify"])
    assert verified["exit_code"] == 0, verified["output"]
    assert "log verified" in verified["output"]
    assert "health-authority" in verified["output"] and "regulator" in verified["output"]


def test_flow_the_topology_forbids_is_blocked_across_hosts(netns):
    fed = types.SimpleNamespace(state=netns.state)
    result = netns.drive("hospital-1", "ping", source="hospital-1", target="insurer-a",
                         check_flow=False, rid="netns-forbidden-1")
    assert result == {"status": 403, "error": "FlowNotAllowed"}
    local = netns.drive("hospital-1", "ping", source="hospital-1", target="insurer-a",
                        rid="netns-forbidden-2")
    assert local["error"] == "FlowNotAllowed"  # refused before it leaves the hospital
    first, second = (request_log_id(netns.state, "hospital-1", "insurer-a", f"netns-forbidden-{i}")
                     for i in (1, 2))
    refused = wait_for(lambda: [
        e for e in events(fed, "insurer-a", "refused") if e["request_id"] == first])
    assert refused and refused[0]["error"] == "FlowNotAllowed"
    assert not [e for e in events(fed, "insurer-a", "request") if e["request_id"] == second]


def test_claim_check_runs_across_hosts(netns):
    from scenarios.claim_check.generator import generate

    data = netns.root / "data"
    generate(data, patients=150, claims=24, seed=5, progress=False)
    verdicts = netns.drive("insurer-a", "claims", data=str(data), rid="netns-claims-1")
    import pandas as pd

    truth = pd.read_csv(data / "ground_truth" / "claims_truth.csv", dtype=str)
    truth = truth.set_index("claim_id")
    assert len(verdicts) == 6
    for row in verdicts:
        for column in ("visit_found", "amount_consistent", "diagnosis_covered"):
            assert row[column].lower() == truth.at[row["claim_id"], column]
    answered = [e for e in events(types.SimpleNamespace(state=netns.state), "regulator",
                                  "claims_answered")
                if e["request_id"] == request_log_id(netns.state, "insurer-a", "regulator",
                                              "netns-claims-1")]
    assert answered
