"""TOTP second factor: RFC 6238 Appendix B vectors, ±1 step window, replay, lockout."""

import base64
import os
import sqlite3

import pytest
from cryptography.exceptions import InvalidTag

from governance.second_factor import (
    SecondFactor,
    SecondFactorInvalid,
    SecondFactorLocked,
    SecondFactorReplayed,
    SecondFactorUnknownAccount,
    provisioning_uri,
    totp_code,
)

# RFC 6238 Appendix B: seeds are the ASCII strings below, T0 = 0, X = 30 s, 8 digits.
SEEDS = {
    "sha1": b"12345678901234567890",
    "sha256": b"12345678901234567890123456789012",
    "sha512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
APPENDIX_B = [
    (59, {"sha1": "94287082", "sha256": "46119246", "sha512": "90693936"}),
    (1111111109, {"sha1": "07081804", "sha256": "68084774", "sha512": "25091201"}),
    (1111111111, {"sha1": "14050471", "sha256": "67062674", "sha512": "99943326"}),
    (1234567890, {"sha1": "89005924", "sha256": "91819424", "sha512": "93441116"}),
    (2000000000, {"sha1": "69279037", "sha256": "90698825", "sha512": "38618901"}),
    (20000000000, {"sha1": "65353130", "sha256": "77737706", "sha512": "47863826"}),
]


@pytest.mark.parametrize(("at", "expected"), APPENDIX_B, ids=[str(t) for t, _ in APPENDIX_B])
def test_rfc6238_appendix_b(at, expected):
    for digest, seed in SEEDS.items():
        secret = base64.b32encode(seed).decode()
        assert totp_code(secret, at, digits=8, digest=digest) == expected[digest], digest


NOW = 1_794_000_015.0  # mid-step


@pytest.fixture
def factor(tmp_path):
    return SecondFactor(sqlite3.connect(tmp_path / "2fa.db"), wrapping_key=b"k" * 32)


def test_enrolled_code_is_accepted_once_within_one_step(factor):
    secret = factor.enroll("ops-admin")
    assert provisioning_uri(secret, "ops-admin").startswith("otpauth://totp/cogov:ops-admin?")
    previous = totp_code(secret, NOW - 30)
    assert factor.verify("ops-admin", previous, now=NOW).step == int(NOW) // 30 - 1
    current = totp_code(secret, NOW)
    accepted = factor.verify("ops-admin", current, now=NOW)
    assert accepted.step == int(NOW) // 30
    with pytest.raises(SecondFactorReplayed):
        factor.verify("ops-admin", current, now=NOW + 1)
    with pytest.raises(SecondFactorReplayed):  # an older code after a newer one
        factor.verify("ops-admin", previous, now=NOW)
    following = totp_code(secret, NOW + 30)
    assert factor.verify("ops-admin", following, now=NOW)  # +1 step of clock drift


def test_codes_outside_the_window_or_malformed_are_wrong(factor):
    secret = factor.enroll("ops-admin")
    for code in (totp_code(secret, NOW + 60), totp_code(secret, NOW - 60), "12345", "abcdef", ""):
        with pytest.raises(SecondFactorInvalid):
            factor.verify("ops-admin", code, now=NOW)
    with pytest.raises(SecondFactorUnknownAccount):
        factor.verify("nobody", "123456", now=NOW)


def test_five_wrong_codes_lock_the_account(factor):
    secret = factor.enroll("ops-admin")
    right = totp_code(secret, NOW)
    wrong = f"{(int(right) + 1) % 10**6:06d}"
    for _ in range(5):
        with pytest.raises(SecondFactorInvalid):
            factor.verify("ops-admin", wrong, now=NOW)
    with pytest.raises(SecondFactorLocked):
        factor.verify("ops-admin", right, now=NOW + 1)
    later = NOW + 301
    assert factor.verify("ops-admin", totp_code(secret, later), now=later)


def test_secret_is_stored_encrypted(tmp_path, factor):
    secret = factor.enroll("ops-admin")
    conn = sqlite3.connect(tmp_path / "2fa.db")
    (stored,) = conn.execute("SELECT secret_ciphertext FROM second_factor_accounts").fetchone()
    assert secret.encode() not in stored
    other = SecondFactor(conn, wrapping_key=os.urandom(32))
    with pytest.raises(InvalidTag):
        other.verify("ops-admin", totp_code(secret, NOW), now=NOW)
