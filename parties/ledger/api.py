"""The ledger capability's contract: the operator's log of the federation and its witnesses.

The operator keeps the log; every node appends the log entries it signed
(`APPEND_ENTRIES`); the witnesses (health authority, regulator) read its signed tree
heads and consistency proofs, send back their cosignatures, and show each other the
latest head they cosigned (`WITNESSED_HEAD`) so a split view is caught.
"""

from typing import Annotated

from pydantic import BaseModel, Field, RootModel

from governance.ledger import (
    Cosignature,
    SignedEntry,
    SignedTreeHead,
    WitnessedHead,
    register_event_kind,
)
from governance.ledger.proofs import ProofBundle
from parties.runtime.errors import NodeError
from parties.runtime.routes import Kind, Raw, Route
from parties.runtime.topology import Role, Topology

LOG_NODE_ROLE = Role.OPERATOR
WITNESS_ROLES = (Role.HEALTH_AUTHORITY, Role.REGULATOR)
MAX_ENTRIES_PER_APPEND = 1000
MAX_ENTRIES_PER_READ = 1000
# The log's first entry, whose checkpoint is pinned at setup (`parties.ledger.pin`).
LOG_STARTED = register_event_kind("log_started")


class LedgerUnavailable(NodeError):
    http_status = 503


def log_node(topology: Topology) -> str:
    """The node that keeps the federation's log."""
    nodes = topology.nodes_with_role(LOG_NODE_ROLE)
    if not nodes:
        raise LedgerUnavailable("the topology has no operator to keep the log")
    return nodes[0].name


class EntryBatch(RootModel[Annotated[list[SignedEntry],
                                     Field(min_length=1, max_length=MAX_ENTRIES_PER_APPEND)]]):
    """Log entries signed by the calling node, appended in one transaction (a JSON array)."""


class EntriesAppended(BaseModel):
    first_index: int
    count: int
    tree_head: SignedTreeHead


class ConsistencyProof(BaseModel):
    first: int
    second: int
    path: list[str]


class CosignatureKept(BaseModel):
    tree_size: int


class WitnessIncident(BaseModel):
    """An inconsistency a witness recorded, with the signed heads that prove it."""

    incident_id: int
    log_id: str
    detected_at_ms: int
    last_seen_ms: int | None
    seen: int
    reason: str
    evidence: dict
    cleared_at_ms: int | None


class IncidentsCleared(BaseModel):
    cleared: int


class LogUnderIncident(NodeError):
    """A witness holds an open incident against the log, or has not been checked lately:
    the serving node answers no claim and no statistic until that witness's administrator
    clears it and the witnesses gossip again (fail closed)."""

    http_status = 503


class LogAlreadyStarted(NodeError):
    """The log's first checkpoint is pinned once, on an empty log, at federation setup."""

    http_status = 409


class EntryRangeInvalid(NodeError):
    http_status = 400


class LeafRange(BaseModel):
    """Stored leaves (the bytes the Merkle tree hashes), base64, from index `start`."""

    start: int
    leaves: list[str]


class ReceiptInvalid(NodeError):
    """A receipt does not prove its entry in the log (another entry, another checkpoint, a
    bad signature or audit path): the answer it came with is not taken."""

    http_status = 502


class LogForked(ReceiptInvalid):
    """The log showed a checkpoint that is not one history with one it showed before (or
    would not prove that it is): a fork, evidence against the operator."""


# Entries a node appends on another's behalf, still signed by their actor: kind ->
# (relaying role, actor role). Hospitals reach only the health authority, which relays
# their signed data asset registrations (`parties.ingest.registration`).
RELAYED_KINDS: dict[str, tuple[Role, Role]] = {
    "data_asset_registered": (Role.HEALTH_AUTHORITY, Role.HOSPITAL),
}

# At the operator.
APPEND_ENTRIES = Route("POST", "/v1/ledger/entries", Kind.LEDGER, EntryBatch, EntriesAppended,
                       roles=WITNESS_ROLES, tag="ledger")
COSIGN = Route("POST", "/v1/ledger/cosignatures", Kind.WITNESS, Cosignature, CosignatureKept,
               roles=WITNESS_ROLES, tag="ledger")
# The transparency API: read-only, for every federation certificate.
TREE_HEAD = Route("GET", "/v1/ledger/head", Kind.TRANSPARENCY, None, SignedTreeHead,
                  tag="ledger")
# Query parameters `first` and `second`: the two tree sizes.
CONSISTENCY = Route("GET", "/v1/ledger/consistency", Kind.TRANSPARENCY, None, ConsistencyProof,
                    tag="ledger")
# Against the cosigned checkpoint (`CHECKPOINT`); 404 until one includes the entry.
INCLUSION_PROOF = Route("GET", "/v1/ledger/proof/{index}", Kind.TRANSPARENCY, None,
                        ProofBundle, tag="ledger")
# Query parameter `signature`: the entry's (hex); the entry and its receipt against the log's
# latest size, signed by the log (the serving node's answer carries them).
RECEIPT = Route("GET", "/v1/ledger/receipt", Kind.TRANSPARENCY, None, ProofBundle,
                tag="ledger")
# The largest head the most witnesses cosigned, as a C2SP checkpoint (text/plain) carrying
# the log's signature and their cosignatures.
CHECKPOINT = Route("GET", "/v1/ledger/checkpoint", Kind.TRANSPARENCY, None, Raw, tag="ledger")
# Query parameters `start` and `end`: at most MAX_ENTRIES_PER_READ leaves of [start, end).
ENTRIES = Route("GET", "/v1/ledger/entries", Kind.TRANSPARENCY, None, LeafRange, tag="ledger")

# At each witness.
POLL = Route("POST", "/v1/witness/poll", Kind.ADMIN, None, Cosignature | None, tag="ledger")
WITNESSED_HEAD = Route("GET", "/v1/witness/head", Kind.TRANSPARENCY, None,
                       WitnessedHead | None, tag="ledger")
GOSSIP = Route("POST", "/v1/witness/gossip", Kind.ADMIN, None, list[str], tag="ledger")
WITNESS_INCIDENTS = Route("GET", "/v1/witness/incidents", Kind.TRANSPARENCY, None,
                          list[WitnessIncident], tag="ledger")
CLEAR_INCIDENTS = Route("POST", "/v1/witness/incidents/clear", Kind.ADMIN, None,
                        IncidentsCleared, tag="ledger")
