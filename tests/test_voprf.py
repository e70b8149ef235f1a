"""RFC 9497 batched DLEQ proofs: the RFC's VOPRF vectors (ristretto255) and the xID hop
on edwards25519, with forged, replayed and malformed proofs refused."""

import hashlib
import json
from pathlib import Path

import pytest

from mpc import voprf, xid
from mpc.hazmat import group
from tests.ristretto255 import Ristretto255

VECTORS = json.loads((Path(__file__).parent / "vectors" / "voprf_rfc9497_ristretto255.json")
                     .read_text())
RISTRETTO = Ristretto255()
CONTEXT = voprf.context_string(voprf.MODE_VOPRF, VECTORS["identifier"])


def scalar(hex_le: str) -> int:
    return int.from_bytes(bytes.fromhex(hex_le), "little")


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=["1", "2", "batch-2"])
def test_rfc9497_voprf_proof_vectors(vector):
    sk = scalar(VECTORS["skSm"])
    pk = bytes.fromhex(VECTORS["pkSm"])
    c = [bytes.fromhex(x) for x in vector["BlindedElement"]]
    d = [bytes.fromhex(x) for x in vector["EvaluationElement"]]
    assert RISTRETTO.mul(sk, RISTRETTO.generator) == pk
    assert [RISTRETTO.mul(sk, x) for x in c] == d  # BlindEvaluate
    proof = voprf.generate_proof(RISTRETTO, CONTEXT, sk, RISTRETTO.generator, pk, c, d,
                                 nonce=scalar(vector["ProofRandomScalar"]))
    assert proof.hex() == vector["Proof"]
    assert voprf.verify_proof(RISTRETTO, CONTEXT, RISTRETTO.generator, pk, c, d, proof)
    # Finalize: the unblinded element hashed with the input, as the RFC's Output
    for inp, blind, ev, out in zip(vector["Input"], vector["Blind"], d, vector["Output"],
                                   strict=True):
        n = RISTRETTO.mul(pow(scalar(blind), -1, RISTRETTO.order), ev)
        i = bytes.fromhex(inp)
        digest = hashlib.sha512(len(i).to_bytes(2, "big") + i + len(n).to_bytes(2, "big") + n
                                + b"Finalize").hexdigest()
        assert digest == out


def test_rfc9497_vector_proof_fails_under_another_context_or_key():
    vector = VECTORS["vectors"][2]
    pk = bytes.fromhex(VECTORS["pkSm"])
    c = [bytes.fromhex(x) for x in vector["BlindedElement"]]
    d = [bytes.fromhex(x) for x in vector["EvaluationElement"]]
    proof = bytes.fromhex(vector["Proof"])
    other = voprf.context_string(voprf.MODE_VOPRF, "ristretto255-SHA512x")
    assert not voprf.verify_proof(RISTRETTO, other, RISTRETTO.generator, pk, c, d, proof)
    assert not voprf.verify_proof(RISTRETTO, CONTEXT, RISTRETTO.generator, RISTRETTO.generator,
                                  c, d, proof)
    assert not voprf.verify_proof(RISTRETTO, CONTEXT, RISTRETTO.generator, pk, c, d[::-1], proof)


# ---------------------------------------------------------------- the xID hop (edwards25519)


def test_xid_context_is_cogovs_own_suite_not_an_rfc_identifier():
    assert voprf.XID_CONTEXT == b"OPRFV1-\x01-cogov-edwards25519-SHA512"


@pytest.fixture(scope="module")
def hop():
    key = xid.XidKey.generate("k")
    inputs, _ = xid.blind([f"id-{i}" for i in range(8)])
    outputs, proof = xid.evaluate_proven(key, inputs)
    return key, inputs, outputs, proof


def test_hop_proof_verifies_against_the_commitment(hop):
    key, inputs, outputs, proof = hop
    assert outputs == xid.evaluate_blinded(key, inputs)
    assert voprf.verify_hop(key.commitment(), inputs, outputs, proof)


def test_hop_proof_fails_for_a_wrong_key_or_a_tagged_element(hop):
    key, inputs, outputs, proof = hop
    other = xid.XidKey.generate("k")
    assert not voprf.verify_hop(other.commitment(), inputs, outputs, proof)
    # a key holder that applies another key to one element (tagging) cannot prove the batch
    tagged = [*outputs[:3], xid.evaluate_blinded(other, [inputs[3]])[0], *outputs[4:]]
    k = group.scalar_from_bytes(key._scalar)  # the cheating key holder has its own key
    forged = voprf.generate_proof(voprf.EDWARDS25519, voprf.XID_CONTEXT, k,
                                  voprf.EDWARDS25519.generator, key.commitment(), inputs, tagged)
    assert not voprf.verify_hop(key.commitment(), inputs, tagged, forged)


def test_replayed_proof_for_another_batch_is_refused(hop):
    key, _, _, proof = hop
    fresh, _ = xid.blind(["another"] * 8)
    assert not voprf.verify_hop(key.commitment(), fresh, xid.evaluate_blinded(key, fresh), proof)


def test_malformed_proofs_and_points_are_refused(hop):
    key, inputs, outputs, proof = hop
    order = group.GROUP_ORDER.to_bytes(32, "little")
    assert not voprf.verify_hop(key.commitment(), inputs, outputs, order + proof[32:])
    assert not voprf.verify_hop(key.commitment(), inputs, outputs, proof[:32] + order)
    assert not voprf.verify_hop(key.commitment(), inputs, outputs, proof[:63])
    assert not voprf.verify_hop(key.commitment(), inputs, outputs[:-1], proof)
    small_order = bytes(32)  # (0, -1)... encodes a point of order 4
    assert not voprf.verify_hop(key.commitment(), inputs, [*outputs[:-1], small_order], proof)
    assert not voprf.verify_hop(group.IDENTITY, inputs, outputs, proof)


def test_proof_nonce_is_fresh(hop):
    key, inputs, _, _ = hop
    assert xid.evaluate_proven(key, inputs)[1] != xid.evaluate_proven(key, inputs)[1]
