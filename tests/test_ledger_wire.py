"""cogov's own log wire formats: checkpoint, cosignature, proof bundle, receipt.

`tests/vectors/ledger_wire.json` holds them for fixed keys (Ed25519 is deterministic):
cogov must produce exactly these bytes, and a verifier written here from the specs alone
(C2SP signed-note, tlog-checkpoint, tlog-cosignature; RFC 9162 §2.1.3.2), importing none
of cogov's verifying code, must accept them and refuse their tampered forms. Regenerate
with `python -m tests.test_ledger_wire` only when a format changes on purpose.
"""

import base64
import hashlib
import json
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from governance.ledger.checkpoint import checkpoint_text, cosign_line, note, origin_of, sign_line
from governance.ledger.errors import InclusionProofInvalid, TreeHeadInvalid
from governance.ledger.merkle import MemoryTree, leaf_hash
from governance.ledger.proofs import ProofBundle, Receipt, join_path, verify_bundle

VECTORS = Path(__file__).parent / "vectors" / "ledger_wire.json"
LEAVES = [f"cogov wire vector leaf {i}".encode() for i in range(7)]
INDEX, SIZE = 5, 7
COSIGNED_AT = {"health-authority": 1_796_000_000, "regulator": 1_796_000_001}


def _key(label: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


def build() -> dict:
    """The vectors, made with cogov's own encoders."""
    log = _key("cogov vector log key")
    witnesses = {name: _key(f"cogov vector witness {name}") for name in COSIGNED_AT}
    origin = origin_of("operator", log.public_key())
    tree = MemoryTree(leaf_hash(x) for x in LEAVES)
    text = checkpoint_text(origin, SIZE, tree.root())
    log_signed = note(text, [sign_line(text, origin, log)])
    cosignatures = {n: cosign_line(text, n, k, COSIGNED_AT[n]) for n, k in witnesses.items()}
    cosigned = note(text, [sign_line(text, origin, log), *cosignatures.values()])
    path = join_path(tree.inclusion_proof(INDEX))
    receipt = Receipt(index=INDEX, checkpoint=log_signed, inclusion=path)
    bundle = ProofBundle(index=INDEX, checkpoint=cosigned, inclusion=path,
                         entry=base64.b64encode(LEAVES[INDEX]).decode())
    return {
        "about": "cogov log wire formats v1 (governance/ledger/checkpoint.py, proofs.py); "
                 "keys are Ed25519 seeds = SHA-256 of the labels",
        "log": {"name": origin, "seed_label": "cogov vector log key",
                "public_key": log.public_key().public_bytes_raw().hex()},
        "witnesses": {n: {"seed_label": f"cogov vector witness {n}",
                          "public_key": k.public_key().public_bytes_raw().hex()}
                      for n, k in witnesses.items()},
        "leaves_b64": [base64.b64encode(x).decode() for x in LEAVES],
        "checkpoint": {"text": text, "log_signed_note": log_signed},
        "cosignatures": {n: {"time": COSIGNED_AT[n], "line": line}
                         for n, line in cosignatures.items()},
        "cosigned_checkpoint": cosigned,
        "receipt": receipt.model_dump_json(),
        "proof_bundle": bundle.model_dump_json(),
    }


VECTOR = json.loads(VECTORS.read_text()) if VECTORS.exists() else {}


def test_cogov_produces_exactly_the_vectors():
    assert build() == VECTOR


# -- an independent verifier, from the spec texts only ------------------------------------


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _parse_note(data: str) -> tuple[str, list[tuple[str, bytes]]]:
    """signed-note: text (ends with a newline), a blank line, `— name base64` lines."""
    cut = data.rindex("\n\n")
    body, lines = data[:cut + 1], data[cut + 2:]
    assert lines.endswith("\n")
    signatures = []
    for line in lines[:-1].split("\n"):
        assert line.startswith("\u2014 ")
        name, encoded = line[2:].split(" ")
        signatures.append((name, base64.b64decode(encoded, validate=True)))
    return body, signatures


def _independent_check(data: str, origin: str, log_key: bytes, witnesses: dict[str, bytes],
                       index: int, leaf: bytes, path: bytes) -> int:
    """The cosigned checkpoint's size once the log's signature, each witness's cosignature
    and the leaf's audit path (RFC 9162 §2.1.3.2) all verify; raises otherwise."""
    body, signatures = _parse_note(data)
    log_id = _sha256(origin.encode() + b"\n\x01" + log_key)[:4]
    found = [raw for name, raw in signatures if name == origin and raw[:4] == log_id]
    assert found, "no log signature"
    Ed25519PublicKey.from_public_bytes(log_key).verify(found[0][4:], body.encode())
    for name, key in witnesses.items():
        wanted = _sha256(name.encode() + b"\n\x04" + key)[:4]
        cosig = [raw for n, raw in signatures if n == name and raw[:4] == wanted]
        assert cosig and len(cosig[0]) == 76, f"no cosignature by {name}"
        timestamp = int.from_bytes(cosig[0][4:12], "big")
        message = b"cosignature/v1\ntime " + str(timestamp).encode() + b"\n" + body.encode()
        Ed25519PublicKey.from_public_bytes(key).verify(cosig[0][12:], message)
    lines = body.split("\n")
    assert lines[0] == origin and lines[1].isascii() and lines[1].isdigit()
    size, root = int(lines[1]), base64.b64decode(lines[2], validate=True)
    # RFC 9162 2.1.3.2, step by step
    assert index < size and len(path) % 32 == 0
    fn, sn = index, size - 1
    r = _sha256(b"\x00" + leaf)
    for i in range(0, len(path), 32):
        p = path[i:i + 32]
        assert sn != 0
        if fn % 2 == 1 or fn == sn:
            r = _sha256(b"\x01" + p + r)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = _sha256(b"\x01" + r + p)
        fn, sn = fn >> 1, sn >> 1
    assert sn == 0 and r == root, "the audit path does not reach the root"
    return size


def _material():
    bundle = json.loads(VECTOR["proof_bundle"])
    witnesses = {n: bytes.fromhex(w["public_key"]) for n, w in VECTOR["witnesses"].items()}
    return (bundle, VECTOR["log"]["name"], bytes.fromhex(VECTOR["log"]["public_key"]),
            witnesses)


def test_the_bundle_vector_passes_the_independent_verifier_and_cogovs():
    bundle, origin, log_key, witnesses = _material()
    leaf, path = base64.b64decode(bundle["entry"]), base64.b64decode(bundle["inclusion"])
    assert _independent_check(bundle["checkpoint"], origin, log_key, witnesses,
                              bundle["index"], leaf, path) == SIZE
    got, checked = verify_bundle(ProofBundle.model_validate_json(VECTOR["proof_bundle"]),
                                 origin, log_key, witnesses)
    assert (got, checked.tree_size, checked.cosigned_at) == (leaf, SIZE, COSIGNED_AT)
    receipt = json.loads(VECTOR["receipt"])
    assert _independent_check(receipt["checkpoint"], origin, log_key, {}, receipt["index"],
                              leaf, base64.b64decode(receipt["inclusion"])) == SIZE
    assert len(VECTOR["receipt"]) < 1024


@pytest.mark.parametrize("tamper", ["another entry", "another index", "path byte", "root",
                                    "cosignature time", "foreign witness key"])
def test_tampered_bundles_fail_both_verifiers(tamper):
    bundle, origin, log_key, witnesses = _material()
    leaf, path = base64.b64decode(bundle["entry"]), bytearray(base64.b64decode(
        bundle["inclusion"]))
    data, index = bundle["checkpoint"], bundle["index"]
    if tamper == "another entry":
        leaf = LEAVES[INDEX - 1]
    elif tamper == "another index":
        index = INDEX - 1
    elif tamper == "path byte":
        path[7] ^= 1
    elif tamper == "root":
        root_line = data.split("\n")[2]
        data = data.replace(root_line, base64.b64encode(_sha256(b"fork")).decode())
    elif tamper == "cosignature time":
        line = VECTOR["cosignatures"]["regulator"]["line"]
        raw = bytearray(base64.b64decode(line.split(" ")[2]))
        raw[11] ^= 1
        data = data.replace(line, f"\u2014 regulator {base64.b64encode(bytes(raw)).decode()}\n")
    else:  # a cosignature under the witness's name by a key that is no witness's
        line = VECTOR["cosignatures"]["regulator"]["line"]
        text = VECTOR["checkpoint"]["text"]
        data = data.replace(line, cosign_line(text, "regulator", _key("an insurer"), 1))
    with pytest.raises((AssertionError, InvalidSignature, ValueError)):
        _independent_check(data, origin, log_key, witnesses, index, leaf, bytes(path))
    forged = ProofBundle(index=index, checkpoint=data, inclusion=base64.b64encode(
        bytes(path)).decode(), entry=base64.b64encode(leaf).decode())
    with pytest.raises((InclusionProofInvalid, TreeHeadInvalid)):
        verify_bundle(forged, origin, log_key, witnesses)


if __name__ == "__main__":
    VECTORS.write_text(json.dumps(build(), indent=2, ensure_ascii=False) + "\n")
    sys.exit(0)
