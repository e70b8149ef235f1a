"""Meters that prove themselves: which `query_answered` entries a bill or a quota may count.

Any node can append a `query_answered` entry naming any contract, so the log alone does
not make a meter true. A meter counts only when:

- the contract's serving node appended it (the entry's actor) and signed it, with its
  key valid at the meter's log index (so a stored meter edited afterwards is an
  anomaly), and
- it carries the data user's signature over the request it meters: the data user signs,
  before sending, the request's method, path, log request id, body digest, contract, its
  own name and the number of rows it asks for (`request_document`, domain
  `REQUEST_DOMAIN`); the serving node checks that signature before it serves, and copies
  it into the meter with the fields it covers.

A `package_run` entry (a production run of an approved package, metered by the data
owner that ran it) counts when the contract's serving node for package runs appended it
for one of the contract's data users. Its CPU and wall time are measured by that node,
never reported by the package; the requester does not sign its run requests, so such a
meter rests on the serving node's word.

Everything else naming the contract is an anomaly (`MeterAnomaly`): reported, never
billed, never counted against a quota. A meter the serving node voided with a
`query_withheld` entry (the answer was withheld because the log could not take its meter
in time, or the node died before releasing it) is neither billed nor an anomaly.

Anyone holding the log and the federation's public keys can recheck every meter, so a
node that forges or inflates a meter is caught by the payer, whose signature it cannot
make. The data user's signature is checked with its key valid at the meter's log index
(the key history the log's key entries and the certified keys give,
`governance.ledger.key_history`), so a rotation leaves older meters billable and a key
revoked from an index on bills nothing after it.

Not covered: `records_touched` and `compute_ms` are stated by the serving node alone
(the data user cannot know them before the answer), so a per-record price rests on the
serving node's word.
"""

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from governance.ledger.events import EventKind, LogEntry
from governance.ledger.key_history import (
    KEY_KINDS,
    KeyHistory,
    derive_key_history,
    entry_problem,
)
from governance.ledger.signing import PublicKeyLike, sign_document, verify_document

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from governance.contracts import ContractTerms

REQUEST_DOMAIN = "cogov-request-v1"
METER_KINDS = (EventKind.QUERY_ANSWERED, EventKind.PACKAGE_RUN)


def request_document(method: str, path: str, request_id: str, body_sha256: str,
                     contract_id: str, party: str, rows: int) -> dict[str, Any]:
    """What the data user signs for one request (and a verifier rebuilds from its meter)."""
    return {"method": method, "path": path, "request_id": request_id,
            "body_sha256": body_sha256, "contract_id": contract_id, "party": party,
            "rows": rows}


def sign_request(key: "Ed25519PrivateKey", document: dict[str, Any]) -> str:
    """The data user's signature (hex) of a `request_document`."""
    return sign_document(key, REQUEST_DOMAIN, document)


def request_signature_valid(public_key: PublicKeyLike, document: dict[str, Any],
                            signature: str) -> bool:
    return verify_document(public_key, REQUEST_DOMAIN, document, signature)


def meter_fields(method: str, path: str, body_sha256: str, signature: str) -> dict[str, str]:
    """The signed request's fields a serving node puts in its `query_answered` payload."""
    return {"method": method, "path": path, "body_sha256": body_sha256,
            "data_user_signature": signature}


class MeterAnomaly(BaseModel):
    """A meter naming a contract that does not prove itself."""

    model_config = ConfigDict(frozen=True)

    index: int
    request_id: str
    actor: str
    timestamp_ms: int  # when the log integrated it (`LogEntry.time_ms`)
    reason: str


def meter_problem(log_entry: LogEntry, terms: "ContractTerms", serving_node: str,
                  history: KeyHistory) -> str | None:
    """Why a meter (`METER_KINDS`) of `terms`' contract must not be counted, or None
    (`history`: the federation's signing keys over the log's indices)."""
    event = log_entry.entry.event
    payload = event.payload
    if event.actor != serving_node:
        return f"appended by {event.actor}, not by the serving node {serving_node}"
    # The serving node's own signature covers what the data user's does not
    # (`records_touched`, `compute_ms`): a stored meter edited afterwards fails here.
    problem = entry_problem(history, log_entry.index, log_entry.entry)
    if problem is not None:
        return f"the meter's own signature: {problem}"
    party = payload.get("party")
    if party not in terms.data_users:
        return f"party {party!r} is not a data user of the contract"
    if event.kind == EventKind.PACKAGE_RUN:
        if not isinstance(payload.get("run_id"), str):
            return "a package run names its run_id"
        return None
    method, path, body_sha256, signature = (
        payload.get(f) for f in ("method", "path", "body_sha256", "data_user_signature"))
    rows = payload.get("rows_returned")
    if (not all(isinstance(v, str) for v in (method, path, body_sha256, signature))
            or type(rows) is not int):
        return "no data-user signature over the request"
    key = history.key_at(party, log_entry.index) if history.anchored(party) else None
    if key is None:
        return f"no key of {party} is valid at entry {log_entry.index}"
    document = request_document(method, path, event.request_id, body_sha256,
                                terms.contract_id, party, rows)
    if not request_signature_valid(key, document, signature):
        return "the data user's signature does not sign this request"
    return None


def meter_identity(log_entry: LogEntry) -> tuple[str, str]:
    """What makes two meters the same billable event (a retry's second meter).

    A claim meter: its request id, which the data user's signature covers and the serving
    node answers once. A package run: the serving node's own run id (a fresh nonce per
    run), never the request id, which derives from a header the data user chooses and
    would let it have many runs billed as one.
    """
    event = log_entry.entry.event
    if event.kind == EventKind.PACKAGE_RUN:
        return EventKind.PACKAGE_RUN, str(event.payload["run_id"])
    return event.kind, event.request_id


def sort_meters(log_entries: Iterable[LogEntry], terms: "ContractTerms", serving_node: str,
                keys: Mapping[str, PublicKeyLike]) -> tuple[list[LogEntry], list[MeterAnomaly]]:
    """(the contract's meters (`METER_KINDS`) that prove themselves, every other one naming
    the contract as an anomaly), both in log order; meters the serving node voided are in
    neither."""
    log_entries = list(log_entries)
    history = derive_key_history(
        (e for e in log_entries if e.entry.event.kind in KEY_KINDS), keys)
    voided = {e.entry.event.payload.get("meter_signature") for e in log_entries
              if e.entry.event.kind == EventKind.QUERY_WITHHELD
              and e.entry.event.actor == serving_node
              and e.entry.event.payload.get("contract_id") == terms.contract_id}
    meters: list[LogEntry] = []
    anomalies: list[MeterAnomaly] = []
    for log_entry in log_entries:
        event = log_entry.entry.event
        if (event.kind not in METER_KINDS
                or event.payload.get("contract_id") != terms.contract_id
                or log_entry.entry.signature in voided):
            continue
        problem = meter_problem(log_entry, terms, serving_node, history)
        if problem is None:
            meters.append(log_entry)
        else:
            anomalies.append(MeterAnomaly(index=log_entry.index, request_id=event.request_id,
                                          actor=event.actor, timestamp_ms=log_entry.time_ms,
                                          reason=problem))
    return meters, anomalies
