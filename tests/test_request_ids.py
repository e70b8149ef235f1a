"""Request ids at the edge: which ids pass, the keyed log id, and the log's own guard."""

import hashlib
import hmac
import json
from pathlib import Path

import nacl.signing
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.ledger import make_event
from governance.ledger.errors import PersonalDataInPayload
from governance.ledger.signing import public_key_bytes
from governance.meters import request_document, request_signature_valid, sign_request
from parties.claims.api import CHECK
from parties.runtime.request_ids import (
    InvalidRequestId,
    check_request_id,
    log_request_id,
    new_log_id,
    pair_key,
)

NATIONAL_ID = "110101199003077777"
INSURER, REGULATOR, OTHER = (Ed25519PrivateKey.generate() for _ in range(3))


def _key(own, peer) -> bytes:
    return pair_key(own, public_key_bytes(peer))


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a=b", "a b", "a:b", "é", "a\nb",
                                 "x" * 129, "a%2Fb", "a\x00b"])
def test_bad_ids_are_refused(bad):
    with pytest.raises(InvalidRequestId) as refused:
        check_request_id(bad)
    assert refused.value.http_status == 400
    assert bad == "" or bad not in str(refused.value)  # the id is not echoed


def test_good_ids_pass_and_log_ids_are_kept():
    for good in ("a", "A.b_c-9", "x" * 128, NATIONAL_ID):
        check_request_id(good)
    fresh = new_log_id()
    assert log_request_id(b"k" * 32, fresh) == fresh != new_log_id()


def test_both_sides_derive_the_same_keyed_id_and_nobody_else_can():
    insurer_side = log_request_id(_key(INSURER, REGULATOR), NATIONAL_ID)
    assert insurer_side == log_request_id(_key(REGULATOR, INSURER), NATIONAL_ID)
    assert insurer_side.startswith("rq-") and len(insurer_side) == 43
    assert NATIONAL_ID not in insurer_side
    # another caller, or anyone hashing the id without the pair's secret, gets another id
    assert insurer_side != log_request_id(_key(OTHER, REGULATOR), NATIONAL_ID)
    assert insurer_side[3:] not in hashlib.sha256(NATIONAL_ID.encode()).hexdigest()
    assert insurer_side != log_request_id(_key(INSURER, REGULATOR), NATIONAL_ID + "0")


def test_the_log_refuses_a_national_id_in_any_string_field():
    with pytest.raises(PersonalDataInPayload, match="request_id"):
        make_event("query_answered", "regulator", NATIONAL_ID)
    with pytest.raises(PersonalDataInPayload, match="actor"):
        make_event("query_answered", NATIONAL_ID, "rq-1")
    with pytest.raises(PersonalDataInPayload, match="request_id"):
        make_event("query_answered", "regulator", "13812345678")  # a phone number


VECTORS = json.loads((Path(__file__).parent / "vectors" / "request_signature.json").read_text())


def test_request_id_and_request_signature_vectors():
    """cogov's own wire formats, checked against fixed vectors and an independent path:
    the signed bytes rebuilt by hand, the signature checked with libsodium directly."""
    v = VECTORS
    insurer = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["insurer_seed"]))
    regulator = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["regulator_seed"]))
    key = _key(insurer, regulator)
    assert key.hex() == v["pair_key"] == _key(regulator, insurer).hex()
    assert log_request_id(key, v["client_request_id"]) == v["log_request_id"]
    mac = hmac.new(key, v["client_request_id"].encode(), hashlib.sha256).hexdigest()
    assert v["log_request_id"] == "rq-" + mac[:40]
    document = v["request_document"]
    assert document == request_document(
        CHECK.method, CHECK.path, v["log_request_id"], document["body_sha256"],
        document["contract_id"], document["party"], document["rows"])
    message = (v["request_domain"].encode() + b"\x00"
               + json.dumps(document, sort_keys=True, separators=(",", ":")).encode())
    assert message.hex() == v["signing_message_hex"]
    assert sign_request(insurer, document) == v["signature"]
    nacl.signing.VerifyKey(bytes.fromhex(v["insurer_public_key"])).verify(
        message, bytes.fromhex(v["signature"]))
    assert request_signature_valid(v["insurer_public_key"], document, v["signature"])
    assert not request_signature_valid(v["regulator_public_key"], document, v["signature"])
