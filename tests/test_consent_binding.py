"""Attacks on the consent's binding to the person (format v2: the key is the only binding).

The adversary holds consents (an insurer, or anyone who reads the serving node's store)
and wants the national id behind one, or wants one person's consent to serve for
another. The node-level attacks (a consent of A presented for B's token, a query that
carries a copied commitment) are in `tests/test_claim_nodes.py`,
`tests/test_attacks.py` and `tests/test_verdict_oracle.py`.
"""

import hashlib
import hmac
import json
import os
import re
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from governance import consent as consent_lib
from governance.consent import (
    RETIRED_SCHEME,
    SUBJECT_MISMATCH,
    Consent,
    ConsentConflict,
    ConsentRegistry,
    ConsentSchemeRetired,
    ConsentSubjectMismatch,
    consent_signing_key,
    issue_consent,
    normalize_national_id,
)
from governance.ledger.signing import public_key_hex
from governance.migrations import apply_migrations
from parties.ingest import authority

NOW = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)
BIRTH = "19900101"
TRUE_ID = f"320505{BIRTH}1234"
# A small id space: one district, one birth date, the last four characters.
SMALL_SPACE = [f"320505{BIRTH}{n:04d}" for n in range(10_000)]
SCRYPT_SLICE = 64  # candidates the attacker also scrypts (each ~30 ms): the true id among them


def _consent(key, insurer: str = "insurer-a", consent_id: str | None = None) -> Consent:
    return issue_consent(key, insurer=insurer, purpose="claim_settlement",
                         columns=("self_pay_fen",), outputs=("visit_found",),
                         not_before=NOW - timedelta(hours=1), not_after=NOW + timedelta(days=3),
                         consent_id=consent_id)


def _v1_commitment(national_id: str, consent_id: str, nonce: str) -> str:
    """The published v1 scheme, as the attacker knows it."""
    salt = b"cogov-consent-subject-v1\x00" + consent_id.encode() + b"\x00" + nonce.encode()
    return hashlib.scrypt(national_id.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32).hex()


def _attacker_guesses(document: dict, candidates: list[str]) -> list[str]:
    """Every candidate id some id-derived value of which appears in the document.

    The attacker tries the functions a designer might have used (the v1 scrypt commitment
    under the document's own consent id and nonce, bare and salted SHA-256, HMAC under the
    document's public values) against every hex value the document carries.
    """
    text = json.dumps(document)
    values = set(re.findall(r"[0-9a-f]{32,}", text))
    terms = document["terms"]
    salts = [terms["consent_id"].encode(), terms["nonce"].encode(),
             terms["subject"]["public_key"].encode()]
    scrypt_slice = set(candidates[-SCRYPT_SLICE:])
    found = []
    for candidate in candidates:
        raw = candidate.encode()
        guesses = {hashlib.sha256(raw).hexdigest()}
        guesses |= {hashlib.sha256(s + raw).hexdigest() for s in salts}
        guesses |= {hmac.new(s, raw, "sha256").hexdigest() for s in salts}
        if candidate in scrypt_slice:
            guesses.add(_v1_commitment(candidate, terms["consent_id"], terms["nonce"]))
        if candidate in text or any(g in values or g[:32] in values for g in guesses):
            found.append(candidate)
    return found


def _candidates() -> list[str]:
    """The small space, the true id last (in the scrypted slice)."""
    return [c for c in SMALL_SPACE if c != TRUE_ID] + [TRUE_ID]


def test_control_a_v1_consent_gives_its_id_up_to_an_offline_search():
    """The control: the v1 document carried scrypt(id) with its salt; the same search names
    the person."""
    consent = _consent(consent_signing_key(os.urandom(32), "insurer-a"))
    document = consent.model_dump(mode="json")
    terms = document["terms"]
    terms["subject"] = {"scheme": RETIRED_SCHEME, "public_key": terms["subject"]["public_key"],
                        "id_commitment": _v1_commitment(TRUE_ID, terms["consent_id"],
                                                        terms["nonce"])}
    assert _attacker_guesses(document, _candidates()) == [TRUE_ID]


def test_brute_forcing_a_v2_consent_over_a_small_id_space_finds_nothing(tmp_path):
    """The same search over a v2 consent: no candidate, the true id included, matches
    anything in the document. The only check that ties the consent to an id is the
    registry's, indexed by HMAC under the key holder's secret: with the store but without
    that key, no candidate verifies; with it (the key holder alone), the true one does."""
    key = consent_signing_key(os.urandom(32), "insurer-a")
    consent = _consent(key)
    assert set(consent.terms.subject.model_dump()) == {"public_key"}
    assert _attacker_guesses(consent.model_dump(mode="json"), _candidates()) == []

    secret = os.urandom(32)
    db = tmp_path / "holder.db"
    holder = ConsentRegistry(sqlite3.connect(db), pepper=secret)
    holder.register_subject(TRUE_ID, public_key_hex(key), NOW, insurer="insurer-a")
    holder.register(consent, TRUE_ID, NOW)
    # The attacker copies the whole store and guesses the key too.
    copied = sqlite3.connect(db)
    digests = {bytes(r[0]) for r in copied.execute("SELECT id_digest FROM consent_subject_keys")}
    guessed_key = os.urandom(32)
    hits = [c for c in SMALL_SPACE
            if hmac.digest(guessed_key, normalize_national_id(c).encode(), "sha256") in digests]
    assert hits == []
    assert [c for c in SMALL_SPACE[:1235]
            if hmac.digest(secret, normalize_national_id(c).encode(), "sha256") in digests
            ] == [TRUE_ID]  # the control: the key holder, and only it, can test an id


def test_a_consent_of_person_a_is_refused_for_person_b(tmp_path):
    """B's registered key is another key: A's consent does not bind B, whichever way it is
    presented; the refusal is the uniform one."""
    registry = ConsentRegistry(sqlite3.connect(tmp_path / "c.db"), pepper=os.urandom(32))
    key_a = consent_signing_key(os.urandom(32), "insurer-a")
    key_b = consent_signing_key(os.urandom(32), "insurer-a")
    bob = f"320505{BIRTH}5678"
    registry.register_subject(TRUE_ID, public_key_hex(key_a), NOW, insurer="insurer-a")
    registry.register_subject(bob, public_key_hex(key_b), NOW, insurer="insurer-a")
    consent_a = _consent(key_a)
    registry.register(consent_a, TRUE_ID, NOW)
    with pytest.raises(ConsentConflict, match="one person"):  # A's key cannot become B's too
        registry.register_subject(bob, public_key_hex(key_a), NOW, insurer="insurer-b")
    for attempt in (lambda: registry.check_subject(consent_a, bob),
                    lambda: registry.register(consent_a, bob, NOW)):
        with pytest.raises(ConsentSubjectMismatch) as refused:
            attempt()
        assert str(refused.value) == SUBJECT_MISMATCH


def test_the_health_authority_binds_a_consent_key_to_one_person(tmp_path):
    """A key registered for a second person is refused: otherwise one consent would bind
    two people. A store holding such a key from before drops both rows."""
    conn = sqlite3.connect(tmp_path / "ha.db")
    apply_migrations(conn, authority.COMPONENT, authority.MIGRATIONS[:2])
    shared, own = os.urandom(32), os.urandom(32)
    alice, bob, carol = os.urandom(32), os.urandom(32), os.urandom(32)
    with conn:
        conn.executemany("INSERT INTO ha_consumer_keys VALUES (?, ?, ?)", [
            (alice, "insurer-a", shared), (bob, "insurer-a", shared), (carol, "insurer-a", own)])
    apply_migrations(conn, authority.COMPONENT, authority.MIGRATIONS)
    assert conn.execute("SELECT p1 FROM ha_consumer_keys").fetchall() == [(carol,)]
    with pytest.raises(sqlite3.IntegrityError), conn:
        conn.execute("INSERT INTO ha_consumer_keys VALUES (?, ?, ?)", (alice, "insurer-a", own))
    with conn:  # Alice's own key is fine
        conn.execute("INSERT INTO ha_consumer_keys VALUES (?, ?, ?)",
                     (alice, "insurer-a", os.urandom(32)))


# --- migration from v1 ----------------------------------------------------------------------


def _v1_document(key) -> tuple[str, str]:
    consent = _consent(key)
    document = consent.model_dump(mode="json")
    commitment = _v1_commitment(TRUE_ID, consent.consent_id, consent.terms.nonce)
    document["terms"]["subject"] = {"scheme": RETIRED_SCHEME, "id_commitment": commitment,
                                    "public_key": public_key_hex(key)}
    return json.dumps(document), commitment


def test_a_v1_document_is_refused_with_a_typed_error():
    document, _ = _v1_document(consent_signing_key(os.urandom(32), "insurer-a"))
    with pytest.raises(ConsentSchemeRetired, match="issues a new consent"):
        Consent.parse(document)
    assert ConsentSchemeRetired.http_status == 410


def test_stored_v1_consents_are_retired_and_scrubbed(tmp_path):
    """A store from before v2: its v1 consents (and their revocations) leave the store, the
    commitment's bytes are gone from the file, and the id answers `ConsentSchemeRetired`;
    the id cannot be taken again, a new consent registers as usual."""
    db = tmp_path / "regulator.db"
    conn = sqlite3.connect(db)
    apply_migrations(conn, consent_lib.COMPONENT, consent_lib.MIGRATIONS[:2])
    key = consent_signing_key(os.urandom(32), "insurer-a")
    document, commitment = _v1_document(key)
    consent_id = json.loads(document)["terms"]["consent_id"]
    with conn:
        conn.execute("INSERT INTO consents VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
            consent_id, document, "00" * 32, "insurer-a", "claim_settlement",
            NOW.isoformat(), (NOW + timedelta(days=3)).isoformat(), NOW.isoformat()))
        conn.execute("INSERT INTO consent_revocations VALUES (?, ?, ?, ?)",
                     (consent_id, "{}", NOW.isoformat(), NOW.isoformat()))
    conn.close()
    assert commitment.encode() in db.read_bytes()

    conn = sqlite3.connect(db)
    registry = ConsentRegistry(conn, pepper=b"p" * 32)  # migrates
    with pytest.raises(ConsentSchemeRetired):
        registry.get(consent_id)
    assert conn.execute("SELECT COUNT(*) FROM consents").fetchone() == (0,)
    assert conn.execute("SELECT COUNT(*) FROM consent_revocations").fetchone() == (0,)
    with pytest.raises(ConsentConflict):
        registry.store(_consent(key, consent_id=consent_id), NOW)
    fresh = _consent(key)
    assert registry.store(fresh, NOW) and registry.get(fresh.consent_id) == fresh
    conn.close()
    assert commitment.encode() not in db.read_bytes()
