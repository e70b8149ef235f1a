"""`cogov contract ...`, `cogov consent revoke`, `cogov billing statement`."""

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from governance.billing import statement
from governance.consent import Consent, consent_signing_key, revoke_consent
from governance.contracts import (
    ContractError,
    SignedContract,
    load_contract,
    sign_contract,
    terminate_contract,
)
from governance.ledger import decode_leaf
from governance.ledger.signing import private_key_from_hex
from parties.agreements.api import (
    CONTRACT,
    REGISTER_CONTRACT,
    REVOKE_CONSENT,
    TERMINATE_CONTRACT,
    metering_node,
    serving_node,
)
from parties.ledger.api import log_node
from parties.ledger.client import append_entry
from parties.node import open_node
from parties.runtime.cli import (
    ExitCode,
    StateOption,
    TopologyOption,
    exit_on,
    resolve_topology,
)
from parties.runtime.client import NodeClient
from parties.runtime.errors import NodeError
from parties.runtime.pki import federation_signing_keys, load_signing_key
from parties.runtime.state import StateDir, default_state_dir
from parties.runtime.topology import Topology

console = Console()
contract_app = typer.Typer(help="Contracts: sign, register, terminate, show.",
                           no_args_is_help=True)
consent_app = typer.Typer(help="Consumer consents.", no_args_is_help=True)
billing_app = typer.Typer(help="Metering, bills and revenue sharing.", no_args_is_help=True)

AsOption = Annotated[str, typer.Option("--as", help="The node acting (it signs or calls).")]


def load_signed(path: Path) -> SignedContract:
    """A contract document (TOML/JSON terms) or a signed contract JSON."""
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if "terms" in data:
            return SignedContract.model_validate(data)
    return SignedContract(terms=load_contract(path))


@contract_app.command("sign")
def sign(
    document: Annotated[Path, typer.Argument(help="Contract terms (.toml/.json) or signed JSON.")],
    node: AsOption,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    out: Annotated[Path | None, typer.Option(help="Default: <document>.signed.json")] = None,
) -> None:
    """Add NODE's signature (its CA-certified signing key) to the contract."""
    _, topo = resolve_topology(state, topology)
    with exit_on(ContractError, OSError, ValueError):
        if not topo.has_node(node):
            raise ValueError(f"{node!r} is not a node of topology {topo.name!r}")
        signed = sign_contract(load_signed(document), node, load_signing_key(StateDir(state), node))
    target = out or document.with_name(document.stem.removesuffix(".signed") + ".signed.json")
    target.write_text(signed.model_dump_json(indent=2))
    missing = signed.missing_signatures()
    console.print(f"{node} signed {signed.contract_id}; "
                  + (f"still to sign: {', '.join(missing)}" if missing else "all parties signed"))


def post_contract(state: StateDir, topo: Topology, signed: SignedContract, node: str) -> str:
    """Register `signed` at the serving node as `node`; its status there."""
    with NodeClient(state, topo, node) as client:
        return client.call(serving_node(topo), REGISTER_CONTRACT, signed).status


@contract_app.command("register")
def register_contract(
    document: Annotated[Path, typer.Argument(help="Signed contract JSON.")],
    node: AsOption = "regulator",
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Register the signed contract at the serving node."""
    _, topo = resolve_topology(state, topology)
    with exit_on(ContractError, NodeError, ValueError):
        status = post_contract(StateDir(state), topo, load_signed(document), node)
    console.print(f"contract registered: {status}")


@contract_app.command("terminate")
def terminate(
    contract_id: str,
    node: AsOption,
    reason: str = "notice",
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """End a contract now, as NODE (a party allowed to terminate); service stops at once."""
    _, topo = resolve_topology(state, topology)
    st = StateDir(state)
    termination = terminate_contract(
        contract_id, node, datetime.now(UTC), load_signing_key(st, node), reason
    )
    with exit_on(NodeError), NodeClient(st, topo, node) as client:
        client.call(serving_node(topo), TERMINATE_CONTRACT, termination,
                    params={"contract_id": contract_id})
    console.print(f"contract {contract_id} terminated by {node}")


@contract_app.command("show")
def show(
    contract_id: str,
    node: AsOption = "regulator",
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Print a registered contract and its signatures."""
    _, topo = resolve_topology(state, topology)
    with exit_on(NodeError), NodeClient(StateDir(state), topo, node) as client:
        contract = client.call(serving_node(topo), CONTRACT, params={"contract_id": contract_id})
    console.print_json(contract.model_dump_json())


@consent_app.command("revoke")
def revoke(
    consent_file: Annotated[Path, typer.Argument(help="The consent document (JSON).")],
    key_hex: Annotated[str | None, typer.Option(
        "--key", help="The consumer's private key for the consent's insurer (hex).")] = None,
    master_seed_hex: Annotated[str | None, typer.Option(
        "--master-seed", help="Or the consumer app's master seed (hex): the key for the "
        "consent's insurer is derived from it.")] = None,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Withdraw a consent with the consumer's key; refused from the next query on."""
    if (key_hex is None) == (master_seed_hex is None):
        raise typer.BadParameter("give exactly one of --key and --master-seed")
    _, topo = resolve_topology(state, topology)
    st = StateDir(state)
    consent = Consent.parse(consent_file.read_text())
    key = (private_key_from_hex(key_hex) if key_hex is not None else
           consent_signing_key(bytes.fromhex(master_seed_hex or ""), consent.terms.insurer))
    revocation = revoke_consent(consent, key, datetime.now(UTC))
    serving = serving_node(topo)
    with exit_on(NodeError), NodeClient(st, topo, serving) as client:
        client.call(serving, REVOKE_CONSENT, revocation)
    console.print(f"consent {consent.consent_id} revoked")


@billing_app.command("statement")
def billing_statement(
    contract: Annotated[str, typer.Option("--contract", help="Contract id.")],
    period: Annotated[str, typer.Option(help="Month, YYYY-MM.")],
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    issue: Annotated[bool, typer.Option(help="Record the bill in the log (bill_issued).")] = True,
) -> None:
    """The bill of CONTRACT for PERIOD from the log: lines, split, risk reserve (integer fen).

    Only meters appended by the node serving the contract's scenario (and, for claim
    checks, signed by the data user) are billed; any other meter naming the contract is
    listed as an anomaly (and the
    command exits 1 when there is one, after printing the statement)."""
    _, topo = resolve_topology(state, topology)
    st = StateDir(state)
    serving = serving_node(topo)
    operator = log_node(topo)
    with exit_on(NodeError), NodeClient(st, topo, serving) as client:
        signed = client.call(serving, CONTRACT, params={"contract_id": contract})
    with exit_on(ContractError):
        metering = metering_node(topo, signed.terms.scenario)
    conn = sqlite3.connect(f"file:{st.node(operator).db}?mode=ro", uri=True)
    log_entries = [decode_leaf(bytes(r[0])) for r in
                   conn.execute("SELECT leaf FROM ledger_entries ORDER BY leaf_index")]
    conn.close()
    with exit_on(ContractError, ValueError):
        result = statement(signed.terms, period, log_entries, metering,
                           federation_signing_keys(st, [n.name for n in topo.nodes]))
    if issue:
        append_entry(open_node(st, topo, operator), "bill_issued", result.log_payload())
    if as_json:
        print(result.to_json())
    else:
        console.print(result.render())
    if result.anomalies:
        raise typer.Exit(ExitCode.REFUSED)  # printed, but the log holds meters not billed


def register(app: typer.Typer) -> None:
    app.add_typer(contract_app, name="contract")
    app.add_typer(consent_app, name="consent")
    app.add_typer(billing_app, name="billing")
