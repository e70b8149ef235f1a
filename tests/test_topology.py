"""Topology files are validated on load; errors name the offending field."""

import pytest

from parties.runtime.topology import Role, TopologyError, load_topology
from tests.federation import SUZHOU

VALID = """
name = "t"
[[domains]]
name = "health-net"
[[domains]]
name = "gov-net"
[[nodes]]
name = "hospital-1"
role = "hospital"
domain = "health-net"
port = 41001
[[nodes]]
name = "operator"
role = "operator"
domain = "gov-net"
port = 41002
[[flows]]
source = "role:hospital"
target = "operator"
kinds = ["ping"]
"""


def _load(tmp_path, text):
    path = tmp_path / "t.toml"
    path.write_text(text)
    return load_topology(path)


def test_reference_topology_has_the_eight_nodes_in_three_domains():
    topo = load_topology(SUZHOU)
    assert [n.name for n in topo.nodes] == [
        "hospital-1", "hospital-2", "hospital-3", "health-authority",
        "operator", "regulator", "insurer-a", "insurer-b",
    ]
    assert {d.name for d in topo.trust_domains} == {"health-net", "gov-net", "insurance-net"}
    assert topo.allows("health-authority", "operator", "ingest")
    assert not topo.allows("hospital-1", "insurer-a", "ping")
    assert not topo.allows("insurer-a", "health-authority", "oprf")
    assert len(topo.nodes_with_role(Role.HOSPITAL)) == 3


def test_valid_minimal_topology_loads(tmp_path):
    topo = _load(tmp_path, VALID)
    assert topo.allows("hospital-1", "operator", "ping")
    assert not topo.allows("operator", "hospital-1", "ping")


@pytest.mark.parametrize(
    ("broken", "field"),
    [
        (VALID.replace('role = "hospital"', 'role = "bakery"'), "nodes.0.role"),
        (VALID.replace("port = 41001", "port = 70000"), "nodes.0.port"),
        (VALID.replace('port = 41001', 'port = "x"'), "nodes.0.port"),
        (VALID.replace('domain = "gov-net"', 'domain = "moon-net"'), "nodes.1.domain"),
        (VALID.replace('target = "operator"', 'target = "nobody"'), "flows.0.target"),
        (VALID.replace('source = "role:hospital"', 'source = "role:baker"'), "flows.0.source"),
        (VALID.replace('kinds = ["ping"]', "kinds = []"), "flows.0.kinds"),
        (VALID.replace('name = "operator"', 'name = "Operator!"'), "nodes.1.name"),
        (VALID + '\nsurprise = 1\n', "surprise"),
        (VALID.replace('name = "t"\n', ""), "name"),
        (VALID.replace("port = 41002", "port = 41001"), "share a host and port"),
    ],
)
def test_invalid_topology_names_the_field(tmp_path, broken, field):
    with pytest.raises(TopologyError) as err:
        _load(tmp_path, broken)
    assert field in str(err.value)


def test_unreadable_toml_is_a_topology_error(tmp_path):
    with pytest.raises(TopologyError, match="not valid TOML"):
        _load(tmp_path, "name = [")
    with pytest.raises(TopologyError, match="no such topology"):
        load_topology(tmp_path / "missing.toml")
