"""The federation's tamper-evident log, hosted by the operator and witnessed.

- The operator keeps the Merkle log (`governance.ledger.MerkleLog`) in its store.
- Every consequential event is signed by the node that caused it and appended
  with `record_event`: locally at the operator, over mTLS from other nodes.
- Witnesses (health authority, regulator) poll the signed tree head, check it
  is consistent with the last head they countersigned, and send their
  cosignature back; a rewrite is recorded as an incident.
- Witnesses gossip: each compares its latest cosigned head with every fellow
  witness's (`/v1/witness/head`), asking the log for a consistency proof between
  the two, so a split view (each witness shown its own history) becomes an
  incident too.
"""

import base64
import sqlite3
import threading
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from governance.ledger import (
    Cosignature,
    LogInconsistent,
    MerkleLog,
    SignedEntry,
    SignedTreeHead,
    Witness,
    WitnessedHead,
    make_event,
    sign_event,
)
from parties.runtime.access import Caller, CallerPolicy
from parties.runtime.context import NodeContext
from parties.runtime.errors import IdentityMismatch, NodeError
from parties.runtime.node_log import current_request_id, new_request_id
from parties.runtime.service import Service
from parties.runtime.store import connect
from parties.runtime.topology import Role, Topology

LOG_NODE_ROLE = Role.OPERATOR
WITNESS_ROLES = (Role.HEALTH_AUTHORITY, Role.REGULATOR)
WITNESS_INTERVAL_S = 2.0

COMPONENT = "ledger_service"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE ledger_cosignatures (
        witness TEXT NOT NULL, tree_size INTEGER NOT NULL, cosignature TEXT NOT NULL,
        PRIMARY KEY (witness, tree_size)
    )
    """,
)


class EntriesAppended(BaseModel):
    first_index: int
    count: int
    tree_head: SignedTreeHead


class ConsistencyProof(BaseModel):
    first: int
    second: int
    path: list[str]


class InclusionProofBundle(BaseModel):
    """What a third party needs to check one entry offline."""

    proof: str  # compact JSON (`InclusionProof.to_json`)
    entry: str  # the stored leaf, base64
    tree_head: SignedTreeHead
    log_public_key: str


class LedgerUnavailable(NodeError):
    http_status = 503


def log_node(topology: Topology) -> str:
    """The node that keeps the federation's log."""
    nodes = topology.nodes_with_role(LOG_NODE_ROLE)
    if not nodes:
        raise LedgerUnavailable("the topology has no operator to keep the log")
    return nodes[0].name


class _OperatorLog:
    """The operator's MerkleLog on a connection of its own (the log takes BEGIN IMMEDIATE)."""

    def __init__(self, ctx: NodeContext) -> None:
        self.conn: sqlite3.Connection = connect(ctx.paths.db, explicit_transactions=True)
        self.lock = threading.Lock()
        self.log = MerkleLog(self.conn, ctx.name, ctx.signing_key, ctx.signing_public_keys())


def operator_log(ctx: NodeContext) -> _OperatorLog:
    return ctx.component(_OperatorLog)


def signed_event(ctx: NodeContext, kind: str, payload: dict[str, Any]) -> SignedEntry:
    rid = current_request_id.get() or new_request_id()
    return sign_event(make_event(kind, ctx.name, rid, payload), ctx.signing_key)


def append_entries(ctx: NodeContext, entries: list[SignedEntry]) -> EntriesAppended:
    """Append at the operator (this node must be it)."""
    holder = operator_log(ctx)
    with holder.lock:
        result = holder.log.append(entries)
    return EntriesAppended(
        first_index=result.first_index, count=result.count, tree_head=result.tree_head
    )


def record_event(ctx: NodeContext, kind: str, payload: dict[str, Any]) -> EntriesAppended:
    """Sign an event as this node and append it to the federation's log."""
    entry = signed_event(ctx, kind, payload)
    if ctx.spec.role == LOG_NODE_ROLE:
        return append_entries(ctx, [entry])
    with ctx.client() as client:
        body = client.post(
            log_node(ctx.topology), "/v1/ledger/entries", kind="ledger",
            json=[entry.model_dump(mode="json")],
        ).json()
    return EntriesAppended.model_validate(body)


def _operator_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter(prefix="/v1/ledger", tags=["ledger"])
    witnesses = CallerPolicy("witness", WITNESS_ROLES)

    @router.post("/entries", response_model=EntriesAppended)
    def post_entries(
        entries: Annotated[list[SignedEntry], Field(min_length=1, max_length=1000)],
        caller: Caller = Depends(CallerPolicy("ledger", WITNESS_ROLES)),
    ) -> EntriesAppended:
        """Append events signed by the calling node (one transaction, all or nothing)."""
        for entry in entries:
            if entry.event.actor != caller.name:
                raise IdentityMismatch(
                    f"{caller.name} may append only its own events, not {entry.event.actor}'s"
                )
        return append_entries(ctx, list(entries))

    @router.get("/head", response_model=SignedTreeHead)
    def get_head(caller: Caller = Depends(witnesses)) -> SignedTreeHead:
        """The latest signed tree head."""
        holder = operator_log(ctx)
        with holder.lock:
            holder.log.sync()
            return holder.log.tree_head()

    @router.get("/consistency", response_model=ConsistencyProof)
    def get_consistency(
        first: Annotated[int, Query(ge=0)],
        second: Annotated[int, Query(ge=0)],
        caller: Caller = Depends(witnesses),
    ) -> ConsistencyProof:
        """RFC 9162 consistency proof between two tree sizes."""
        holder = operator_log(ctx)
        with holder.lock:
            holder.log.sync()
            path = holder.log.consistency_proof(first, second)
        return ConsistencyProof(first=first, second=second, path=[p.hex() for p in path])

    @router.post("/cosignatures")
    def post_cosignature(
        cosignature: Cosignature, caller: Caller = Depends(witnesses)
    ) -> dict[str, int]:
        """Keep a witness's cosignature of a tree head."""
        if cosignature.witness != caller.name:
            raise IdentityMismatch(
                f"{caller.name} cannot submit {cosignature.witness}'s cosignature"
            )
        with ctx.store.lock, ctx.store.conn as conn:
            conn.execute(
                "INSERT OR REPLACE INTO ledger_cosignatures VALUES (?, ?, ?)",
                (cosignature.witness, cosignature.tree_size, cosignature.model_dump_json()),
            )
        return {"tree_size": cosignature.tree_size}

    @router.get("/proof/{index}", response_model=InclusionProofBundle)
    def get_proof(index: int, caller: Caller = Depends(witnesses)) -> InclusionProofBundle:
        return inclusion_bundle(ctx, index)

    return [router]


def inclusion_bundle(ctx: NodeContext, index: int) -> InclusionProofBundle:
    holder = operator_log(ctx)
    with holder.lock:
        holder.log.sync()
        head = holder.log.tree_head()
        proof = holder.log.inclusion_proof(index, head.tree_size)
        leaf = holder.log.leaf(index)
    return InclusionProofBundle(
        proof=proof.to_json(), entry=base64.b64encode(leaf).decode(), tree_head=head,
        log_public_key=holder.log.public_key_hex,
    )


def latest_cosignatures(conn: sqlite3.Connection) -> list[Cosignature]:
    """Each witness's cosignature of the largest head it countersigned."""
    rows = conn.execute(
        "SELECT c.cosignature FROM ledger_cosignatures c JOIN ("
        " SELECT witness, MAX(tree_size) AS size FROM ledger_cosignatures GROUP BY witness"
        ") m ON c.witness = m.witness AND c.tree_size = m.size"
    ).fetchall()
    return [Cosignature.model_validate_json(r[0]) for r in rows]


def witness_once(ctx: NodeContext, witness: Witness) -> Cosignature | None:
    """Fetch the log's head; countersign it if it is new and consistent."""
    operator = log_node(ctx.topology)
    with ctx.client() as client:
        head = SignedTreeHead.model_validate(
            client.get(operator, "/v1/ledger/head", kind="witness").json()
        )
        last = witness.latest(head.log_id)
        if last is not None and last.tree_size == head.tree_size and \
                last.root_hash == head.root_hash:
            return None
        proof: list[bytes] = []
        if last is not None and last.tree_size <= head.tree_size:
            body = client.get(
                operator, f"/v1/ledger/consistency?first={last.tree_size}&second={head.tree_size}",
                kind="witness",
            )
            proof = [bytes.fromhex(p) for p in body.json()["path"]]
        try:
            cosignature = witness.cosign(head, proof)
        except LogInconsistent as exc:
            ctx.log.event("log_inconsistent", log=head.log_id, detail=str(exc))
            raise
        client.post(operator, "/v1/ledger/cosignatures", kind="witness",
                    json=cosignature.model_dump(mode="json"))
    return cosignature


def gossip_once(ctx: NodeContext, witness: Witness) -> list[str]:
    """Compare this witness's view of the log with every fellow witness's; the peers checked.

    Raises `LogInconsistent` (after recording the incident) on a split view.
    """
    operator = log_node(ctx.topology)
    keys = ctx.signing_public_keys()
    checked = []
    with ctx.client() as client:

        def consistency_proof(first: int, second: int) -> list[bytes]:
            body = client.get(operator, f"/v1/ledger/consistency?first={first}&second={second}",
                              kind="witness").json()
            return [bytes.fromhex(p) for p in body["path"]]

        for peer in (n.name for role in WITNESS_ROLES for n in ctx.topology.nodes_with_role(role)):
            if peer == ctx.name:
                continue
            shown = client.get(peer, "/v1/witness/head", kind="witness").json()
            if shown is not None:
                try:
                    witness.compare_with_peer(peer, keys[peer],
                                              WitnessedHead.model_validate(shown),
                                              consistency_proof)
                except LogInconsistent as exc:
                    ctx.log.event("log_inconsistent", peer=peer, detail=str(exc))
                    raise
            checked.append(peer)
    return checked


def node_witness(ctx: NodeContext) -> Witness:
    def make() -> Witness:
        operator = log_node(ctx.topology)
        conn = connect(ctx.paths.db, explicit_transactions=True)
        return Witness(
            conn, ctx.name, ctx.signing_key, {operator: ctx.signing_public_keys()[operator]}
        )

    return ctx.component(Witness, make)


def _witness_loop(ctx: NodeContext) -> None:
    witness = node_witness(ctx)
    while True:
        for step, failed in ((witness_once, "witness_poll_failed"),
                             (gossip_once, "witness_gossip_failed")):
            try:
                step(ctx, witness)
            except LogInconsistent:
                pass  # recorded by the witness and in the node log; keep watching
            except Exception as exc:  # the loop must outlive any one failed round
                ctx.log.event(failed, error=type(exc).__name__, detail=str(exc))
        time.sleep(WITNESS_INTERVAL_S)


def _witness_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter(prefix="/v1/witness", tags=["ledger"])

    @router.post("/poll", response_model=Cosignature | None)
    def poll(caller: Caller = Depends(CallerPolicy("admin"))) -> Cosignature | None:
        """Witness the log's current head now (the background loop does it every 2 s)."""
        return witness_once(ctx, node_witness(ctx))

    @router.get("/head", response_model=WitnessedHead | None)
    def head(caller: Caller = Depends(CallerPolicy("witness", WITNESS_ROLES))
             ) -> WitnessedHead | None:
        """This witness's latest cosigned head of the log, for fellow witnesses to compare."""
        return node_witness(ctx).witnessed(log_node(ctx.topology))

    @router.post("/gossip", response_model=list[str])
    def gossip(caller: Caller = Depends(CallerPolicy("admin"))) -> list[str]:
        """Compare with every fellow witness now (the background loop does it every 2 s)."""
        return gossip_once(ctx, node_witness(ctx))

    return [router]


OPERATOR_SERVICE = Service(
    name="ledger",
    roles=(LOG_NODE_ROLE,),
    routers=_operator_routes,
    components=((COMPONENT, MIGRATIONS),),
)

WITNESS_SERVICE = Service(
    name="witness",
    roles=WITNESS_ROLES,
    routers=_witness_routes,
    background=_witness_loop,
)
