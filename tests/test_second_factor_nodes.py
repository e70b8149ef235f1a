"""Operator admin routes need a TOTP-opened session (RFC 6238 second factor): keys apart
from the KEK, private files, a backoff on guessed codes."""

import hashlib
import json
import sqlite3
import stat
import time

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from governance.second_factor import BACKOFF_BASE_S, FREE_FAILURES, totp_code
from parties.admin.api import ENROLL, OPEN_SESSION
from parties.admin.cli import secret_file
from parties.runtime.admin_session import ACCOUNT, SESSION_MAC_LABEL, TOTP_WRAP_LABEL
from parties.runtime.api import REFUSALS
from parties.runtime.client import NodeClient
from parties.runtime.errors import RemoteError
from parties.runtime.secrets import ADMIN_KEY_SALT
from parties.runtime.session_file import SESSION_HEADER, session_file
from tests.attack_helpers import raw_request
from tests.federation import Federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("2fa"), nodes=["operator", "health-authority"])
    fed.up()  # enrolls and logs in the operator's administrator
    yield fed
    fed.down()


def test_operator_admin_route_needs_a_session(fed):
    paths = fed.state.node("operator")
    with NodeClient(fed.state, fed.topology, "operator") as client:
        assert client.send("operator", REFUSALS).status_code == 200
    backup = paths.root / "session.bak"
    session_file(paths).rename(backup)
    try:
        with NodeClient(fed.state, fed.topology, "operator") as client, \
                pytest.raises(RemoteError) as refused:
            client.send("operator", REFUSALS)
    finally:
        backup.rename(session_file(paths))
    assert refused.value.http_status == 401
    assert refused.value.error == "SecondFactorRequired"


def test_other_nodes_admin_routes_need_no_second_factor(fed):
    with NodeClient(fed.state, fed.topology, "health-authority") as client:
        assert client.send("health-authority", REFUSALS).status_code == 200


def test_second_enrollment_needs_a_session_and_is_refused(fed):
    with NodeClient(fed.state, fed.topology, "operator") as client, \
            pytest.raises(RemoteError) as refused:
        client.send("operator", ENROLL)
    assert refused.value.error == "AlreadyEnrolled"


def test_wrong_and_replayed_codes_are_refused(fed):
    secret = secret_file(fed.state, "operator").read_text().strip()
    with NodeClient(fed.state, fed.topology, "operator") as client:
        current = totp_code(secret, time.time())
        wrong_code = "000000" if current != "000000" else "111111"
        with pytest.raises(RemoteError) as wrong:
            client.send("operator", OPEN_SESSION, json={"code": wrong_code})
        assert wrong.value.error == "SecondFactorInvalid"
        # The code that opened the fixture's session is spent for this time step.
        used = totp_code(secret, time.time())
        with pytest.raises(RemoteError) as replayed:
            client.send("operator", OPEN_SESSION, json={"code": used})
        assert replayed.value.error in ("SecondFactorReplayed", "SecondFactorInvalid")


def test_forged_session_token_is_refused(fed):
    forged = f"{int(time.time()) + 600}.00.{'ab' * 32}"
    with NodeClient(fed.state, fed.topology, "operator") as client, \
            pytest.raises(RemoteError) as refused:
        client.send("operator", REFUSALS, headers={SESSION_HEADER: forged})
    assert refused.value.error == "SecondFactorRequired"


def test_a_leaked_kek_file_alone_does_not_give_the_totp_secret(fed):
    """The attacker has `kek.key` and the store: neither the former derivation from the KEK
    nor any HKDF subkey of the KEK opens the wrapped TOTP secret; the admin key does."""
    paths = fed.state.node("operator")
    kek = (paths.root / "kek.key").read_bytes()
    conn = sqlite3.connect(f"file:{paths.db}?mode=ro", uri=True)
    try:
        (sealed,) = conn.execute("SELECT secret_ciphertext FROM second_factor_accounts "
                                 "WHERE account = ?", (ACCOUNT,)).fetchone()
    finally:
        conn.close()
    sealed = bytes(sealed)
    candidates = [hashlib.sha256(b"cogov-second-factor|" + kek).digest(), kek]
    candidates += [HKDF(SHA256(), 32, salt, label.encode()).derive(kek)
                   for salt in (None, ADMIN_KEY_SALT)
                   for label in (TOTP_WRAP_LABEL, SESSION_MAC_LABEL)]
    for key in candidates:
        with pytest.raises(InvalidTag):
            AESGCM(key).decrypt(sealed[:12], sealed[12:], ACCOUNT.encode())
    admin_key = (paths.root / "admin.key").read_bytes()
    assert admin_key != kek
    wrap = HKDF(SHA256(), 32, ADMIN_KEY_SALT, TOTP_WRAP_LABEL.encode()).derive(admin_key)
    opened = AESGCM(wrap).decrypt(sealed[:12], sealed[12:], ACCOUNT.encode())
    assert opened.decode() == secret_file(fed.state, "operator").read_text().strip()


def test_node_directories_and_secret_files_are_private(fed):
    for node in ("operator", "health-authority"):
        root = fed.state.node(node).root
        assert stat.S_IMODE(root.stat().st_mode) == 0o700, node
        for name in ("node.db", "kek.key", "admin.key", "keyring.json"):
            if (root / name).exists():
                assert stat.S_IMODE((root / name).stat().st_mode) == 0o600, (node, name)
        assert (root / "node.db").exists() and (root / "admin.key").exists()


def test_guessing_codes_over_the_wire_hits_the_backoff(fed):
    """Last in this module: it closes the operator's account. The guesser gets a typed 429
    with Retry-After once the free failures are spent, and the node's store holds the count
    and the next time a code is looked at."""
    secret = secret_file(fed.state, "operator").read_text().strip()
    free = FREE_FAILURES - _failure_state(fed)[0]  # earlier tests in the module made some
    window = {totp_code(secret, time.time() + d) for d in (-60, -30, 0, 30, 60)}
    guesses = [f"{n:06d}" for n in range(20) if f"{n:06d}" not in window][:FREE_FAILURES + 2]
    seen = []
    for guess in guesses:
        response = raw_request(fed, "operator", "operator", OPEN_SESSION.method,
                               OPEN_SESSION.path, content=json.dumps({"code": guess}).encode(),
                               headers={"Content-Type": "application/json"})
        seen.append((response.status_code, response.json()["error"],
                     response.headers.get("Retry-After")))
    assert [s[:2] for s in seen[:free]] == [(401, "SecondFactorInvalid")] * free
    for status, error, retry_after in seen[free:]:
        assert (status, error) == (429, "SecondFactorLocked")
        assert 0 < int(retry_after) <= BACKOFF_BASE_S
    failures, locked_until = _failure_state(fed)
    assert failures == FREE_FAILURES and locked_until > time.time()


def _failure_state(fed) -> tuple[int, float]:
    conn = sqlite3.connect(f"file:{fed.state.node('operator').db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT failures, locked_until FROM second_factor_accounts "
                            "WHERE account = ?", (ACCOUNT,)).fetchone()
    finally:
        conn.close()
