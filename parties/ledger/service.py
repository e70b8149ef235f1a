"""The federation's tamper-evident log at the operator: appends, heads, proofs, cosignatures.

- The operator keeps the Merkle log (`governance.ledger.MerkleLog`) in its store
  (`parties.ledger.operator_log`).
- Every consequential action is stated in a log entry signed by the node that took it
  and appended with `parties.ledger.client.append_entry`: in place at the operator,
  over mTLS from other nodes.
- Witnesses (`parties.ledger.witness`) read the signed tree head and consistency
  proofs here and send their cosignatures back.
"""

from typing import Annotated

from fastapi import APIRouter, Query

from governance.ledger import Cosignature, SignedTreeHead
from parties.ledger.api import (
    APPEND_ENTRIES,
    CONSISTENCY,
    COSIGN,
    INCLUSION_PROOF,
    LOG_NODE_ROLE,
    TREE_HEAD,
    ConsistencyProof,
    CosignatureKept,
    EntriesAppended,
    EntryBatch,
    InclusionProofBundle,
)
from parties.ledger.operator_log import (
    COMPONENT,
    MIGRATIONS,
    append_entries,
    inclusion_bundle,
    keep_cosignature,
    operator_log,
)
from parties.runtime.access import Caller
from parties.runtime.context import NodeContext
from parties.runtime.errors import IdentityMismatch
from parties.runtime.mount import mount
from parties.runtime.service import Service


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, APPEND_ENTRIES)
    def post_entries(body: EntryBatch, caller: Caller) -> EntriesAppended:
        """Append log entries signed by the calling node (one transaction, all or nothing)."""
        for entry in body.root:
            if entry.event.actor != caller.name:
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
    def get_proof(index: int, caller: Caller) -> InclusionProofBundle:
        return inclusion_bundle(ctx, index)

    return [router]


OPERATOR_SERVICE = Service(
    name="ledger",
    roles=(LOG_NODE_ROLE,),
    routers=_routes,
    components=((COMPONENT, MIGRATIONS),),
)
