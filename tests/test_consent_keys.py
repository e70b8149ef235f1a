"""Per-insurer consent keys: the derivation in the consumer's app, the registrar's binding
per (person, insurer), and the store migrations from one key per person.

The node-level attack (the regulator linking a person's consents to two insurers by their
keys, and a consent signed with the wrong insurer's key) is in
`tests/test_unlinkable_across_insurers.py`.
"""

import hmac
import os
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from governance import consent as consent_lib
from governance.consent import (
    ConsentConflict,
    ConsentInvalid,
    ConsentMismatch,
    ConsentRegistry,
    ConsentSubjectMismatch,
    consent_signing_key,
    issue_consent,
    normalize_national_id,
)
from governance.ledger.signing import public_key_hex
from governance.migrations import apply_migrations
from parties.ingest import authority, circulation

NOW = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)
ALICE_ID = "320502199001011234"


def _consent(key, insurer: str):
    return issue_consent(key, insurer=insurer, purpose="claim_settlement",
                         columns=("self_pay_fen",), outputs=("visit_found",),
                         not_before=NOW - timedelta(hours=1), not_after=NOW + timedelta(days=3))


# --- the derivation ---------------------------------------------------------------------------


def test_one_master_seed_gives_a_stable_unrelated_key_per_insurer():
    master = os.urandom(32)
    a, b = consent_signing_key(master, "insurer-a"), consent_signing_key(master, "insurer-b")
    assert a.private_bytes_raw() == consent_signing_key(master, "insurer-a").private_bytes_raw()
    assert public_key_hex(a) != public_key_hex(b)
    other = os.urandom(32)  # without the master seed neither key comes out
    assert public_key_hex(consent_signing_key(other, "insurer-a")) not in {
        public_key_hex(a), public_key_hex(b)}


def test_the_derivation_is_hkdf_sha256_of_the_master_seed_and_the_insurer():
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    master = bytes(range(32))
    seed = HKDF(SHA256(), 32, b"cogov/consent-key/v1",
                b"cogov consent signing key for insurer\x00insurer-a").derive(master)
    assert consent_signing_key(master, "insurer-a").private_bytes_raw() == seed


@pytest.mark.parametrize("master, insurer", [
    (b"short", "insurer-a"), (os.urandom(32), "Insurer A"), (os.urandom(32), ""),
    ("00" * 32, "insurer-a"),
])
def test_bad_derivation_inputs_are_refused(master, insurer):
    with pytest.raises(ConsentInvalid):
        consent_signing_key(master, insurer)


# --- the registrar ----------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path):
    return ConsentRegistry(sqlite3.connect(tmp_path / "consent.db"), pepper=b"p" * 32)


def test_the_registrar_binds_one_key_per_person_and_insurer(registry):
    master = os.urandom(32)
    keys = {i: consent_signing_key(master, i) for i in ("insurer-a", "insurer-b")}
    for insurer, key in keys.items():
        registry.register_subject(ALICE_ID, public_key_hex(key), NOW, insurer=insurer)
    for insurer, key in keys.items():
        assert registry.subject_key(ALICE_ID, insurer) == public_key_hex(key)
        registry.register(_consent(key, insurer), ALICE_ID, NOW)
    # signed with the insurer-a key, addressed to insurer-b: not the key bound for insurer-b
    with pytest.raises(ConsentMismatch):
        registry.register(_consent(keys["insurer-a"], "insurer-b"), ALICE_ID, NOW)
    # no key bound for insurer-c (and none for every insurer)
    with pytest.raises(ConsentSubjectMismatch):
        registry.register(_consent(consent_signing_key(master, "insurer-c"), "insurer-c"),
                          ALICE_ID, NOW)


def test_one_key_for_two_insurers_is_refused_and_changes_nothing(registry):
    key = public_key_hex(consent_signing_key(os.urandom(32), "insurer-a"))
    registry.register_subject(ALICE_ID, key, NOW, insurer="insurer-a")
    with pytest.raises(ConsentConflict):
        registry.register_subject(ALICE_ID, key, NOW, insurer="insurer-b")
    assert registry.subject_key(ALICE_ID, "insurer-b") is None
    with pytest.raises(ConsentInvalid):
        registry.register_subject(ALICE_ID, key, NOW, insurer="Insurer B")


# --- migrations from one key per person ----------------------------------------------------------


def test_a_consent_store_keeps_its_single_key_for_every_insurer(tmp_path):
    conn = sqlite3.connect(tmp_path / "consent.db")
    apply_migrations(conn, consent_lib.COMPONENT, consent_lib.MIGRATIONS[:1])
    key = consent_signing_key(os.urandom(32), "insurer-a")
    digest = hmac.digest(b"p" * 32, normalize_national_id(ALICE_ID).encode(), "sha256")
    with conn:  # a subject key as the registrar bound it before keys were per insurer
        conn.execute("INSERT INTO consent_subjects VALUES (?, ?, ?)",
                     (digest, public_key_hex(key), NOW.isoformat()))
    registry = ConsentRegistry(conn, pepper=b"p" * 32)  # migrates
    assert registry.subject_key(ALICE_ID, "insurer-a") == public_key_hex(key)
    assert registry.subject_key(ALICE_ID, "insurer-b") == public_key_hex(key)  # as before
    registry.register(_consent(key, "insurer-b"), ALICE_ID, NOW)


@pytest.mark.parametrize("component, migrations, table, legacy", [
    (authority.COMPONENT, authority.MIGRATIONS, "ha_consumer_keys",
     "INSERT INTO ha_consumer_keys (p1, public_key) VALUES (?, ?)"),
    (circulation.COMPONENT, circulation.MIGRATIONS, "circ_persons",
     "INSERT INTO circ_persons (p1, public_key, stream) VALUES (?, ?, 'p-old')"),
])
def test_a_key_delivered_before_is_kept_bound_to_no_insurer(tmp_path, component, migrations,
                                                             table, legacy):
    """The health authority's and the operator's single keys move to insurer '': kept, but
    they open no insurer's check (the operator reads `WHERE insurer = <the insurer>`)."""
    conn = sqlite3.connect(tmp_path / "store.db")
    apply_migrations(conn, component, migrations[:1])
    p1, key = os.urandom(32), os.urandom(32)
    with conn:
        conn.execute(legacy, (p1, key))
    apply_migrations(conn, component, migrations)
    rows = conn.execute(f"SELECT p1, insurer, public_key FROM {table}").fetchall()
    assert rows == [(p1, "", key)]
    with conn:  # now one key per (person, insurer)
        conn.execute(f"INSERT INTO {table} (p1, insurer, public_key) VALUES (?, ?, ?)",
                     (p1, "insurer-a", os.urandom(32)))
    with pytest.raises(sqlite3.IntegrityError), conn:
        conn.execute(f"INSERT INTO {table} (p1, insurer, public_key) VALUES (?, ?, ?)",
                     (p1, "insurer-a", os.urandom(32)))
