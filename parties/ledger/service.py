"""The federation's tamper-evident log at the operator: appends, heads, proofs, cosignatures.

- The operator keeps the Merkle log (`governance.ledger.MerkleLog`) in its store
  (`parties.ledger.operator_log`).
- Every consequential action is stated in a log entry signed by the node that took it
  and appended with `parties.ledger.client.append_entry`: in place at the operator,
  over mTLS from other nodes.
- Witnesses (`parties.ledger.witness`) read the signed tree head and consistency
  proofs here and send their cosignatures back.
- Any federation certificate reads the transparency API: the cosigned C2SP checkpoint,
  the entries, inclusion and consistency proofs (`cogov ledger audit`).
"""

import base64
from typing import Annotated

from fastapi import APIRouter, Query, Response

from governance.ledger import Cosignature, SignedTreeHead
from governance.ledger.events import LogEvent
from governance.ledger.proofs import ProofBundle
from parties.ledger.api import (
    APPEND_ENTRIES,
    CHECKPOINT,
    CONSISTENCY,
    COSIGN,
    ENTRIES,
    INCLUSION_PROOF,
    LOG_NODE_ROLE,
    MAX_ENTRIES_PER_READ,
    RECEIPT,
    RELAYED_KINDS,
    TREE_HEAD,
    ConsistencyProof,
    CosignatureKept,
    EntriesAppended,
    EntryBatch,
    EntryRangeInvalid,
    LeafRange,
)
from parties.ledger.operator_log import (
    COMPONENT,
    MIGRATIONS,
    append_entries,
    checkpoint_note,
    inclusion_bundle,
    keep_cosignature,
    operator_log,
    receipt,
)
from parties.runtime.access import Caller
from parties.runtime.context import NodeContext
from parties.runtime.errors import IdentityMismatch
from parties.runtime.mount import mount
from parties.runtime.service import Service


def _relays(ctx: NodeContext, caller: Caller, event: LogEvent) -> bool:
    """True when `caller` may relay `event`, signed by its actor (`RELAYED_KINDS`)."""
    roles = RELAYED_KINDS.get(event.kind)
    return (roles is not None and ctx.topology.has_node(event.actor)
            and (ctx.topology.node(caller.name).role, ctx.topology.node(event.actor).role)
            == roles)


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, APPEND_ENTRIES)
    def post_entries(body: EntryBatch, caller: Caller) -> EntriesAppended:
        """Append log entries signed by the calling node, or relayed by it as `RELAYED_KINDS`
        allows (one transaction, all or nothing; the log checks every actor's signature)."""
        for entry in body.root:
            if entry.event.actor != caller.name and not _relays(ctx, caller, entry.event):
                raise IdentityMismatch(
                    f"{caller.name} may append only its own entries, not {entry.event.actor}'s"
                )
        return append_entries(ctx, list(body.root))

    @mount(router, TREE_HEAD)
    def get_head(caller: Caller) -> SignedTreeHead:
        """The latest signed tree head."""
        holder = operator_log(ctx)
        with holder.lock:
            holder.log.sync()
            return holder.log.tree_head()

    @mount(router, CONSISTENCY)
    def get_consistency(
        first: Annotated[int, Query(ge=0)],
        second: Annotated[int, Query(ge=0)],
        caller: Caller,
    ) -> ConsistencyProof:
        """RFC 9162 consistency proof between two tree sizes."""
        holder = operator_log(ctx)
        with holder.lock:
            holder.log.sync()
            path = holder.log.consistency_proof(first, second)
        return ConsistencyProof(first=first, second=second, path=[p.hex() for p in path])

    @mount(router, COSIGN)
    def post_cosignature(body: Cosignature, caller: Caller) -> CosignatureKept:
        """Keep a witness's cosignature of a tree head."""
        if body.witness != caller.name:
            raise IdentityMismatch(f"{caller.name} cannot submit {body.witness}'s cosignature")
        keep_cosignature(ctx, body)
        return CosignatureKept(tree_size=body.tree_size)

    @mount(router, INCLUSION_PROOF)
    def get_proof(index: int, caller: Caller) -> ProofBundle:
        """Entry `index` with its audit path against the cosigned checkpoint."""
        return inclusion_bundle(ctx, index)

    @mount(router, RECEIPT)
    def get_receipt(signature: Annotated[str, Query(pattern=r"^[0-9a-f]{128}$")],
                    caller: Caller) -> ProofBundle:
        """The entry with this signature and its audit path against the log's latest size."""
        return receipt(ctx, signature)

    @mount(router, CHECKPOINT)
    def get_checkpoint(caller: Caller) -> Response:
        """The latest cosigned checkpoint (C2SP tlog-checkpoint with tlog-cosignatures)."""
        return Response(checkpoint_note(ctx), media_type="text/plain; charset=utf-8")

    @mount(router, ENTRIES)
    def get_entries(start: Annotated[int, Query(ge=0)], end: Annotated[int, Query(ge=0)],
                    caller: Caller) -> LeafRange:
        """Stored leaves [start, end), at most MAX_ENTRIES_PER_READ, to recompute the root."""
        if end < start or end - start > MAX_ENTRIES_PER_READ:
            raise EntryRangeInvalid(f"0 to {MAX_ENTRIES_PER_READ} entries per read")
        holder = operator_log(ctx)
        with holder.lock:
            holder.log.sync()
            leaves = holder.log.leaves(start, min(end, holder.log.size))
        return LeafRange(start=start, leaves=[base64.b64encode(x).decode() for x in leaves])

    return [router]


OPERATOR_SERVICE = Service(
    name="ledger",
    roles=(LOG_NODE_ROLE,),
    routers=_routes,
    components=((COMPONENT, MIGRATIONS),),
)
