"""The insurer's view of the xID key commitments in the log, and its check of an OPRF answer.

The insurer reads the log's entries through the transparency API (from where it last
stopped), keeps each `xid_key_committed` entry whose signature is that of the key holder
entitled to it (k1: the health authority; k2[d]: the operator), and checks both steps of
every answer against them (`verify_answer`). An answer whose key version was never
published, whose k2 commitment belongs to another data user or scenario, whose
commitment was published twice with different values, or whose proof fails, is refused
with `OprfProofInvalid` before anything is unblinded.

Not checked here: that the entries read hash to a cosigned checkpoint (the log could show
this insurer a view of its own; `cogov ledger verify` is the full audit).

No web framework: the insurer's SDK imports this module.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

from governance.ledger import decode_leaf
from mpc import voprf
from parties.domains.api import KEY_COMMITTED_KIND, EvaluatedBatch, OprfProofInvalid, ProvenStep
from parties.ledger.api import ENTRIES, MAX_ENTRIES_PER_READ, TREE_HEAD, log_node
from parties.runtime.client import NodeClient
from parties.runtime.pki import federation_signing_keys
from parties.runtime.topology import Role


@dataclass(frozen=True)
class Commitment:
    point: bytes
    actor: str
    scenario: str | None
    data_user: str | None


class CommitmentBook:
    """Key commitments published in the log, as one insurer has read them."""

    def __init__(self, client: NodeClient) -> None:
        self.client = client
        self.read = 0  # log entries read so far
        self.found: dict[tuple[str, int], Commitment] = {}
        self.equivocated: set[tuple[str, int]] = set()
        self.authority = client.topology.node_of(Role.HEALTH_AUTHORITY)
        self.operator = client.topology.node_of(Role.OPERATOR)
        self.keys = federation_signing_keys(client.state, [self.authority, self.operator])

    def refresh(self) -> None:
        """Read the log's entries published since the last refresh."""
        log = log_node(self.client.topology)
        size = self.client.call(log, TREE_HEAD).tree_size
        while self.read < size:
            got = self.client.call(log, ENTRIES, query={
                "start": self.read, "end": min(size, self.read + MAX_ENTRIES_PER_READ)})
            if not got.leaves:
                break
            for leaf in got.leaves:
                self._keep(decode_leaf(base64.b64decode(leaf)).entry)
            self.read += len(got.leaves)

    def _keep(self, entry) -> None:  # a SignedEntry of any kind
        event = entry.event
        if event.kind != KEY_COMMITTED_KIND or event.actor not in self.keys:
            return
        if not entry.signature_valid(self.keys[event.actor]):
            return
        p = event.payload
        try:
            slot = (str(p["key_id"]), int(p["version"]))
            found = Commitment(bytes.fromhex(str(p["commitment"])), event.actor,
                               p.get("scenario"), p.get("data_user"))
        except (KeyError, ValueError, TypeError):
            return
        known = self.found.get(slot)
        if known is not None and known != found:
            self.equivocated.add(slot)
        self.found.setdefault(slot, found)

    def commitment(self, step: ProvenStep, actor: str, *, scenario: str | None = None,
                   data_user: str | None = None) -> bytes:
        """The commitment of the key version `step` names, published by `actor` (and, for a
        domain key, for this scenario and data user); `OprfProofInvalid` if there is none."""
        slot = (step.key_id, step.key_version)
        if slot not in self.found:
            self.refresh()
        found = self.found.get(slot)
        if (found is None or slot in self.equivocated or found.actor != actor
                or found.scenario != scenario or found.data_user != data_user):
            raise OprfProofInvalid(f"no single commitment of {step.key_id} version "
                                   f"{step.key_version} by {actor} in the log")
        return found.point


def verify_answer(book: CommitmentBook, blinded: Sequence[bytes], answer: EvaluatedBatch, *,
                  scenario: str) -> list[bytes]:
    """Z = k1·k2[d]·B of an answer, once π2 (B -> Z') and π1 (Z' -> Z) hold against the
    commitments in the log; raises `OprfProofInvalid` otherwise."""
    domain, level1 = answer.domain_step, answer.level1_step
    k2 = book.commitment(domain, book.operator, scenario=scenario, data_user=book.client.me)
    k1 = book.commitment(level1, book.authority)
    stepped = [bytes.fromhex(p) for p in domain.points]
    out = [bytes.fromhex(p) for p in level1.points]
    if not (len(stepped) == len(out) == len(blinded)
            and voprf.verify_hop(k2, blinded, stepped, bytes.fromhex(domain.proof))):
        raise OprfProofInvalid(f"the operator's step ({domain.key_id} v{domain.key_version}) "
                               "is not proven against its published commitment")
    if not voprf.verify_hop(k1, stepped, out, bytes.fromhex(level1.proof)):
        raise OprfProofInvalid(f"the health authority's step ({level1.key_id} "
                               f"v{level1.key_version}) is not proven against its commitment")
    return out
