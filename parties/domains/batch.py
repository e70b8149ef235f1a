"""An insurer's signed OPRF batch: how the insurer signs it and how every hop checks it.

The insurer signs `(data_user, scenario, request_id, batch_id, expires_at,
SHA-256(points))` with its node's Ed25519 key under its own signature domain. The
regulator, the operator and the health authority verify it against the CA-certified key
of the insurer the batch names, so no relay can have a key applied to points it chose,
to points it altered, or for another data user. Replays are the authority's to refuse
(`parties.domains.budget`), since it keeps the table of served batch ids.

No web framework: the insurer's SDK imports this module.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.ledger.signing import sign_document, verify_document
from parties.domains.api import DEFAULT_SCENARIO, BatchExpired, BatchSignatureInvalid, SignedBatch
from parties.runtime.topology import Role

if TYPE_CHECKING:  # the SDK imports this module: no node runtime, no database
    from parties.runtime.context import NodeContext

SIGNATURE_DOMAIN = "cogov/oprf-batch/v1"
#: how long the SDK's batches live, and the most any batch may ask for
BATCH_TTL_S = 120
MAX_BATCH_TTL_S = 300


def points_digest(points: Sequence[str]) -> str:
    """SHA-256 over the points' 32-byte encodings, in order (the batch digest that is logged)."""
    h = hashlib.sha256()
    for p in points:
        h.update(bytes.fromhex(p))
    return h.hexdigest()


def _signed_fields(batch: SignedBatch) -> dict[str, str | int]:
    return {"data_user": batch.data_user, "scenario": batch.scenario,
            "request_id": batch.request_id, "batch_id": batch.batch_id,
            "expires_at": batch.expires_at, "points_sha256": points_digest(batch.points)}


def sign_batch(
    key: Ed25519PrivateKey, data_user: str, points: Sequence[bytes], request_id: str, *,
    scenario: str = DEFAULT_SCENARIO, ttl_s: int = BATCH_TTL_S, now: float | None = None,
) -> SignedBatch:
    """Blinded `points` of `data_user`, signed with its node key, fresh batch id, living
    `ttl_s` seconds."""
    unsigned = SignedBatch(
        data_user=data_user, scenario=scenario, request_id=request_id,
        batch_id=secrets.token_hex(16), expires_at=int(time.time() if now is None else now)
        + ttl_s, points=[bytes(p).hex() for p in points], signature="0" * 128)
    signature = sign_document(key, SIGNATURE_DOMAIN, _signed_fields(unsigned))
    return unsigned.model_copy(update={"signature": signature})


def insurer_keys(ctx: NodeContext) -> dict[str, bytes]:
    """The CA-certified signing keys of the federation's insurers, the only batch signers."""
    keys = ctx.signing_public_keys()
    return {n.name: keys[n.name] for n in ctx.topology.nodes_with_role(Role.INSURER)}


def verify_batch(
    batch: SignedBatch, insurer_keys: Mapping[str, bytes], *, now: float | None = None,
) -> str:
    """The batch digest, once the batch is checked to be signed by the insurer it names
    (`insurer_keys`: the insurers' certified signing keys) and alive.

    Raises `BatchSignatureInvalid` or `BatchExpired`.
    """
    key = insurer_keys.get(batch.data_user)
    if key is None:
        raise BatchSignatureInvalid(f"{batch.data_user} is not an insurer of the federation")
    fields = _signed_fields(batch)
    if not verify_document(key, SIGNATURE_DOMAIN, fields, batch.signature):
        raise BatchSignatureInvalid(f"batch {batch.batch_id} is not signed by {batch.data_user}")
    now = time.time() if now is None else now
    if batch.expires_at <= now:
        raise BatchExpired(f"batch {batch.batch_id} expired at {batch.expires_at}")
    if batch.expires_at > now + MAX_BATCH_TTL_S:
        raise BatchExpired(f"batch {batch.batch_id} asks to live beyond {MAX_BATCH_TTL_S} s")
    return str(fields["points_sha256"])
