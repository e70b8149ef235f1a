"""Sealing to a node: anonymous sealed boxes to the X25519 key of its certified signing key.

A node's Ed25519 signing key is in its certificate, so anyone in the federation
can seal to it without a second key distribution. The X25519 key is libsodium's
birational conversion of that key (`crypto_sign_ed25519_pk_to_curve25519`), and
a sealed box is X25519 + XSalsa20-Poly1305 with an ephemeral sender key.
`seal`/`open_sealed` add a JSON head naming the purpose, so a box made for one
use is refused by another.
"""

import json
import struct
from typing import Any

import nacl.exceptions
import nacl.public
import nacl.signing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mpc.errors import MalformedInput


def sealing_public_key(ed25519_public: bytes) -> nacl.public.PublicKey:
    """The X25519 public key matching a node's Ed25519 signing key (from its certificate)."""
    return nacl.signing.VerifyKey(ed25519_public).to_curve25519_public_key()


def sealing_private_key(signing_key: Ed25519PrivateKey) -> nacl.public.PrivateKey:
    """The X25519 private key matching this node's Ed25519 signing key."""
    return nacl.signing.SigningKey(signing_key.private_bytes_raw()).to_curve25519_private_key()


def seal_bytes(recipient: nacl.public.PublicKey | bytes, plain: bytes) -> bytes:
    """An anonymous sealed box of `plain` for `recipient` (a key, or its 32 raw bytes)."""
    if isinstance(recipient, bytes):
        recipient = nacl.public.PublicKey(recipient)
    return nacl.public.SealedBox(recipient).encrypt(plain)


def open_bytes(private: nacl.public.PrivateKey, blob: bytes) -> bytes:
    """The plaintext of a sealed box; `nacl.exceptions.CryptoError` if it is not for this key."""
    return nacl.public.SealedBox(private).decrypt(bytes(blob))


def seal(
    recipient: nacl.public.PublicKey | bytes, purpose: str, head: dict[str, Any], payload: bytes
) -> bytes:
    """A sealed box of a JSON head (carrying `purpose`) and a payload."""
    head_bytes = json.dumps({**head, "purpose": purpose}, separators=(",", ":")).encode()
    return seal_bytes(recipient, struct.pack("!I", len(head_bytes)) + head_bytes + payload)


def open_sealed(
    private: nacl.public.PrivateKey, purpose: str, blob: bytes
) -> tuple[dict[str, Any], bytes]:
    """Open what `seal` made for this key and purpose; `MalformedInput` otherwise."""
    try:
        plain = open_bytes(private, blob)
        (size,) = struct.unpack_from("!I", plain, 0)
        head = json.loads(plain[4:4 + size])
    except (nacl.exceptions.CryptoError, struct.error, ValueError, TypeError) as exc:
        raise MalformedInput(f"the sealed {purpose} does not open for this key") from exc
    if not isinstance(head, dict) or head.get("purpose") != purpose:
        raise MalformedInput(f"not a {purpose}")
    return head, plain[4 + size:]
