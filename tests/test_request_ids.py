"""Request ids at the edge: which ids pass, the keyed log id, and the log's own guard."""

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.ledger import make_event
from governance.ledger.errors import PersonalDataInPayload
from governance.ledger.signing import public_key_bytes
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
