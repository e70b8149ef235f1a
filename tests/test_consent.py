"""Consumer consent: signature, binding to one person, validity, revocation, scope."""

import os
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from governance.consent import (
    SUBJECT_MISMATCH,
    Consent,
    ConsentConflict,
    ConsentExpired,
    ConsentInvalid,
    ConsentMismatch,
    ConsentMissing,
    ConsentNotYetValid,
    ConsentRegistry,
    ConsentRevoked,
    ConsentScopeExceeded,
    ConsentSignatureInvalid,
    ConsentSubjectMismatch,
    issue_consent,
    revoke_consent,
    subject_commitment,
)
from governance.ledger import make_event
from governance.ledger.signing import private_key_from_hex, public_key_hex

NOW = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)
ALICE_ID = "320502199001011234"
BOB_ID = "32050519851212567X"
SCOPE = {"columns": ("visit_date", "amount_fen", "diagnosis_code"), "outputs": ("verdict",)}


@pytest.fixture
def alice_key():
    return private_key_from_hex(os.urandom(32).hex())  # the data generator's key format


@pytest.fixture
def registry(tmp_path, alice_key):
    conn = sqlite3.connect(tmp_path / "consent.db")
    registry = ConsentRegistry(conn, pepper=b"p" * 32)
    registry.register_subject(ALICE_ID, public_key_hex(alice_key), NOW)
    return registry


def _consent(key, national_id=ALICE_ID, **overrides) -> Consent:
    fields = {
        "insurer": "insurer-a",
        "purpose": "claim_settlement",
        "not_before": NOW - timedelta(hours=1),
        "not_after": NOW + timedelta(days=30),
        **SCOPE,
        **overrides,
    }
    return issue_consent(key, national_id, **fields)


def _check(registry, consent, who=ALICE_ID, at=NOW, **kwargs):
    return registry.check(consent, who, "insurer-a", "claim_settlement", at, **kwargs)


def test_registered_consent_authorizes_queries_about_its_person(registry, alice_key):
    consent = _consent(alice_key)
    registry.register(consent, ALICE_ID, NOW)
    terms = _check(registry, consent, columns=["amount_fen"], outputs=["verdict"])
    assert terms.insurer == "insurer-a"
    commitment = subject_commitment(ALICE_ID, consent.consent_id, consent.terms.nonce)
    assert _check(registry, consent, who=commitment) == terms
    assert _check(registry, consent, who=" 320502199001011234 ") == terms  # normalized
    # Replaying the same consent for the same person within its validity is fine.
    assert _check(registry, consent, at=NOW + timedelta(days=1)) == terms
    # JSON round trip: the node receives it over the wire.
    assert Consent.parse(consent.model_dump_json()) == consent


def test_a_consent_cannot_be_used_for_another_person(registry, alice_key):
    consent = _consent(alice_key)
    registry.register(consent, ALICE_ID, NOW)
    with pytest.raises(ConsentSubjectMismatch, match=SUBJECT_MISMATCH):
        _check(registry, consent, who=BOB_ID)
    bob_commitment = subject_commitment(BOB_ID, consent.consent_id, consent.terms.nonce)
    with pytest.raises(ConsentSubjectMismatch, match=SUBJECT_MISMATCH):
        _check(registry, consent, who=bob_commitment)


def test_an_insurer_cannot_mint_a_consent_for_someone(registry):
    insurer_key = private_key_from_hex(os.urandom(32).hex())
    forged = _consent(insurer_key, national_id=ALICE_ID)  # commits to Alice, signed by insurer
    with pytest.raises(ConsentSubjectMismatch):
        registry.register(forged, ALICE_ID, NOW)
    with pytest.raises(ConsentSubjectMismatch):
        registry.register(_consent(insurer_key, national_id=BOB_ID), BOB_ID, NOW)
    with pytest.raises(ConsentMissing):
        _check(registry, forged)


def test_altered_document_is_refused(registry, alice_key):
    consent = _consent(alice_key)
    registry.register(consent, ALICE_ID, NOW)
    widened = consent.terms.model_copy(update={"purpose": "underwriting"})
    altered = consent.model_copy(update={"terms": widened})
    with pytest.raises(ConsentSignatureInvalid):
        registry.check(altered, ALICE_ID, "insurer-a", "underwriting", NOW)
    with pytest.raises(ConsentSignatureInvalid):
        registry.register(altered, ALICE_ID, NOW)


def test_validity_window(registry, alice_key):
    consent = _consent(alice_key, not_before=NOW + timedelta(days=1))
    registry.register(consent, ALICE_ID, NOW)
    with pytest.raises(ConsentNotYetValid):
        _check(registry, consent)
    with pytest.raises(ConsentExpired):
        _check(registry, consent, at=NOW + timedelta(days=31))
    assert _check(registry, consent, at=NOW + timedelta(days=2))
    old = _consent(
        alice_key, not_before=NOW - timedelta(days=10), not_after=NOW - timedelta(days=1)
    )
    with pytest.raises(ConsentExpired):
        registry.register(old, ALICE_ID, NOW)


def test_wrong_insurer_purpose_scenario_or_scope(registry, alice_key):
    consent = _consent(alice_key)
    registry.register(consent, ALICE_ID, NOW)
    with pytest.raises(ConsentMismatch, match="insurer-a"):
        registry.check(consent, ALICE_ID, "insurer-b", "claim_settlement", NOW)
    with pytest.raises(ConsentMismatch, match="purpose"):
        registry.check(consent, ALICE_ID, "insurer-a", "marketing", NOW)
    with pytest.raises(ConsentMismatch, match="scenario"):
        _check(registry, consent, scenario="underwriting")
    with pytest.raises(ConsentScopeExceeded, match="home_address"):
        _check(registry, consent, columns=["amount_fen", "home_address"])
    with pytest.raises(ConsentScopeExceeded, match="raw_record"):
        _check(registry, consent, outputs=["raw_record"])


def test_revocation_stops_later_checks(tmp_path, registry, alice_key):
    consent = _consent(alice_key)
    registry.register(consent, ALICE_ID, NOW)
    other_key = private_key_from_hex(os.urandom(32).hex())
    with pytest.raises(ConsentSignatureInvalid):
        registry.revoke(revoke_consent(consent, other_key, NOW), NOW)
    assert _check(registry, consent)
    revocation = revoke_consent(consent, alice_key, NOW + timedelta(hours=2))
    registry.revoke(revocation, NOW + timedelta(hours=2))
    assert _check(registry, consent, at=NOW + timedelta(hours=1))  # before it took effect
    with pytest.raises(ConsentRevoked):
        _check(registry, consent, at=NOW + timedelta(hours=2))
    # Persisted: a new registry on the same file sees the revocation.
    reopened = ConsentRegistry(sqlite3.connect(tmp_path / "consent.db"), pepper=b"p" * 32)
    with pytest.raises(ConsentRevoked):
        _check(reopened, consent, at=NOW + timedelta(hours=3))
    assert revocation.log_payload()["consent_id"] == consent.consent_id


def test_registration_is_idempotent_and_refuses_a_taken_id(registry, alice_key):
    consent = _consent(alice_key, consent_id="consent-fixed-0001")
    registry.register(consent, ALICE_ID, NOW)
    registry.register(consent, ALICE_ID, NOW)
    other = _consent(alice_key, consent_id="consent-fixed-0001", purpose="claim_audit")
    with pytest.raises(ConsentConflict):
        registry.register(other, ALICE_ID, NOW)
    assert registry.get("consent-fixed-0001") == consent
    with pytest.raises(ConsentConflict):
        registry.register_subject(ALICE_ID, "ab" * 32, NOW)


def test_bad_documents_name_the_field(alice_key):
    with pytest.raises(ConsentInvalid, match="not_before"):
        _consent(alice_key, not_before=datetime(2026, 11, 1))  # naive datetime
    with pytest.raises(ConsentInvalid, match="later than not_before"):
        _consent(alice_key, not_after=NOW - timedelta(days=1))
    with pytest.raises(ConsentInvalid, match="insurer"):
        _consent(alice_key, insurer="Insurer A")
    document = _consent(alice_key).model_dump(mode="json")
    document["terms"]["extra"] = 1
    with pytest.raises(ConsentInvalid, match=r"terms\.extra"):
        Consent.parse(document)


def test_a_failed_registration_leaves_nothing(registry, alice_key):
    consent = _consent(alice_key)
    with pytest.raises(ConsentSubjectMismatch):
        registry.register(consent, BOB_ID, NOW)
    registry.register_subject(BOB_ID, public_key_hex(private_key_from_hex("11" * 32)), NOW)
    with pytest.raises(ConsentSubjectMismatch):
        registry.register(consent, BOB_ID, NOW)
    assert registry.get(consent.consent_id) is None


def test_log_payload_carries_no_personal_data(alice_key):
    consent = _consent(alice_key)
    event = make_event("consent_given", "regulator", "req-1", consent.log_payload())
    assert ALICE_ID not in event.model_dump_json()


def test_every_refusal_about_the_person_is_one_refusal(registry, alice_key):
    """Whoever presents a consent cannot tell from the refusal whether the person has no key
    registered, another key, or another id: one class, one message."""
    insurer_key = private_key_from_hex(os.urandom(32).hex())
    consent = _consent(alice_key)
    registry.register(consent, ALICE_ID, NOW)
    causes = [
        lambda: registry.register(_consent(alice_key, national_id=BOB_ID), BOB_ID, NOW),
        lambda: registry.register(_consent(insurer_key, national_id=ALICE_ID), ALICE_ID, NOW),
        lambda: registry.register(_consent(alice_key), BOB_ID, NOW),
        lambda: _check(registry, consent, who=BOB_ID),
    ]
    refusals = []
    for cause in causes:
        with pytest.raises(ConsentMismatch) as refused:
            cause()
        refusals.append((type(refused.value), str(refused.value)))
    assert refusals == [(ConsentSubjectMismatch, SUBJECT_MISMATCH)] * len(causes)


def test_the_person_is_checked_after_the_document(registry, alice_key):
    """A document-only refusal (scope) comes first even when the person does not match, so
    the person-dependent refusal is the last word and can be made uniform by the caller."""
    consent = _consent(alice_key)
    registry.register(consent, ALICE_ID, NOW)
    with pytest.raises(ConsentScopeExceeded):
        _check(registry, consent, who=BOB_ID, columns=["not_in_scope"])


def test_in_force_lists_only_consents_that_allow_the_use_now(registry, alice_key):
    """What the statistic may count: in window, unrevoked, this insurer and purpose, scope."""
    wide = {"columns": SCOPE["columns"], "outputs": (*SCOPE["outputs"], "statistic")}
    allowed = _consent(alice_key, **wide)
    narrow = _consent(alice_key)  # the check's scope only
    other_purpose = _consent(alice_key, purpose="research", **wide)
    other_insurer = _consent(alice_key, insurer="insurer-b", **wide)
    revoked = _consent(alice_key, **wide)
    later = _consent(alice_key, not_before=NOW + timedelta(days=1), **wide)
    for consent in (allowed, narrow, other_purpose, other_insurer, revoked, later):
        registry.register(consent, ALICE_ID, NOW)
    registry.revoke(revoke_consent(revoked, alice_key, NOW), NOW)

    def in_force(at):
        return registry.in_force("insurer-a", "claim_settlement", at, scenario="claim_check",
                                 columns=["amount_fen"], outputs=["statistic"])

    assert in_force(NOW) == [allowed.consent_id]
    assert sorted(in_force(NOW + timedelta(days=2))) == sorted(
        [allowed.consent_id, later.consent_id])
    assert in_force(NOW + timedelta(days=31)) == []  # all ended
