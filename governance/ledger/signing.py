"""Canonical encoding and domain-separated Ed25519 signatures.

Every signed document of the governance layer (log entries, tree heads,
consents, contracts) is signed over `domain || 0x00 || canonical_json(doc)`, so
a signature made for one kind of document can never be replayed as another.
Signing uses `cryptography`; verification uses libsodium (PyNaCl), which is
about twice as fast here and matters when a million entries are checked.
"""

import json
from typing import Any

import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

PublicKeyLike = Ed25519PublicKey | bytes | str
"""An Ed25519 public key: a `cryptography` object, 32 raw bytes, or 64 hex chars."""


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: sorted keys, no spaces, ASCII only, no floats allowed."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def private_key_from_hex(seed_hex: str) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from its 32-byte seed in hex (the generator's format)."""
    seed = bytes.fromhex(seed_hex)
    if len(seed) != 32:
        raise ValueError(f"an Ed25519 private key is 32 bytes, got {len(seed)}")
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_key_bytes(key: PublicKeyLike | Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of a public key given in any accepted form (or of a private key's)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    if isinstance(key, Ed25519PublicKey):
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if isinstance(key, str):
        key = bytes.fromhex(key)
    if not isinstance(key, bytes) or len(key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return key


def public_key_hex(key: PublicKeyLike | Ed25519PrivateKey) -> str:
    """The public key as 64 lowercase hex chars."""
    return public_key_bytes(key).hex()


def signing_message(domain: str, document: Any) -> bytes:
    """The exact bytes signed for `document` under `domain`."""
    return domain.encode("ascii") + b"\x00" + canonical_json(document)


def sign_document(key: Ed25519PrivateKey, domain: str, document: Any) -> str:
    """Sign `document` (JSON-able) under `domain`; the signature as hex."""
    return key.sign(signing_message(domain, document)).hex()


def verify_message(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `message` by `public_key`."""
    if len(signature) != 64 or len(public_key) != 32:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False
    return True


def verify_document(
    public_key: PublicKeyLike, domain: str, document: Any, signature_hex: str
) -> bool:
    """True when `signature_hex` signs `document` under `domain` with `public_key`."""
    try:
        signature = bytes.fromhex(signature_hex)
        key = public_key_bytes(public_key)
    except (ValueError, TypeError):
        return False
    return verify_message(key, signing_message(domain, document), signature)
