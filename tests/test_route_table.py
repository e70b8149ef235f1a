"""The published route x role table is the one the code enforces."""

from pathlib import Path

from parties.route_table import default_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "routes.md"


def test_every_route_declares_its_callers_and_the_doc_is_current():
    table = default_table()
    assert "`/v1/ledger/entries` | ledger | health-authority, regulator" in table
    assert DOC.read_text() == table, "docs/routes.md is stale: run `cogov docs routes`"


def test_topology_picture_is_current():
    from parties.runtime.topology import load_topology
    from parties.runtime.topology_diagram import render_svg

    repo = DOC.parents[1]
    svg = render_svg(load_topology(repo / "topologies" / "suzhou.toml"))
    assert (repo / "docs" / "topology.svg").read_text() == svg, (
        "docs/topology.svg is stale: run `cogov docs topology`"
    )
