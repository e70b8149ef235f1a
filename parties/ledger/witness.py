"""The witnesses of the federation's log (health authority, regulator).

Each witness polls the operator's signed tree head, checks it is consistent with
the last head it countersigned, and sends its cosignature back; a rewrite is
recorded as an incident. Witnesses also gossip: each compares its latest
cosigned head with every fellow witness's (`WITNESSED_HEAD`), asking the log for a
consistency proof between the two, so a split view (each witness shown its own
history) becomes an incident too.
"""

import itertools
import time
from functools import partial

from fastapi import APIRouter

from governance.ledger import (
    Cosignature,
    LogInconsistent,
    ProofUnavailable,
    Witness,
    WitnessedHead,
)
from parties.ledger.api import (
    CLEAR_INCIDENTS,
    CONSISTENCY,
    COSIGN,
    GOSSIP,
    POLL,
    TREE_HEAD,
    WITNESS_INCIDENTS,
    WITNESS_ROLES,
    WITNESSED_HEAD,
    IncidentsCleared,
    WitnessIncident,
    log_node,
)
from parties.ledger.incidents import PeerIncidents, node_witness
from parties.runtime.access import Caller
from parties.runtime.client import NodeClient
from parties.runtime.context import NodeContext
from parties.runtime.errors import RemoteError
from parties.runtime.mount import mount
from parties.runtime.service import Service

# A new head is cosigned within half a second (a receipt is against a cosigned checkpoint
# that soon); the fellow witnesses are compared every 2 s.
WITNESS_INTERVAL_S = 0.5
GOSSIP_EVERY = 4


def _consistency_proof(client: NodeClient, operator: str, first: int,
                       second: int) -> list[bytes]:
    """The log's proof between two sizes; `ProofUnavailable` when the log answers without
    one (a refusal or a malformed proof; an unreachable log raises `NodeUnavailable`)."""
    try:
        proof = client.call(operator, CONSISTENCY, query={"first": first, "second": second})
        return [bytes.fromhex(p) for p in proof.path]
    except (RemoteError, ValueError) as exc:
        raise ProofUnavailable(f"the log gave no proof from {first} to {second}: {exc}"
                               ) from None


def witness_once(ctx: NodeContext, witness: Witness) -> Cosignature | None:
    """Fetch the log's head; countersign it if it is new and consistent."""
    operator = log_node(ctx.topology)
    with ctx.client() as client:
        head = client.call(operator, TREE_HEAD)
        last = witness.latest(head.log_id)
        if last is not None and last.tree_size == head.tree_size and \
                last.root_hash == head.root_hash:
            return None
        proof: list[bytes] = []
        try:
            if last is not None and 0 < last.tree_size < head.tree_size:
                try:
                    proof = _consistency_proof(client, operator, last.tree_size,
                                               head.tree_size)
                except ProofUnavailable:  # a larger head it will not prove: an incident
                    witness.refuse_unproven(head)
            elif last is not None and 0 < head.tree_size < last.tree_size:
                try:  # a smaller head: the log must prove it a prefix of what was witnessed
                    proof = _consistency_proof(client, operator, head.tree_size,
                                               last.tree_size)
                except ProofUnavailable as exc:  # it cannot: the witness records the fork
                    ctx.log.event("consistency_refused", detail=str(exc))
            cosignature = witness.cosign(head, proof)
        except LogInconsistent as exc:
            ctx.log.event("log_inconsistent", log=head.log_id, detail=str(exc))
            raise
        client.call(operator, COSIGN, cosignature)
    return cosignature


def gossip_once(ctx: NodeContext, witness: Witness) -> list[str]:
    """Compare this witness's view of the log with every fellow witness's; the peers checked.

    Raises `LogInconsistent` (after recording the incident) on a split view.
    """
    operator = log_node(ctx.topology)
    keys = ctx.signing_public_keys()
    checked = []
    peers = ctx.component(PeerIncidents, PeerIncidents)
    with ctx.client() as client:
        for peer in (n.name for role in WITNESS_ROLES for n in ctx.topology.nodes_with_role(role)):
            if peer == ctx.name:
                continue
            peers.open[peer] = sum(1 for i in client.call(peer, WITNESS_INCIDENTS)
                                   if i.cleared_at_ms is None)
            shown = client.call(peer, WITNESSED_HEAD)
            if shown is not None:
                try:
                    witness.compare_with_peer(peer, keys[peer], shown,
                                              partial(_consistency_proof, client, operator))
                except LogInconsistent as exc:
                    ctx.log.event("log_inconsistent", peer=peer, detail=str(exc))
                    raise
            peers.refreshed[peer] = time.monotonic()  # its incidents and its head: checked
            checked.append(peer)
    return checked


def _witness_loop(ctx: NodeContext) -> None:
    witness = node_witness(ctx)
    for round_ in itertools.count():
        steps = [(witness_once, "witness_poll_failed")]
        if round_ % GOSSIP_EVERY == 0:
            steps.append((gossip_once, "witness_gossip_failed"))
        for step, failed in steps:
            try:
                step(ctx, witness)
            except LogInconsistent:
                pass  # recorded by the witness and in the node log; keep watching
            except Exception as exc:  # the loop must outlive any one failed round
                ctx.log.event(failed, error=type(exc).__name__, detail=str(exc))
        time.sleep(WITNESS_INTERVAL_S)


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, POLL)
    def poll(caller: Caller) -> Cosignature | None:
        """Witness the log's current head now (the background loop does it every 0.5 s)."""
        return witness_once(ctx, node_witness(ctx))

    @mount(router, WITNESSED_HEAD)
    def head(caller: Caller) -> WitnessedHead | None:
        """This witness's latest cosigned head of the log, for fellow witnesses to compare."""
        return node_witness(ctx).witnessed(log_node(ctx.topology))

    @mount(router, GOSSIP)
    def gossip(caller: Caller) -> list[str]:
        """Compare with every fellow witness now (the background loop does it every 2 s)."""
        return gossip_once(ctx, node_witness(ctx))

    @mount(router, WITNESS_INCIDENTS)
    def incidents(caller: Caller) -> list[WitnessIncident]:
        """Every inconsistency this witness recorded, open or cleared, with its evidence."""
        return [WitnessIncident(**i) for i in node_witness(ctx).incidents()]

    @mount(router, CLEAR_INCIDENTS)
    def clear(caller: Caller) -> IncidentsCleared:
        """Close the open incidents once dealt with; the serving node answers again."""
        cleared = node_witness(ctx).clear_incidents()
        ctx.log.event("witness_incidents_cleared", cleared=cleared)
        return IncidentsCleared(cleared=cleared)

    return [router]


WITNESS_SERVICE = Service(
    name="witness",
    roles=WITNESS_ROLES,
    routers=_routes,
    background=_witness_loop,
)
