"""Proof bundles and receipts: one log entry with its inclusion proof and the checkpoint it
is against, checked offline with the log's and the witnesses' public keys only.

Wire format v1 (JSON; `tests/vectors/ledger_wire.json`):
- `ProofBundle`: `checkpoint` (a C2SP checkpoint note carrying the log's signature and the
  witnesses' tlog-cosignatures), `index`, `entry` (the Merkle leaf bytes, base64) and
  `inclusion` (the RFC 9162 audit path, the 32-byte hashes concatenated, base64).
  `verify_bundle` refuses a bundle unless every required witness cosigned its checkpoint.
- `Receipt`: what a verdict response carries for its `query_answered` entry. The same
  fields without the entry (the response carries the signed entry itself), against a
  checkpoint the log signed at the size the entry landed in: the log's promise, checked at
  once. Witnesses cosign within their polling interval; the client then proves the
  promised checkpoint one history with the next cosigned checkpoint it fetches
  (`parties.ledger.log_view`), so the receipt ends up against a cosigned checkpoint
  without making the answer wait for the witnesses.

Leaves are hashed with `merkle.leaf_hash` over the stored bytes, never re-encoded here.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from governance.ledger.checkpoint import Checkpoint, verify_checkpoint
from governance.ledger.errors import InclusionProofInvalid
from governance.ledger.merkle import HASH_SIZE, leaf_hash, verify_inclusion
from governance.ledger.signing import PublicKeyLike

_Base64 = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=1 << 20)]


def join_path(path: list[bytes] | tuple[bytes, ...]) -> str:
    """An audit or consistency path on the wire: the hashes concatenated, base64."""
    return base64.b64encode(b"".join(path)).decode()


def split_path(text: str) -> list[bytes]:
    """The hashes of a path given on the wire; `InclusionProofInvalid` if malformed."""
    try:
        joined = base64.b64decode(text, validate=True)
    except ValueError:
        raise InclusionProofInvalid("a proof path is not base64") from None
    if len(joined) % HASH_SIZE:
        raise InclusionProofInvalid("a proof path is not a whole number of hashes")
    return [joined[i:i + HASH_SIZE] for i in range(0, len(joined), HASH_SIZE)]


class Receipt(BaseModel):
    """Entry `index` is in the tree of `checkpoint`: the log's signed promise, by `inclusion`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    index: Annotated[int, Field(ge=0)]
    checkpoint: Annotated[str, Field(max_length=4096)]
    inclusion: _Base64


class ProofBundle(Receipt):
    """An entry, its inclusion proof and the cosigned checkpoint it is against."""

    entry: _Base64  # the stored leaf bytes


def verify_receipt(receipt: Receipt, leaf: bytes, origin: str, log_key: PublicKeyLike,
                   witnesses: dict[str, PublicKeyLike], *, required: int = 0) -> Checkpoint:
    """The checkpoint `receipt` is against, once it is signed by the log (and cosigned by
    `required` of `witnesses`) and its audit path leads from `leaf` at `index` to its root.

    Raises `TreeHeadInvalid` for the checkpoint, `InclusionProofInvalid` for the proof.
    """
    checked = verify_checkpoint(receipt.checkpoint, origin, log_key, witnesses,
                                required=required)
    if not verify_inclusion(receipt.index, checked.tree_size, leaf_hash(leaf),
                            split_path(receipt.inclusion), checked.root):
        raise InclusionProofInvalid(
            f"the audit path of entry {receipt.index} does not reach the root of the "
            f"checkpoint of size {checked.tree_size}")
    return checked


def verify_bundle(bundle: ProofBundle, origin: str, log_key: PublicKeyLike,
                  witnesses: dict[str, PublicKeyLike], *, required: int | None = None
                  ) -> tuple[bytes, Checkpoint]:
    """The entry's leaf bytes and the cosigned checkpoint that includes them (cosigned by
    `required` of `witnesses`, default all of them)."""
    try:
        leaf = base64.b64decode(bundle.entry, validate=True)
    except ValueError:
        raise InclusionProofInvalid("the bundle's entry is not base64") from None
    needed = len(witnesses) if required is None else required
    return leaf, verify_receipt(bundle, leaf, origin, log_key, witnesses, required=needed)
