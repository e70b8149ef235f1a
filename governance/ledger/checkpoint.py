"""The log's heads as C2SP checkpoints, with witness cosignatures, that any client checks.

Formats, exactly as specified (texts in the C2SP repository):
- c2sp.org/signed-note: text ending in a newline, a blank line, then signature lines
  `— <key name> base64(key ID || signature)`; Ed25519 key ID =
  SHA-256(name || 0x0A || 0x01 || public key)[:4], the signature over the note text;
- c2sp.org/tlog-checkpoint: the note text is the origin, the decimal tree size and the
  base64 RFC 6962 root hash, one per line;
- c2sp.org/tlog-cosignature (Ed25519, type 0x04): key ID =
  SHA-256(name || 0x0A || 0x04 || public key)[:4], the signature a u64 big-endian POSIX
  timestamp followed by Ed25519 over "cosignature/v1\\ntime <timestamp>\\n" || note text.

The log signs each checkpoint with its node key under the origin's name; each witness
cosigns under its node name. `verify_checkpoint` is what an insurer or a hospital runs with
the CA-certified public keys only: it ignores unknown signatures, as the spec requires, and
refuses a note without the log's valid signature or without the witnesses it requires.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from governance.ledger.errors import TreeHeadInvalid
from governance.ledger.signing import PublicKeyLike, public_key_bytes

ED25519 = 0x01
COSIGNATURE_ED25519 = 0x04
DASH = "\u2014"
MAX_SIGNATURES = 16  # the spec: accept at least 16, and bound them
_TREE_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")  # ASCII decimal, no leading zero


def origin_of(log_id: str, log_public_key: PublicKeyLike) -> str:
    """The log's origin line: its name and key fingerprint, so two logs never share one."""
    return f"cogov/{log_id}/{hashlib.sha256(public_key_bytes(log_public_key)).hexdigest()[:16]}"


def checkpoint_text(origin: str, tree_size: int, root: bytes) -> str:
    """The note text of a checkpoint (c2sp.org/tlog-checkpoint), final newline included."""
    if not origin or any(c.isspace() or c == "+" for c in origin) or len(root) != 32:
        raise TreeHeadInvalid("a checkpoint needs a non-empty origin and a 32-byte root")
    return f"{origin}\n{tree_size}\n{base64.b64encode(root).decode()}\n"


def key_id(name: str, signature_type: int, public_key: PublicKeyLike) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([signature_type])
                          + public_key_bytes(public_key)).digest()[:4]


def sign_line(text: str, name: str, key: Ed25519PrivateKey) -> str:
    """The log's Ed25519 note signature line over `text`."""
    signature = key_id(name, ED25519, key.public_key()) + key.sign(text.encode())
    return f"{DASH} {name} {base64.b64encode(signature).decode()}\n"


def cosign_line(text: str, name: str, key: Ed25519PrivateKey, timestamp_s: int) -> str:
    """A witness's timestamped Ed25519 cosignature line (c2sp.org/tlog-cosignature)."""
    if not 0 <= timestamp_s < 2**63:
        raise TreeHeadInvalid("cosignature timestamp out of range")
    message = _cosigned_message(text, timestamp_s)
    signature = (key_id(name, COSIGNATURE_ED25519, key.public_key())
                 + struct.pack(">Q", timestamp_s) + key.sign(message))
    return f"{DASH} {name} {base64.b64encode(signature).decode()}\n"


def _cosigned_message(text: str, timestamp_s: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp_s}\n".encode() + text.encode()


def note(text: str, lines: list[str]) -> str:
    """A signed note: the text, a blank line, the signature lines."""
    return text + "\n" + "".join(lines)


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    tree_size: int
    root: bytes
    text: str
    cosigned_at: dict[str, int]  # witness name -> its cosignature's POSIX timestamp


def _split(data: str) -> tuple[str, list[tuple[str, bytes]]]:
    if any(ord(c) < 0x20 and c != "\n" for c in data):
        raise TreeHeadInvalid("a note holds no control characters but newlines")
    text, sep, signatures = data.rpartition("\n\n")
    if not sep or not text:
        raise TreeHeadInvalid("a note is text, a blank line and signature lines")
    text += "\n"
    lines = signatures.split("\n")
    if lines[-1] != "" or len(lines) - 1 > MAX_SIGNATURES or len(lines) < 2:
        raise TreeHeadInvalid(f"1 to {MAX_SIGNATURES} newline-terminated signature lines")
    parsed = []
    for line in lines[:-1]:
        dash, _, rest = line.partition(" ")
        name, _, encoded = rest.partition(" ")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except ValueError as exc:
            raise TreeHeadInvalid("a signature line is not base64") from exc
        if dash != DASH or not name or "+" in name or len(raw) < 5:
            raise TreeHeadInvalid("a signature line is `— <name> base64(key ID || sig)`")
        parsed.append((name, raw))
    return text, parsed


def verify_note(data: str, name: str, public_key: PublicKeyLike) -> str:
    """The text of a signed note if `name`'s Ed25519 key signed it (c2sp.org/signed-note)."""
    text, signatures = _split(data)
    expected = key_id(name, ED25519, public_key)
    verifier = Ed25519PublicKey.from_public_bytes(public_key_bytes(public_key))
    known = [raw[4:] for n, raw in signatures if n == name and raw[:4] == expected]
    if not known:
        raise TreeHeadInvalid(f"the note carries no signature by {name}")
    for signature in known:
        try:
            verifier.verify(signature, text.encode())
        except InvalidSignature:
            raise TreeHeadInvalid(f"{name}'s signature on the note does not verify") from None
    return text


def verify_checkpoint(data: str, origin: str, log_public_key: PublicKeyLike,
                      witnesses: dict[str, PublicKeyLike], *, required: int | None = None
                      ) -> Checkpoint:
    """Check a cosigned checkpoint: the log's signature under `origin`, and valid
    cosignatures from at least `required` of `witnesses` (default: all of them)."""
    text = verify_note(data, origin, log_public_key)
    lines = text.split("\n")
    if len(lines) < 4 or lines[0] != origin or not _TREE_SIZE.fullmatch(lines[1]):
        raise TreeHeadInvalid("not a checkpoint of this origin")
    try:
        root = base64.b64decode(lines[2], validate=True)
    except ValueError as exc:
        raise TreeHeadInvalid("the checkpoint's root hash is not base64") from exc
    if len(root) != 32 or any(not line for line in lines[3:-1]):
        raise TreeHeadInvalid("a 32-byte root hash, and no empty extension line")
    _, signatures = _split(data)
    cosigned: dict[str, int] = {}
    for name, key in witnesses.items():
        expected = key_id(name, COSIGNATURE_ED25519, key)
        verifier = Ed25519PublicKey.from_public_bytes(public_key_bytes(key))
        for line_name, raw in signatures:
            if line_name != name or raw[:4] != expected:
                continue  # an unknown key: ignored, as the spec requires
            if len(raw) != 4 + 8 + 64:
                raise TreeHeadInvalid(f"{name}'s cosignature has the wrong length")
            (timestamp,) = struct.unpack(">Q", raw[4:12])
            try:
                verifier.verify(raw[12:], _cosigned_message(text, timestamp))
            except InvalidSignature:
                raise TreeHeadInvalid(f"{name}'s cosignature does not verify") from None
            cosigned[name] = timestamp
    needed = len(witnesses) if required is None else required
    if len(cosigned) < needed:
        missing = sorted(set(witnesses) - set(cosigned))
        raise TreeHeadInvalid(f"cosigned by {len(cosigned)} of the {needed} witnesses "
                              f"required (missing: {', '.join(missing)})")
    return Checkpoint(origin=origin, tree_size=int(lines[1]), root=root, text=text,
                      cosigned_at=cosigned)
