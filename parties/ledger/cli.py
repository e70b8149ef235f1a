"""`cogov ledger verify|audit|prove|check-proof|incidents|rotate-key|revoke-key`: check the
federation's log with public keys only, read or clear the witnesses' incidents, and change
a node's signing key in the log."""

import base64
import itertools
import json
import sqlite3
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from governance.ledger import (
    LedgerError,
    LogInconsistent,
    SignedTreeHead,
    TreeHeadInvalid,
    verify_log,
)
from governance.ledger.checkpoint import origin_of, verify_checkpoint
from governance.ledger.merkle import leaf_hash, root_hash, verify_consistency
from governance.ledger.proofs import ProofBundle, verify_bundle
from governance.ledger.verify import check_leaves, key_history_of
from parties.ledger.api import (
    CHECKPOINT,
    CLEAR_INCIDENTS,
    CONSISTENCY,
    ENTRIES,
    MAX_ENTRIES_PER_READ,
    POLL,
    WITNESS_INCIDENTS,
    WITNESS_ROLES,
    WITNESSED_HEAD,
    WitnessIncident,
    log_node,
)
from parties.ledger.key_rotation import revoke_signing_key, rotate_signing_key
from parties.ledger.operator_log import inclusion_bundle, latest_cosignatures
from parties.ledger.pin import load_pin
from parties.node import open_node
from parties.runtime.cli import (
    ExitCode,
    StateOption,
    TopologyOption,
    exit_on,
    fail,
    resolve_topology,
)
from parties.runtime.client import NodeClient
from parties.runtime.errors import NodeError
from parties.runtime.pki import PkiError, federation_signing_keys
from parties.runtime.state import StateDir, default_state_dir
from parties.runtime.topology import Topology

console = Console()
ledger_app = typer.Typer(help="The federation's tamper-evident log.", no_args_is_help=True)


def _read_only(db: Path) -> sqlite3.Connection:
    if not db.exists():
        fail("no log store", str(db), ExitCode.BAD_INPUT)
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


@ledger_app.command("verify")
def verify(
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    witness_now: Annotated[
        bool, typer.Option(help="Ask the witness nodes to countersign the latest head and "
                           "show their incidents (an unreachable witness fails the check).")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check every entry signature, the signed tree head and the witness cosignatures.

    Reads the operator's store read-only and trusts only public keys: the node
    signing keys certified by the federation CA.
    """
    _, topo = resolve_topology(state, topology)
    st = StateDir(state)
    operator = log_node(topo)
    witnesses = [n.name for n in topo.nodes if n.role in WITNESS_ROLES]
    if witness_now:
        for name in witnesses:
            try:
                with NodeClient(st, topo, name, timeout=10) as client:
                    client.call(name, POLL)
            except NodeError as exc:
                console.print(f"[yellow]{name} did not witness now: {exc}[/yellow]")
    # Offline (no witness asked), the incidents are not checked, and the report says so.
    open_incidents = _open_incidents(st, topo, witnesses) if witness_now else {}
    keys = federation_signing_keys(st, [n.name for n in topo.nodes])
    conn = _read_only(st.node(operator).db)
    leaves = [
        bytes(r[0]) for r in conn.execute("SELECT leaf FROM ledger_entries ORDER BY leaf_index")
    ]
    heads = [
        SignedTreeHead(log_id=r[1], tree_size=r[0], root_hash=bytes(r[2]).hex(),
                       timestamp_ms=r[3], signature=bytes(r[4]).hex())
        for r in conn.execute(
            "SELECT tree_size, log_id, root_hash, timestamp_ms, signature"
            " FROM ledger_tree_heads ORDER BY tree_size"
        )
    ]
    cosignatures = latest_cosignatures(conn)
    conn.close()
    if not heads:
        fail("no signed tree head", "the log has none", ExitCode.REFUSED)
    witnessed = [c.tree_size for c in cosignatures]
    # Verify at the largest head every witness has countersigned, and the rest of
    # the entries against the latest head; both must hold.
    head = heads[-1]
    common = min(witnessed) if len(witnessed) == len(witnesses) and witnessed else None
    target = next((h for h in heads if h.tree_size == common), head)
    # the first checkpoint, pinned at setup, must be a prefix of the history verified
    pin = load_pin(st.node(operator))
    pinned = [] if pin is None else [pin.tree_head]
    report = verify_log(
        leaves[: target.tree_size] if target is not head else leaves, target,
        [c for c in cosignatures if c.tree_size == target.tree_size], keys,
        checkpoints=pinned + [h for h in heads if h.tree_size <= target.tree_size
                              and h.tree_size not in {p.tree_size for p in pinned}],
        required_witnesses=witnesses,
    )
    latest = verify_log(leaves, head, [], keys, checkpoints=heads) if target is not head else None
    if as_json:
        out = {"witnessed": report.to_dict(), "latest": latest.to_dict() if latest else None}
        console.print_json(json.dumps(out, default=str))
    else:
        console.print(report.summary())
        if latest is not None:
            console.print(f"entries after the witnessed head: {latest.summary()}")
    for name, incidents in open_incidents.items():
        for i in incidents:
            console.print(f"[red]{name}: open incident {i.incident_id}: {i.reason} "
                          f"(seen {i.seen} times)[/red]")
    if not witness_now:
        console.print("[yellow]offline: the witnesses' incidents were not checked[/yellow]")
    if not report.ok or (latest is not None and not latest.ok) or open_incidents:
        raise typer.Exit(int(ExitCode.REFUSED))


def _open_incidents(st: StateDir, topo: Topology, witnesses: list[str]
                    ) -> dict[str, list[WitnessIncident]]:
    """Each witness's open incidents, asked of the witness itself; a witness that does not
    answer is an incident too (the log is not checked by it)."""
    found: dict[str, list[WitnessIncident]] = {}
    for name in witnesses:
        try:
            with NodeClient(st, topo, name, timeout=10) as client:
                shown = [i for i in client.call(name, WITNESS_INCIDENTS)
                         if i.cleared_at_ms is None]
        except NodeError as exc:
            fail("witness unreachable", f"{name}: {exc}", ExitCode.REFUSED)
        if shown:
            found[name] = shown
    return found


@ledger_app.command("audit")
def audit(
    node: Annotated[str, typer.Option("--as", help="The node auditing (any federation node: "
                                                    "an insurer, a hospital).")],
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Check the log from any node, with public keys only, through the transparency API.

    The operator's cosigned C2SP checkpoint must carry the log's signature and every
    witness's cosignature; each witness's own latest head, asked of the witness itself,
    must be one history with it and with the first checkpoint pinned at setup; no witness
    may hold an open incident; and every entry up to the checkpoint must verify and hash to
    its root.
    """
    _, topo = resolve_topology(state, topology)
    st = StateDir(state)
    operator = log_node(topo)
    witnesses = [n.name for n in topo.nodes if n.role in WITNESS_ROLES]
    with exit_on(NodeError, LedgerError, PkiError), NodeClient(st, topo, node) as client:
        keys = federation_signing_keys(st, [n.name for n in topo.nodes])
        checked = verify_checkpoint(
            client.call(operator, CHECKPOINT).decode(), origin_of(operator, keys[operator]),
            keys[operator], {w: keys[w] for w in witnesses})
        leaves = []
        while len(leaves) < checked.tree_size:
            got = client.call(operator, ENTRIES, query={
                "start": len(leaves), "end": min(checked.tree_size,
                                                 len(leaves) + MAX_ENTRIES_PER_READ)})
            if not got.leaves:
                raise LogInconsistent("the log serves fewer entries than its checkpoint")
            leaves += [base64.b64decode(x) for x in got.leaves]
        problems = check_leaves(0, leaves, key_history_of(leaves, keys))
        if problems or root_hash(leaf_hash(x) for x in leaves) != checked.root:
            raise LogInconsistent(f"the entries do not hash to the checkpoint's root "
                                  f"({len(problems)} bad entries)")
        heads = [(checked.tree_size, checked.root)]
        pin = load_pin(st.node(node))
        if pin is not None:  # the first checkpoint, pinned at setup: the history extends it
            first = verify_checkpoint(pin.checkpoint, checked.origin, keys[operator], {},
                                      required=0)
            heads.append((first.tree_size, first.root))
        for witness in witnesses:
            shown = client.call(witness, WITNESSED_HEAD)
            if shown is None or not (shown.head.signature_valid(keys[operator])
                                     and shown.cosignature.covers(shown.head)
                                     and shown.cosignature.signature_valid(keys[witness])):
                raise TreeHeadInvalid(f"{witness} shows no valid cosigned head")
            heads.append((shown.head.tree_size, shown.head.root))
            open_ones = [i for i in client.call(witness, WITNESS_INCIDENTS)
                         if i.cleared_at_ms is None]
            if open_ones:
                raise LogInconsistent(f"{witness} holds {len(open_ones)} open incident(s): "
                                      f"{open_ones[0].reason}")
        # the checkpoint and every witness's own head, each next larger one proven to
        # extend the last: one history, not one per witness
        heads.sort()
        for small, large in itertools.pairwise(heads):
            _one_history(client, operator, small, large)
    console.print(f"[green]log verified from {node}: {checked.tree_size} entries, checkpoint "
                  f"cosigned by {', '.join(sorted(checked.cosigned_at))}[/green]")


def _one_history(client: NodeClient, operator: str, small: tuple[int, bytes],
                 large: tuple[int, bytes]) -> None:
    """Two (size, root) heads are one history: a consistency proof from the log between."""
    if small[0] == large[0]:
        consistent = small[1] == large[1]
    else:
        proof = client.call(operator, CONSISTENCY, query={"first": small[0], "second": large[0]})
        consistent = small[0] == 0 or verify_consistency(
            small[0], large[0], small[1], large[1], [bytes.fromhex(p) for p in proof.path])
    if not consistent:
        raise LogInconsistent(f"heads of sizes {small[0]} and {large[0]} (the checkpoint's "
                              "and the witnesses') are not one history")


@ledger_app.command("incidents")
def incidents(
    node: Annotated[str, typer.Option(help="The witness node (run on its machine).")],
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    clear: Annotated[bool, typer.Option(help="Close the open incidents (admin; after the "
                                              "log has been put right).")] = False,
) -> None:
    """List a witness's incidents against the log, or clear the open ones."""
    _, topo = resolve_topology(state, topology)
    with exit_on(NodeError), NodeClient(StateDir(state), topo, node, timeout=10) as client:
        if clear:
            cleared = client.call(node, CLEAR_INCIDENTS).cleared
            console.print(f"{node}: {cleared} incident(s) cleared")
            return
        shown = client.call(node, WITNESS_INCIDENTS)
    for i in shown:
        state_text = "open" if i.cleared_at_ms is None else "cleared"
        console.print(f"{i.incident_id} {state_text} seen {i.seen}x: {i.reason}")
    if not shown:
        console.print(f"{node}: no incidents")


@ledger_app.command("prove")
def prove(
    entry: Annotated[int, typer.Argument(help="Index of the log entry.")],
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
    out: Annotated[Path | None, typer.Option(help="Write the proof bundle here.")] = None,
) -> None:
    """Print ENTRY with its inclusion proof against the cosigned checkpoint (a proof bundle
    that a third party checks with `check-proof`)."""
    _, topo = resolve_topology(state, topology)
    ctx = open_node(StateDir(state), topo, log_node(topo))
    with exit_on(Exception):
        bundle = inclusion_bundle(ctx, entry)
    text = bundle.model_dump_json(indent=2)
    if out:
        out.write_text(text)
        console.print(f"proof of entry {entry} written to {out} ({len(text)} bytes)")
    else:
        print(text)


@ledger_app.command("check-proof")
def check_proof(
    bundle_file: Annotated[Path, typer.Argument(help="A bundle written by `cogov ledger prove`.")],
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Check a proof bundle offline: the log's signature and every witness's cosignature on
    its checkpoint, and the entry's audit path, with the CA-certified public keys only."""
    _, topo = resolve_topology(state, topology)
    operator = log_node(topo)
    witnesses = [n.name for n in topo.nodes if n.role in WITNESS_ROLES]
    try:
        keys = federation_signing_keys(StateDir(state), [operator, *witnesses])
        bundle = ProofBundle.model_validate_json(bundle_file.read_text())
        _, checked = verify_bundle(bundle, origin_of(operator, keys[operator]), keys[operator],
                                   {w: keys[w] for w in witnesses})
    except (LedgerError, PkiError, ValueError) as exc:
        fail("proof rejected", str(exc), ExitCode.REFUSED, exc)
    console.print(f"[green]entry {bundle.index} is in the log of size {checked.tree_size}"
                  f"[/green] (checkpoint cosigned by {', '.join(sorted(checked.cosigned_at))})")


@ledger_app.command("rotate-key")
def rotate_key(
    node: Annotated[str, typer.Option(help="The node whose signing key rotates (run on its "
                                           "machine; restart the nodes afterwards).")],
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Rotate a node's log signing key: a `signing_key_rotated` entry signed by the old and
    the new key, then a certificate for the new one."""
    _, topo = resolve_topology(state, topology)
    with exit_on(NodeError, LedgerError, PkiError):
        done = rotate_signing_key(StateDir(state), topo, node)
    console.print(f"{node}: signing key {done.old_key[:16]}... -> {done.new_key[:16]}... "
                  f"(log entry {done.index}); restart the nodes to load it")


@ledger_app.command("revoke-key")
def revoke_key(
    node: Annotated[str, typer.Option(help="The node revoking one of its earlier keys.")],
    key: Annotated[str, typer.Option(help="The earlier signing public key (hex).")],
    invalid_from: Annotated[int, typer.Option(help="First log index the key no longer "
                                                   "signs validly (no earlier than the "
                                                   "rotation entry that retired it).")],
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Bound an earlier signing key's validity after a compromise (`signing_key_revoked`):
    entries it signed from INVALID_FROM on fail verification. INVALID_FROM may not precede
    the rotation that retired the key: what it signed while current stays valid."""
    _, topo = resolve_topology(state, topology)
    with exit_on(NodeError, LedgerError, PkiError):
        done = revoke_signing_key(StateDir(state), topo, node, key, invalid_from)
    console.print(f"{node}: key {key[:16]}... invalid from entry {invalid_from} "
                  f"(log entry {done.index})")


def register(app: typer.Typer) -> None:
    app.add_typer(ledger_app, name="ledger")

