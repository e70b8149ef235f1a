"""Draw a topology as SVG: trust domains as columns, nodes as boxes, flows as arrows.

`cogov docs topology` writes `docs/topology.svg` from `topologies/suzhou.toml`,
so the picture in the README is the topology the nodes enforce.
"""

from html import escape

from parties.runtime.topology import NodeSpec, Topology

BOX_W, BOX_H, GAP_Y, COL_W, MARGIN, TOP = 196, 44, 34, 330, 30, 90
DOMAIN_COLOURS = ("#e8f1fb", "#eef7ea", "#fbf1e6", "#f3ecf8")


def _layout(topology: Topology) -> dict[str, tuple[float, float]]:
    spots = {}
    for col, domain in enumerate(topology.trust_domains):
        # Gateways (non-hospital roles) first, so arrows between domains stay short.
        members = sorted(
            (n for n in topology.nodes if n.trust_domain == domain.name),
            key=lambda n: n.role.value == "hospital",
        )
        for row, node in enumerate(members):
            x = MARGIN + col * COL_W + (COL_W - BOX_W) / 2 - 20
            spots[node.name] = (x, TOP + row * (BOX_H + GAP_Y))
    return spots


def _endpoints(ref: str, topology: Topology) -> list[NodeSpec]:
    if ref.startswith("role:"):
        return [n for n in topology.nodes if n.role.value == ref[5:]]
    return [topology.node(ref)]


def _arrow(src: tuple[float, float], dst: tuple[float, float]) -> str:
    (x1, y1), (x2, y2) = src, dst
    if abs(x2 - x1) < 1:  # same domain column: a curve on the right-hand side
        sx = tx = x1 + BOX_W
        sy, ty = y1 + BOX_H * 0.5, y2 + BOX_H * 0.5
        bend = sx + 30 + abs(ty - sy) * 0.12
        return (f'<path d="M{sx},{sy} C{bend},{sy} {bend},{ty} {tx},{ty}" fill="none" '
                f'stroke="#777" marker-end="url(#arrow)"/>')
    forward = x2 > x1
    # Offset the two directions of a pair so both arrows stay visible.
    sy = y1 + BOX_H * (0.35 if forward else 0.65)
    ty = y2 + BOX_H * (0.35 if forward else 0.65)
    sx = x1 + BOX_W if forward else x1
    tx = x2 if forward else x2 + BOX_W
    return (f'<line x1="{sx}" y1="{sy}" x2="{tx}" y2="{ty}" stroke="#777" '
            f'marker-end="url(#arrow)"/>')


def render_svg(topology: Topology) -> str:
    spots = _layout(topology)
    rows = max(sum(1 for n in topology.nodes if n.trust_domain == d.name)
               for d in topology.trust_domains)
    width = MARGIN * 2 + COL_W * len(topology.trust_domains)
    height = TOP + rows * (BOX_H + GAP_Y) + 40 + 18 * (len(topology.flows) + 1)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="Helvetica, Arial, sans-serif" font-size="12">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#555"/></marker></defs>',
        f'<text x="{MARGIN}" y="28" font-size="16" font-weight="bold">'
        f"cogov topology “{escape(topology.name)}”: trust domains, nodes and allowed flows</text>",
    ]
    for col, domain in enumerate(topology.trust_domains):
        x = MARGIN + col * COL_W
        out.append(
            f'<rect x="{x}" y="50" width="{COL_W - 20}" height="{height - 70}" rx="12" '
            f'fill="{DOMAIN_COLOURS[col % len(DOMAIN_COLOURS)]}" stroke="#99a"/>'
            f'<text x="{x + 12}" y="72" font-weight="bold">{escape(domain.name)}</text>'
        )
    drawn: set[tuple[str, str]] = set()
    for flow in topology.flows:
        for src in _endpoints(flow.source, topology):
            for dst in _endpoints(flow.target, topology):
                if src.name == dst.name or (src.name, dst.name) in drawn:
                    continue
                drawn.add((src.name, dst.name))
                out.append(_arrow(spots[src.name], spots[dst.name]))
    legend_y = TOP + rows * (BOX_H + GAP_Y) + 10
    out.append(f'<text x="{MARGIN + 12}" y="{legend_y}" font-weight="bold">Allowed flows '
               "(source → target: request kinds)</text>")
    for i, flow in enumerate(topology.flows):
        kinds = ", ".join(flow.kinds)
        out.append(f'<text x="{MARGIN + 12}" y="{legend_y + 18 * (i + 1)}" font-size="11">'
                   f"{escape(flow.source)} → {escape(flow.target)}: {escape(kinds)}</text>")
    for node in topology.nodes:
        x, y = spots[node.name]
        out.append(
            f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="#fff" '
            f'stroke="#335"/><text x="{x + BOX_W / 2}" y="{y + 19}" text-anchor="middle" '
            f'font-weight="bold">{escape(node.name)}</text><text x="{x + BOX_W / 2}" '
            f'y="{y + 35}" text-anchor="middle" fill="#555" font-size="10">'
            f"{escape(node.role.value)} · {escape(node.host)}:{node.port}</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"
