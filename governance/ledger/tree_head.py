"""Signed tree heads (the log's commitment) and witness cosignatures."""

from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field

from governance.ledger.signing import PublicKeyLike, sign_document, verify_document

TREE_HEAD_DOMAIN = "cogov-tree-head-v1"
COSIGNATURE_DOMAIN = "cogov-witness-cosignature-v1"

_Hex32 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]
_Node = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]


class SignedTreeHead(BaseModel):
    """Tree size, root hash and time, signed by the log operator's key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    log_id: _Node
    tree_size: Annotated[int, Field(ge=0)]
    root_hash: _Hex32
    timestamp_ms: Annotated[int, Field(ge=0)]
    signature: _Hex64

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"signature"})

    @property
    def root(self) -> bytes:
        return bytes.fromhex(self.root_hash)

    def signature_valid(self, log_public_key: PublicKeyLike) -> bool:
        return verify_document(log_public_key, TREE_HEAD_DOMAIN, self.body(), self.signature)


def sign_tree_head(
    log_id: str, tree_size: int, root: bytes, timestamp_ms: int, key: Ed25519PrivateKey
) -> SignedTreeHead:
    body = {
        "log_id": log_id,
        "tree_size": tree_size,
        "root_hash": root.hex(),
        "timestamp_ms": timestamp_ms,
    }
    return SignedTreeHead(**body, signature=sign_document(key, TREE_HEAD_DOMAIN, body))


class Cosignature(BaseModel):
    """A witness's statement that it saw this head and found it consistent with its past."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    witness: _Node
    log_id: _Node
    tree_size: Annotated[int, Field(ge=0)]
    root_hash: _Hex32
    timestamp_ms: Annotated[int, Field(ge=0)]
    cosigned_at_ms: Annotated[int, Field(ge=0)]
    signature: _Hex64
    # The same statement as a C2SP tlog-cosignature line, for checkpoint clients.
    checkpoint_cosignature: str | None = None

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"signature", "checkpoint_cosignature"})

    def covers(self, head: SignedTreeHead) -> bool:
        """True when this cosignature is about exactly `head`."""
        return (self.log_id, self.tree_size, self.root_hash, self.timestamp_ms) == (
            head.log_id,
            head.tree_size,
            head.root_hash,
            head.timestamp_ms,
        )

    def signature_valid(self, witness_public_key: PublicKeyLike) -> bool:
        return verify_document(witness_public_key, COSIGNATURE_DOMAIN, self.body(), self.signature)


def cosign_tree_head(
    head: SignedTreeHead, witness: str, cosigned_at_ms: int, key: Ed25519PrivateKey
) -> Cosignature:
    body = {
        "witness": witness,
        "log_id": head.log_id,
        "tree_size": head.tree_size,
        "root_hash": head.root_hash,
        "timestamp_ms": head.timestamp_ms,
        "cosigned_at_ms": cosigned_at_ms,
    }
    return Cosignature(**body, signature=sign_document(key, COSIGNATURE_DOMAIN, body))
