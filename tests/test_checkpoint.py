"""C2SP checkpoints and cosignatures: the spec's vector, an independent verifier, attacks."""

import base64
import hashlib
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from governance.ledger.checkpoint import (
    checkpoint_text,
    cosign_line,
    key_id,
    note,
    sign_line,
    verify_checkpoint,
    verify_note,
)
from governance.ledger.errors import TreeHeadInvalid

VECTOR = json.loads((Path(__file__).parent / "vectors" / "c2sp_signed_note.json").read_text())
ORIGIN = "cogov/operator/0123456789abcdef"
ROOT = hashlib.sha256(b"root").digest()


def _vkey() -> tuple[str, bytes, Ed25519PublicKey]:
    name, key_hex, encoded = VECTOR["vkey"].split("+")
    material = base64.b64decode(encoded)
    assert material[0] == 0x01  # Ed25519
    return name, bytes.fromhex(key_hex), Ed25519PublicKey.from_public_bytes(material[1:])


def test_the_signed_note_spec_example_verifies_and_its_key_id_is_ours():
    name, spec_key_id, public = _vkey()
    assert key_id(name, 0x01, public) == spec_key_id
    assert verify_note(VECTOR["note"], name, public) == "This is an example message.\n"
    with pytest.raises(TreeHeadInvalid):
        verify_note(VECTOR["note"].replace("example message", "example massage"), name, public)


def _independent_verify(data: str, log_name: str, log_key: Ed25519PublicKey,
                        witness: str, witness_key: Ed25519PublicKey) -> tuple[int, bytes]:
    """Written from the spec text, sharing no code with governance.ledger.checkpoint."""
    body, signatures = data.split("\n\n")[0] + "\n", data.split("\n\n")[1].splitlines()
    raw = {}
    for line in signatures:
        assert line.startswith("\u2014 ")
        name, b64 = line[2:].split(" ")
        raw[name] = base64.b64decode(b64)
    pub = lambda k: k.public_bytes_raw()  # noqa: E731
    log_sig = raw[log_name]
    assert log_sig[:4] == hashlib.sha256(log_name.encode() + b"\n\x01" + pub(log_key)).digest()[:4]
    log_key.verify(log_sig[4:], body.encode())
    cosig = raw[witness]
    assert cosig[:4] == hashlib.sha256(witness.encode() + b"\n\x04" + pub(witness_key)).digest()[:4]
    timestamp = int.from_bytes(cosig[4:12], "big")
    witness_key.verify(cosig[12:], b"cosignature/v1\ntime %d\n" % timestamp + body.encode())
    origin, size, root = body.splitlines()
    assert origin == log_name
    return int(size), base64.b64decode(root)


def _cosigned(log: Ed25519PrivateKey, witnesses: dict[str, Ed25519PrivateKey], size: int = 42):
    text = checkpoint_text(ORIGIN, size, ROOT)
    lines = [sign_line(text, ORIGIN, log)]
    lines += [cosign_line(text, name, key, 1_796_000_000 + i)
              for i, (name, key) in enumerate(witnesses.items())]
    return note(text, lines)


def test_a_cosigned_checkpoint_passes_our_verifier_and_an_independent_one():
    log = Ed25519PrivateKey.generate()
    witnesses = {"regulator": Ed25519PrivateKey.generate(),
                 "health-authority": Ed25519PrivateKey.generate()}
    data = _cosigned(log, witnesses)
    publics = {n: k.public_key() for n, k in witnesses.items()}
    checked = verify_checkpoint(data, ORIGIN, log.public_key(), publics)
    assert (checked.tree_size, checked.root) == (42, ROOT)
    assert checked.cosigned_at == {"regulator": 1_796_000_000, "health-authority": 1_796_000_001}
    for name in witnesses:
        checked_alone = _independent_verify(data, ORIGIN, log.public_key(), name, publics[name])
        assert checked_alone == (42, ROOT)


def test_forged_missing_and_foreign_signatures_are_refused():
    log, impostor = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    witnesses = {"regulator": Ed25519PrivateKey.generate(),
                 "health-authority": Ed25519PrivateKey.generate()}
    publics = {n: k.public_key() for n, k in witnesses.items()}
    data = _cosigned(log, witnesses)
    # the root swapped under the log's signature
    other = data.replace(base64.b64encode(ROOT).decode(),
                         base64.b64encode(hashlib.sha256(b"fork").digest()).decode())
    with pytest.raises(TreeHeadInvalid, match="does not verify"):
        verify_checkpoint(other, ORIGIN, log.public_key(), publics)
    # a log that cosigns for an absent witness with its own key: an unknown key, ignored
    text = checkpoint_text(ORIGIN, 42, ROOT)
    fake = note(text, [sign_line(text, ORIGIN, log),
                       cosign_line(text, "regulator", witnesses["regulator"], 1),
                       cosign_line(text, "health-authority", impostor, 1)])
    with pytest.raises(TreeHeadInvalid, match="missing: health-authority"):
        verify_checkpoint(fake, ORIGIN, log.public_key(), publics)
    assert verify_checkpoint(fake, ORIGIN, log.public_key(), publics, required=1)
    # a cosignature whose timestamp was moved: the signature covers it
    name, rest = data.splitlines()[-1][2:].split(" ")
    raw = bytearray(base64.b64decode(rest))
    raw[4:12] = struct.pack(">Q", 7)
    moved = data.replace(rest, base64.b64encode(bytes(raw)).decode())
    with pytest.raises(TreeHeadInvalid, match=f"{name}'s cosignature does not verify"):
        verify_checkpoint(moved, ORIGIN, log.public_key(), publics)
    # another log's checkpoint, and a note that is not one
    with pytest.raises(TreeHeadInvalid, match="no signature by"):
        verify_checkpoint(data, "cogov/operator/ffffffffffffffff", log.public_key(), publics)
    with pytest.raises(TreeHeadInvalid):
        verify_checkpoint("no blank line\n", ORIGIN, log.public_key(), publics)
    many = note(text, [sign_line(text, ORIGIN, log)] * 17)
    with pytest.raises(TreeHeadInvalid, match="signature lines"):
        verify_checkpoint(many, ORIGIN, log.public_key(), {})


def test_a_tree_size_in_other_digits_is_refused():
    """Unicode digits pass `str.isdigit`: the size line is ASCII decimal only."""
    log = Ed25519PrivateKey.generate()
    for size in ("\u0663", "\uff13", "\u00b2", "03", "+3"):
        text = f"{ORIGIN}\n{size}\n{base64.b64encode(ROOT).decode()}\n"
        data = note(text, [sign_line(text, ORIGIN, log)])
        with pytest.raises(TreeHeadInvalid, match="not a checkpoint"):
            verify_checkpoint(data, ORIGIN, log.public_key(), {})
