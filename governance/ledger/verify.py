"""Offline verification of the log, needing only public keys and the stored entries.

`verify_log` derives each node's key history from the log's key entries and the
certified keys (`governance.ledger.key_history`), checks every entry (canonical form,
position, the actor's signature with the key valid at its index, integration times that
never run backwards),
recomputes the root, and checks the signed tree head, its witness
cosignatures and any earlier heads given as checkpoints. Findings name the
place: the entry index and what is wrong with it. Signature checks run in a
process pool for large logs (both cores of a small machine).
"""

import json
import multiprocessing
import os
import re
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import nacl.exceptions
import nacl.signing

from governance.ledger.errors import InclusionProofInvalid
from governance.ledger.events import (
    ENTRY_PREFIX,
    LEAF_HEAD,
    LEAF_SIGNATURE,
    LEAF_VERSION,
    SignedEntry,
    decode_leaf,
)
from governance.ledger.key_history import (
    KEY_KINDS,
    KeyHistory,
    derive_key_history,
    entry_problem,
)
from governance.ledger.merkle import CompactRange, leaf_hash, verify_inclusion
from governance.ledger.signing import PublicKeyLike, canonical_json, public_key_bytes
from governance.ledger.store import InclusionProof
from governance.ledger.tree_head import Cosignature, SignedTreeHead

PARALLEL_THRESHOLD = 50_000
_CHUNK = 20_000
_SIGNATURE_HEX = re.compile(r"[0-9a-f]{128}")
_EVENT_FIELDS = {"kind", "actor", "timestamp_ms", "request_id", "payload"}
_LEAF_KEYS = ({"entry", "index"}, {"entry", "index", "integrated_ms", "v"})
_KEY_ENTRY_MARK = b'"kind":"signing_key_'  # a pre-filter; the decoded kind decides
_V2_END = b',"v":%d}' % LEAF_VERSION
_INTEGRATED = b',"integrated_ms":'


@dataclass(frozen=True)
class Finding:
    """One verification failure: where (entry/time/tree/tree_head/checkpoint/witness) and
    what."""

    where: str
    what: str
    index: int | None = None

    def __str__(self) -> str:
        place = self.where if self.index is None else f"{self.where} {self.index}"
        return f"{place}: {self.what}"


@dataclass
class VerificationReport:
    """What `verify_log` checked and every problem it found."""

    entries: int
    root_hash: str
    tree_head_size: int
    signatures_checked: int
    witnesses_valid: list[str] = field(default_factory=list)
    problems: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_entries(self) -> list[int]:
        return sorted(
            {p.index for p in self.problems if p.where == "entry" and p.index is not None}
        )

    def summary(self) -> str:
        if self.ok:
            return (
                f"log verified: {self.entries} entries, root {self.root_hash[:16]}..., "
                f"witnesses {', '.join(self.witnesses_valid) or 'none'}"
            )
        return f"log verification FAILED ({len(self.problems)} problems): " + "; ".join(
            str(p) for p in self.problems[:10]
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def key_history_of(leaves: Iterable[bytes], certified: Mapping[str, PublicKeyLike]
                   ) -> KeyHistory:
    """The key history the log's own key entries and the certified keys give."""
    key_entries = []
    for data in leaves:
        if _KEY_ENTRY_MARK in data:
            try:
                decoded = decode_leaf(data)
            except ValueError:
                continue  # reported by the entry checks
            if decoded.entry.event.kind in KEY_KINDS:
                key_entries.append(decoded)
    return derive_key_history(key_entries, certified)


Verifiers = Mapping[str, Sequence[tuple[int, int | None, nacl.signing.VerifyKey]]]


def check_leaves(start: int, leaves: Sequence[bytes], history: KeyHistory
                 ) -> list[tuple[int, str]]:
    """Check leaves [start, start+len) for form, position and signature by the key valid at
    each index (`history`, from `key_history_of`); returns (index, what)."""
    verifiers = {
        actor: [(s.start, s.end, nacl.signing.VerifyKey(s.key)) for s in spans]
        for actor, spans in history.spans.items() if history.anchored(actor)
    }
    problems: list[tuple[int, str]] = []
    for offset, data in enumerate(leaves):
        index = start + offset
        if index in history.refused or not _leaf_is_valid(index, data, verifiers):
            # the slow path decides: a rotation whose old key a revocation cut short stands
            # on the new key's signature (`key_history.entry_problem`)
            problem = _leaf_problem(index, data, history)
            if problem:
                problems.append((index, problem))
    return problems


_ACTOR_AT = len(LEAF_HEAD) + len(b'{"actor":"')
_LEAF_TAIL = re.compile(rb',"signature":"([0-9a-f]{128})"\},"index":(0|[1-9][0-9]{0,17})'
                        rb'(?:,"integrated_ms":(?:0|[1-9][0-9]{0,15}),"v":2)?\}')
_NOT_CANONICAL = "is not in canonical form (bytes were altered)"


def _verifier_at(verifiers: Verifiers, actor: str, index: int
                 ) -> nacl.signing.VerifyKey | None:
    for start, end, verifier in verifiers.get(actor, ()):
        if start <= index and (end is None or index < end):
            return verifier
    return None


def _leaf_is_valid(index: int, data: bytes, verifiers: Verifiers) -> bool:
    """Fast path without JSON parsing: slice out the exact bytes the actor signed.

    Canonical JSON fixes the layout: the head, the event object (whose first key
    is "actor"), then the signature and index. A valid signature over the sliced
    event bytes proves them authentic; the strict tail pattern pins the
    signature's hex spelling and the index, so any altered byte fails here.
    """
    tail_at = data.rfind(LEAF_SIGNATURE)
    tail = _LEAF_TAIL.fullmatch(data, tail_at) if tail_at > 0 else None
    if tail is None or not data.startswith(LEAF_HEAD) or int(tail[2]) != index:
        return False
    actor_end = data.find(b'"', _ACTOR_AT)
    verifier = _verifier_at(verifiers, data[_ACTOR_AT:actor_end].decode("ascii", "replace"),
                            index)
    if verifier is None or data[len(LEAF_HEAD) : _ACTOR_AT] != b'{"actor":"':
        return False
    try:
        verifier.verify(
            ENTRY_PREFIX + data[len(LEAF_HEAD) : tail_at], bytes.fromhex(tail[1].decode())
        )
    except nacl.exceptions.BadSignatureError:
        return False
    return True


def _leaf_problem(index: int, data: bytes, history: KeyHistory) -> str:
    try:
        document = json.loads(data)
        entry, claimed = document["entry"], document["index"]
        event, signature_hex = entry["event"], entry["signature"]
        well_formed = (
            set(document) in _LEAF_KEYS
            and document.get("v", LEAF_VERSION) == LEAF_VERSION
            and set(entry) == {"event", "signature"}
            and isinstance(event, dict)
            and set(event) == _EVENT_FIELDS
            and isinstance(signature_hex, str)
            and _SIGNATURE_HEX.fullmatch(signature_hex) is not None
            and isinstance(claimed, int)
        )
    except (ValueError, KeyError, TypeError):
        return "does not parse as a log entry"
    if not well_formed:
        return "is not a well-formed log entry"
    if canonical_json(document) != data:
        return _NOT_CANONICAL
    if claimed != index:
        return f"claims index {claimed}: an entry is missing, inserted or moved here"
    try:
        signed = SignedEntry.model_validate(entry)
    except ValueError:
        return "is not a well-formed log entry"
    return entry_problem(history, index, signed) or ""


def _check_all(
    leaves: Sequence[bytes], history: KeyHistory, processes: int
) -> Iterable[tuple[int, str]]:
    if processes <= 1 or len(leaves) < PARALLEL_THRESHOLD:
        return check_leaves(0, leaves, history)
    context = multiprocessing.get_context("spawn")  # safe in threaded servers, unlike fork
    pool = ProcessPoolExecutor(max_workers=processes, mp_context=context)
    starts = range(0, len(leaves), _CHUNK)
    futures = [pool.submit(check_leaves, s, leaves[s : s + _CHUNK], history) for s in starts]
    pool.shutdown(wait=False)
    return (problem for future in futures for problem in future.result())


def verify_log(
    entries: Sequence[bytes],
    tree_head: SignedTreeHead,
    witness_signatures: Sequence[Cosignature],
    public_keys: Mapping[str, PublicKeyLike],
    *,
    checkpoints: Sequence[SignedTreeHead] = (),
    required_witnesses: Collection[str] = (),
    processes: int | None = None,
) -> VerificationReport:
    """Verify stored entries against a signed tree head and its witness cosignatures.

    `public_keys` maps node names (actors, the log, the witnesses) to their
    certified Ed25519 public keys; entries are checked with the key each actor's history
    gives at their index. `checkpoints` are earlier signed heads (a witness's
    store keeps them); they narrow down where a rewritten history diverges.
    """
    started = time.perf_counter()
    keys = {name: public_key_bytes(key) for name, key in public_keys.items()}
    processes = processes or min(2, os.cpu_count() or 1)
    entry_problems = _check_all(entries, key_history_of(entries, keys), processes)

    heads = sorted(
        {h.tree_size: h for h in (*checkpoints, tree_head)}.values(), key=lambda h: h.tree_size
    )
    roots: dict[int, bytes] = {}
    compact = CompactRange()
    wanted = iter(h.tree_size for h in heads)
    next_size = next(wanted, None)
    while next_size == 0:
        roots[0] = compact.root()
        next_size = next(wanted, None)
    time_problems: list[Finding] = []
    last_integrated: int | None = None
    for index, data in enumerate(entries):
        compact.append(leaf_hash(data))
        last_integrated = _check_integration_time(index, data, last_integrated, time_problems)
        while next_size == compact.size:
            roots[next_size] = compact.root()
            next_size = next(wanted, None)

    report = VerificationReport(
        entries=len(entries),
        root_hash=compact.root().hex(),
        tree_head_size=tree_head.tree_size,
        signatures_checked=len(entries),
    )
    problems = report.problems
    problems.extend(Finding("entry", what, index) for index, what in entry_problems)
    problems.extend(time_problems)
    log_key = keys.get(tree_head.log_id)
    _check_heads(heads, tree_head, roots, log_key, problems)
    if tree_head.tree_size != len(entries):
        problems.append(
            Finding(
                "tree",
                f"the tree head commits to {tree_head.tree_size} entries, "
                f"{len(entries)} were given",
            )
        )
    report.witnesses_valid = _check_witnesses(
        tree_head, witness_signatures, keys, required_witnesses, problems
    )
    report.seconds = time.perf_counter() - started
    return report


def _check_integration_time(index: int, data: bytes, last: int | None,
                            problems: list[Finding]) -> int | None:
    """The log's clock never runs backwards from one leaf to the next, and once leaves carry
    it (format 2) every later leaf does; returns this leaf's integration time. Findings are
    "time" ones: the entry itself may be authentic, its place in time is not."""
    if not data.endswith(_V2_END):
        if last is not None:
            problems.append(Finding("time", "a format-1 leaf (no integration time) after "
                                    "format-2 leaves", index))
        return last
    at = data.rfind(_INTEGRATED) + len(_INTEGRATED)
    digits = data[at : len(data) - len(_V2_END)]
    if not digits.isdigit():
        return last  # not canonical: reported by the entry checks
    integrated = int(digits)
    if last is not None and integrated < last:
        problems.append(Finding("time", f"integration time {integrated} runs backwards "
                                f"(after {last})", index))
    return integrated


def _check_heads(
    heads: Sequence[SignedTreeHead],
    tree_head: SignedTreeHead,
    roots: Mapping[int, bytes],
    log_key: bytes | None,
    problems: list[Finding],
) -> None:
    last_good = 0
    for head in heads:
        where = "tree_head" if head is tree_head else "checkpoint"
        if log_key is None:
            problems.append(Finding(where, f"no public key for log {head.log_id!r}"))
        elif head.log_id != tree_head.log_id or not head.signature_valid(log_key):
            problems.append(
                Finding(where, f"head of size {head.tree_size} is not signed by the log")
            )
            continue
        root = roots.get(head.tree_size)
        if root is None:
            continue  # size beyond the entries given; reported by the size check
        if root.hex() != head.root_hash:
            problems.append(
                Finding(
                    where,
                    f"root of entries [0, {head.tree_size}) differs from the signed head: "
                    f"history diverges within entries [{last_good}, {head.tree_size})",
                )
            )
        else:
            last_good = head.tree_size


def _check_witnesses(
    tree_head: SignedTreeHead,
    cosignatures: Sequence[Cosignature],
    keys: Mapping[str, bytes],
    required: Collection[str],
    problems: list[Finding],
) -> list[str]:
    valid = []
    for cosignature in cosignatures:
        key = keys.get(cosignature.witness)
        if key is None:
            problems.append(Finding("witness", f"no public key for {cosignature.witness!r}"))
        elif not cosignature.covers(tree_head):
            problems.append(
                Finding(
                    "witness",
                    f"{cosignature.witness} cosigned another head (size {cosignature.tree_size})",
                )
            )
        elif not cosignature.signature_valid(key):
            problems.append(Finding("witness", f"{cosignature.witness}'s cosignature is invalid"))
        else:
            valid.append(cosignature.witness)
    for name in required:
        if name not in valid:
            problems.append(Finding("witness", f"required witness {name} did not cosign"))
    return sorted(set(valid))


def check_inclusion_proof(
    proof_json: str | bytes,
    sth: SignedTreeHead,
    log_public_key: PublicKeyLike,
    *,
    leaf: bytes | None = None,
) -> int:
    """Check a compact JSON inclusion proof against a signed tree head; return the leaf index.

    With `leaf` (the stored entry bytes) the proof must also be about that entry.
    Raises `InclusionProofInvalid` naming the failed check.
    """
    try:
        proof = InclusionProof.from_json(proof_json)
    except (ValueError, KeyError, TypeError) as exc:
        raise InclusionProofInvalid(f"proof does not parse: {exc}") from None
    if not sth.signature_valid(log_public_key):
        raise InclusionProofInvalid("the tree head is not signed by the log key")
    if proof.log_id != sth.log_id:
        raise InclusionProofInvalid(f"proof is for log {proof.log_id!r}, head for {sth.log_id!r}")
    if proof.tree_size != sth.tree_size:
        raise InclusionProofInvalid(
            f"proof is for a tree of {proof.tree_size} entries, the head has {sth.tree_size}"
        )
    if leaf is not None and leaf_hash(leaf) != proof.leaf_hash:
        raise InclusionProofInvalid("proof is about another entry")
    if not verify_inclusion(
        proof.leaf_index, proof.tree_size, proof.leaf_hash, proof.path, sth.root
    ):
        raise InclusionProofInvalid(
            f"audit path of entry {proof.leaf_index} does not reach the root"
        )
    return proof.leaf_index
