"""`cogov govern ...`: governance on files and across the running nodes.

File commands (scan, classify, standardize, desensitize) come from
`governance.cli`. `ingest` runs the whole chain on the nodes: each hospital
exports its raw file, the health authority governs and tokenizes it, then
publishes into circulation at the operator. Other capabilities add their
governance commands (`parties.domains.cli.govern_commands`).
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from governance import cli as files_cli
from governance.errors import GovernanceError
from parties.domains.api import (
    CREATE_DOMAIN,
    DEFAULT_SCENARIO,
    LIST_DOMAINS,
    SharedDomain,
    SharedDomainRequest,
)
from parties.ingest.api import (
    CONSUMER_KEYS,
    HOSPITAL_EXPORT,
    PUBLISH,
    ExportRequest,
    ExportResult,
    PublishRequest,
)
from parties.runtime.batches import send_batches
from parties.runtime.cli import (
    ExitCode,
    StateOption,
    TopologyOption,
    exit_on,
    fail,
    long_client,
    resolve_topology,
    role_node,
)
from parties.runtime.errors import NodeError
from parties.runtime.state import default_state_dir
from parties.runtime.topology import Role, Topology

RAW_SUFFIXES = (".csv", ".parquet", ".jsonl")

console = Console()
govern_app = typer.Typer(
    help="Data governance: scan, classify, standardize, desensitize files; ingest across the "
    "nodes; trace leaks.",
    no_args_is_help=True,
)

for _name in ("scan", "classify", "standardize", "desensitize"):
    govern_app.command(_name)(getattr(files_cli, _name))




def raw_exports(data: Path, topology: Topology) -> dict[str, Path]:
    """hospital node -> its raw export under DATA/raw (file stem = node name)."""
    raw = data / "raw"
    if not raw.is_dir():
        fail("SourceNotFound", f"{raw} does not exist: generate data first (cogov generate)",
             ExitCode.BAD_INPUT)
    files = {p.stem: p for p in sorted(raw.iterdir()) if p.suffix in RAW_SUFFIXES}
    hospitals = {n.name for n in topology.nodes_with_role(Role.HOSPITAL)}
    strangers = sorted(set(files) - hospitals)
    if strangers:
        fail("UnknownNode", f"no hospital node for export(s) {strangers} in the topology",
             ExitCode.BAD_INPUT)
    return files


class ConsumerKeysOutdated(ValueError):
    """consumer_keys.jsonl holds one key per consumer (the format before per-insurer keys)."""


def consumer_key_table(path: Path) -> pa.Table:
    """The public half of consumer_keys.jsonl: one row per (person, insurer) with the
    consent public key the person's app registers for that insurer (the master seeds are
    never read)."""
    ids, insurers, keys = [], [], []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "public_keys" not in record:
                raise ConsumerKeysOutdated(
                    f"{path}:{number}: one consent key per consumer; consent keys are now "
                    "per insurer: generate the data again (`cogov data generate`)")
            for insurer, key in sorted(record["public_keys"].items()):
                ids.append(record["national_id"])
                insurers.append(insurer)
                keys.append(key)
    return pa.table({"national_id": pa.array(ids, pa.string()),
                     "insurer": pa.array(insurers, pa.string()),
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
    encoding: Annotated[str | None, typer.Option(
        help="Text encoding of the CSV and JSON-lines exports (default: detect UTF-8, with "
        "or without BOM, then GB18030).")] = None,
    domains: Annotated[bool, typer.Option(
        help="Create the claim_check shared domain of every insurer that has none.")] = True,
) -> None:
    """Run the chain on the running nodes: hospitals export, the authority governs, publishes."""
    _, topo = resolve_topology(state, topology)
    exports = raw_exports(data, topo)
    authority, operator = role_node(topo, Role.HEALTH_AUTHORITY), role_node(topo, Role.OPERATOR)
    started = time.perf_counter()
    results: dict[str, ExportResult] = {}
    created: list[SharedDomain] = []
    with exit_on(NodeError, GovernanceError, ValueError), _progress() as bar:
        task = bar.add_task("hospital exports", total=len(exports))
        for hospital, path in exports.items():
            bar.update(task, description=f"{hospital} exports {path.name}")
            with long_client(state, topo, hospital) as client:
                results[hospital] = client.call(hospital, HOSPITAL_EXPORT, ExportRequest(
                    path=str(path.resolve()), batch_rows=batch_rows, encoding=encoding))
            bar.advance(task)
        keys_file = data / "consumer_keys.jsonl"
        if keys_file.exists():
            keys = consumer_key_table(keys_file)
            stream = "k-" + hashlib.sha256("".join(
                i + k for i, k in zip(keys["insurer"].to_pylist(), keys["public_key"].to_pylist(),
                                      strict=True)).encode()).hexdigest()[:32]
            ktask = bar.add_task("consumer public keys", total=None)
            with long_client(state, topo, authority) as client:
                send_batches(client, authority, CONSUMER_KEYS, stream, keys,
                             batch_rows=batch_rows,
                             on_batch=lambda i, n: bar.update(ktask, completed=i, total=n))
        ptask = bar.add_task("publishing to the operator", total=1)
        with long_client(state, topo, authority) as client:
            publication = client.call(authority, PUBLISH, PublishRequest(batch_rows=batch_rows))
        bar.advance(ptask)
        if domains:
            with long_client(state, topo, operator) as client:
                live = {(d.scenario, d.data_user) for d in client.call(operator, LIST_DOMAINS)}
                for insurer in topo.nodes_with_role(Role.INSURER):
                    if (DEFAULT_SCENARIO, insurer.name) not in live:
                        created.append(client.call(operator, CREATE_DOMAIN, SharedDomainRequest(
                            scenario=DEFAULT_SCENARIO, data_user=insurer.name)))
    seconds = time.perf_counter() - started
    table = Table(title="ingest")
    for head in ("hospital", "raw rows", "batches sent", "governed rows", "persons",
                 "sensitive columns", "sealed fields"):
        table.add_column(head)
    for hospital, r in results.items():
        g = r.governed
        table.add_row(hospital, f"{r.rows:,}", f"{r.sent}/{r.batches}", f"{g.rows:,}",
                      f"{g.persons:,}", str(len(g.flagged)), str(len(g.sealed_fields)))
    console.print(table)
    if results:
        sealed = next(iter(results.values())).governed.sealed_fields
        console.print(f"sealed at rest at the health authority: {', '.join(sealed)}")
    a = publication.alignment
    made = ", ".join(f"{d.domain_id} ({d.data_user})" for d in created) or "none"
    console.print(
        f"published {publication.rows:,} visits ({publication.sent}/"
        f"{publication.batches} batches sent) and {publication.persons:,} consumer keys "
        f"to {operator}; sealed in transit: {', '.join(publication.sealed_fields)}\n"
        f"alignment: {a['persons']:,} persons, {a['persons_in_several_hospitals']:,} in several "
        f"hospitals, {a['attribute_conflicts']} attribute conflicts\n"
        f"shared domains created: {made}\n"
        f"{publication.rows / seconds:,.0f} visits/s end to end ({seconds:.1f} s)"
    )


def register(app: typer.Typer, *more: typer.Typer) -> None:
    """Mount `cogov govern`, with the governance commands of other capabilities (`more`)."""
    for commands in more:
        govern_app.add_typer(commands)
    app.add_typer(govern_app, name="govern")
