"""`cogov govern ...` and `cogov domain ...`: governance on files and across the running nodes.

File commands (scan, classify, standardize, desensitize) come from
`governance.cli`. `ingest` runs the whole chain on the nodes: each hospital
exports its raw file, the health authority governs and tokenizes it, then
publishes into circulation at the operator. Domain and leak commands act as
the operator's local operator (its own certificate, admin routes).
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from governance import cli as files_cli
from governance.errors import GovernanceError
from governance.leak_tracing import read_leaked_tokens
from parties.runtime.batches import send_batches
from parties.runtime.cli import StateOption, TopologyOption, exit_on, resolve_topology
from parties.runtime.client import NodeClient
from parties.runtime.errors import NodeError
from parties.runtime.state import StateDir, default_state_dir
from parties.runtime.topology import Role, Topology

LONG_CALL_S = 1800.0
RAW_SUFFIXES = (".csv", ".parquet", ".jsonl")

console = Console()
govern_app = typer.Typer(
    help="Data governance: scan, classify, standardize, desensitize files; ingest across the "
    "nodes; trace leaks.",
    no_args_is_help=True,
)
domain_app = typer.Typer(
    help="The operator's anonymous shared domains (one per scenario and data user).",
    no_args_is_help=True,
)

for _name in ("scan", "classify", "standardize", "desensitize"):
    govern_app.command(_name)(getattr(files_cli, _name))


def _client(state: Path, topology: Topology, node: str) -> NodeClient:
    return NodeClient(StateDir(state), topology, node, timeout=LONG_CALL_S)


def _one(topology: Topology, role: Role) -> str:
    nodes = topology.nodes_with_role(role)
    if not nodes:
        console.print(f"[red]the topology has no {role.value} node[/red]")
        raise typer.Exit(2)
    return nodes[0].name


def raw_exports(data: Path, topology: Topology) -> dict[str, Path]:
    """hospital node -> its raw export under DATA/raw (file stem = node name)."""
    raw = data / "raw"
    if not raw.is_dir():
        console.print(f"[red]{raw} does not exist: generate data first (cogov generate)[/red]")
        raise typer.Exit(2)
    files = {p.stem: p for p in sorted(raw.iterdir()) if p.suffix in RAW_SUFFIXES}
    hospitals = {n.name for n in topology.nodes_with_role(Role.HOSPITAL)}
    strangers = sorted(set(files) - hospitals)
    if strangers:
        console.print(f"[red]no hospital node for export(s) {strangers} in the topology[/red]")
        raise typer.Exit(2)
    return files


def consumer_key_table(path: Path) -> pa.Table:
    """The public half of consumer_keys.jsonl (private keys are never read into the table)."""
    ids, keys = [], []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                ids.append(record["national_id"])
                keys.append(record["public_key"])
    return pa.table({"national_id": pa.array(ids, pa.string()),
                     "public_key": pa.array(keys, pa.string())})


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console)


@govern_app.command()
def ingest(
    data: Annotated[Path, typer.Option(
        help="Generated data directory (raw/, consumer_keys.jsonl).")] = Path("data"),
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    batch_rows: Annotated[int, typer.Option(help="Rows per transfer batch.")] = 5000,
    domains: Annotated[bool, typer.Option(
        help="Create the claim_check domain of every insurer that has none.")] = True,
) -> None:
    """Run the chain on the running nodes: hospitals export, the authority governs, publishes."""
    _, topo = resolve_topology(state, topology)
    exports = raw_exports(data, topo)
    authority, operator = _one(topo, Role.HEALTH_AUTHORITY), _one(topo, Role.OPERATOR)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    with exit_on(NodeError, GovernanceError), _progress() as bar:
        task = bar.add_task("hospital exports", total=len(exports))
        for hospital, path in exports.items():
            bar.update(task, description=f"{hospital} exports {path.name}")
            with _client(state, topo, hospital) as client:
                results[hospital] = client.post(
                    hospital, "/v1/hospital/export", kind="admin",
                    json={"path": str(path.resolve()), "batch_rows": batch_rows}).json()
            bar.advance(task)
        keys_file = data / "consumer_keys.jsonl"
        if keys_file.exists():
            keys = consumer_key_table(keys_file)
            stream = "k-" + hashlib.sha256(
                "".join(keys["public_key"].to_pylist()).encode()).hexdigest()[:32]
            ktask = bar.add_task("consumer public keys", total=None)
            with _client(state, topo, authority) as client:
                send_batches(client, authority, "/v1/governance/consumer-keys", stream, keys,
                             kind="admin", batch_rows=batch_rows,
                             on_batch=lambda i, n: bar.update(ktask, completed=i, total=n))
        ptask = bar.add_task("publishing to the operator", total=1)
        with _client(state, topo, authority) as client:
            publication = client.post(authority, "/v1/governance/publish", kind="admin",
                                      json={"batch_rows": batch_rows}).json()
        bar.advance(ptask)
        created = []
        if domains:
            with _client(state, topo, operator) as client:
                live = {(d["scenario"], d["data_user"]) for d in
                        client.get(operator, "/v1/domains", kind="admin").json()}
                for insurer in topo.nodes_with_role(Role.INSURER):
                    if ("claim_check", insurer.name) not in live:
                        created.append(client.post(
                            operator, "/v1/domains", kind="admin",
                            json={"scenario": "claim_check", "data_user": insurer.name},
                        ).json())
    seconds = time.perf_counter() - started
    table = Table(title="ingest")
    for head in ("hospital", "raw rows", "batches sent", "governed rows", "persons",
                 "sensitive columns", "sealed fields"):
        table.add_column(head)
    for hospital, r in results.items():
        g = r["governed"]
        table.add_row(hospital, f"{r['rows']:,}", f"{r['sent']}/{r['batches']}", f"{g['rows']:,}",
                      f"{g['persons']:,}", str(len(g["flagged"])), str(len(g["sealed_fields"])))
    console.print(table)
    if results:
        sealed = next(iter(results.values()))["governed"]["sealed_fields"]
        console.print(f"sealed at rest at the health authority: {', '.join(sealed)}")
    a = publication["alignment"]
    console.print(
        f"published {publication['rows']:,} visits ({publication['sent']}/"
        f"{publication['batches']} batches sent) and {publication['persons']:,} consumer keys "
        f"to {operator}; sealed in transit: {', '.join(publication['sealed_fields'])}\n"
        f"alignment: {a['persons']:,} persons, {a['persons_in_several_hospitals']:,} in several "
        f"hospitals, {a['attribute_conflicts']} attribute conflicts\n"
        f"domains created: {', '.join(d['domain_id'] + ' (' + d['data_user'] + ')' for d in created) or 'none'}\n"  # noqa: E501
        f"{publication['rows'] / seconds:,.0f} visits/s end to end ({seconds:.1f} s)"
    )


@govern_app.command("trace-leak")
def trace_leak(
    file: Annotated[Path, typer.Argument(help="Leaked tokens or rows (CSV or Parquet).")],
    column: Annotated[str | None, typer.Option(help="Token column (guessed if not given).")]
    = None,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Name the domain, and so the data user, that leaked domain tokens came from."""
    _, topo = resolve_topology(state, topology)
    operator = _one(topo, Role.OPERATOR)
    with exit_on(NodeError, GovernanceError):
        raw = read_leaked_tokens(file, column)
        tokens = [v.hex() if isinstance(v, bytes) else v for v in raw]
        with _client(state, topo, operator) as client:
            trace = client.post(operator, "/v1/domains/trace-leak", kind="admin",
                                json={"tokens": tokens}).json()
    report = trace["report"]
    table = Table(title=f"leak trace: {report['leaked']} tokens, {report['unmatched']} unmatched, "
                        f"{report['unparseable']} unparseable")
    table.add_column("domain", no_wrap=True, min_width=20)
    for head in ("scenario", "data user", "matched", "share", "chance <="):
        table.add_column(head)
    for a in trace["attributed"]:
        table.add_row(a["domain_id"], a["scenario"], a["data_user"], str(a["matched"]),
                      f"{a['share']:.0%}", f"1e{a['chance_log10']:.0f}")
    console.print(table)
    console.print(trace["summary"])


def _domain_table(rows: list[dict]) -> Table:
    table = Table(title="anonymous shared domains")
    table.add_column("domain", no_wrap=True, min_width=20)
    for head in ("scenario", "data user", "tokens", "persons", "created", "deleted"):
        table.add_column(head)
    for d in rows:
        table.add_row(d["domain_id"], d["scenario"], d["data_user"], f"{d['tokens']:,}",
                      f"{d['persons']:,}", d["created_at"], d["deleted_at"] or "")
    return table


@domain_app.command("create")
def domain_create(
    data_user: Annotated[str, typer.Option("--data-user", help="The insurer node.")],
    scenario: Annotated[str, typer.Option(help="The scenario.")] = "claim_check",
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Create the domain of (scenario, data user) with a fresh key k2[d], filled with tokens."""
    _, topo = resolve_topology(state, topology)
    operator = _one(topo, Role.OPERATOR)
    with exit_on(NodeError), _client(state, topo, operator) as client, \
            console.status("re-keying tokens"):
        info = client.post(operator, "/v1/domains", kind="admin",
                           json={"scenario": scenario, "data_user": data_user}).json()
    console.print(_domain_table([info]))


@domain_app.command("list")
def domain_list(
    all_: Annotated[bool, typer.Option("--all", help="Include deleted domains.")] = False,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """List the operator's domains."""
    _, topo = resolve_topology(state, topology)
    operator = _one(topo, Role.OPERATOR)
    with exit_on(NodeError), _client(state, topo, operator) as client:
        rows = client.get(operator, f"/v1/domains?include_deleted={str(all_).lower()}",
                          kind="admin").json()
    console.print(_domain_table(rows))


@domain_app.command("delete")
def domain_delete(
    domain_id: Annotated[str, typer.Argument(help="The domain id (dom-...).")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Delete a domain: destroy its key (crypto-shredding) and its tokens. Irreversible."""
    _, topo = resolve_topology(state, topology)
    operator = _one(topo, Role.OPERATOR)
    if not yes:
        typer.confirm(f"destroy the key and tokens of {domain_id} for good?", abort=True)
    with exit_on(NodeError), _client(state, topo, operator) as client:
        info = client.request(operator, "DELETE", f"/v1/domains/{domain_id}",
                              kind="admin").json()
    console.print(_domain_table([info]))
    console.print(f"key of {domain_id} destroyed; key_destroyed and domain_deleted are logged")


@domain_app.command("rotate")
def domain_rotate(
    domain_id: Annotated[str, typer.Argument(help="The domain id (dom-...).")],
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Rotate a domain's key k2[d]: its tokens move to the new version, old tokens stop matching."""
    _, topo = resolve_topology(state, topology)
    operator = _one(topo, Role.OPERATOR)
    with exit_on(NodeError), _client(state, topo, operator) as client, \
            console.status("re-keying tokens"):
        done = client.post(operator, f"/v1/domains/{domain_id}/rotate", kind="admin").json()
    console.print(
        f"key of {done['domain_id']} rotated: version {done['old_version']} -> "
        f"{done['new_version']}, {done['tokens']:,} tokens ({done['persons']:,} persons) re-keyed;"
        " tokens obtained before no longer match; key_rotated is logged")


@govern_app.command("rotate-k1")
def rotate_k1(
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Rotate the level-1 key k1 at the health authority; the operator re-derives every token."""
    _, topo = resolve_topology(state, topology)
    authority = _one(topo, Role.HEALTH_AUTHORITY)
    with exit_on(NodeError), _client(state, topo, authority) as client, \
            console.status("re-keying p1 and tokens"):
        done = client.post(authority, "/v1/governance/level1/rotate", kind="admin").json()
    op = done["operator"]
    console.print(
        f"k1 rotated: version {done['old_version']} -> {done['new_version']}, "
        f"{done['persons']:,} persons ({done['visits']:,} visits) re-keyed at the authority; "
        f"the operator moved {op['persons']:,} persons and re-derived the tokens of "
        f"{op['domains']} domains; key_rotated and tokens_rederived are logged")


def register(app: typer.Typer) -> None:
    """Mount `cogov govern` and `cogov domain`."""
    app.add_typer(govern_app, name="govern")
    app.add_typer(domain_app, name="domain")
