"""TOTP second factor: RFC 6238 Appendix B vectors, ±1 step window, replay, backoff."""

import base64
import os
import sqlite3

import pytest
from cryptography.exceptions import InvalidTag

from governance.second_factor import (
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    FREE_FAILURES,
    SecondFactor,
    SecondFactorInvalid,
    SecondFactorLocked,
    SecondFactorReplayed,
    SecondFactorUnknownAccount,
    backoff_seconds,
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
    codes = lambda secret: (totp_code(secret, NOW + 60), totp_code(secret, NOW - 60),  # noqa: E731
                            "12345", "abcdef", "")
    for i in range(5):  # a fresh account each: the backoff does not close it in between
        secret = factor.enroll(f"ops-admin-{i}")
        with pytest.raises(SecondFactorInvalid):
            factor.verify(f"ops-admin-{i}", codes(secret)[i], now=NOW)
    with pytest.raises(SecondFactorUnknownAccount):
        factor.verify("nobody", "123456", now=NOW)


def _wrong(secret: str, at: float) -> str:
    """A code that is wrong at `at` for every step of the window."""
    window = {totp_code(secret, at + d) for d in (-30, 0, 30)}
    return next(f"{n:06d}" for n in range(10**6) if f"{n:06d}" not in window)


def test_guessing_codes_hits_an_exponential_backoff_that_survives_a_restart(tmp_path):
    """The attacker walks the code space as fast as the node answers: after FREE_FAILURES
    wrong codes nothing more is looked at, the right code included, until the stored time;
    each further wrong code doubles the wait; a new process on the store keeps it all."""
    db = tmp_path / "2fa.db"
    factor = SecondFactor(sqlite3.connect(db), wrapping_key=b"k" * 32)
    secret = factor.enroll("ops-admin")
    guesses = [f"{n:06d}" for n in range(200) if f"{n:06d}" != totp_code(secret, NOW)
               and f"{n:06d}" not in {totp_code(secret, NOW + d) for d in (-30, 30)}]
    outcomes = []
    for guess in guesses:
        try:
            factor.verify("ops-admin", guess, now=NOW)
        except SecondFactorInvalid:
            outcomes.append("looked at")
        except SecondFactorLocked as exc:
            outcomes.append(exc.retry_after_s)
    assert outcomes[:FREE_FAILURES] == ["looked at"] * FREE_FAILURES
    assert set(outcomes[FREE_FAILURES:]) == {int(BACKOFF_BASE_S)}  # refused unseen, no count
    assert factor.failure_state("ops-admin") == (FREE_FAILURES, NOW + BACKOFF_BASE_S)
    with pytest.raises(SecondFactorLocked):  # the right code too
        factor.verify("ops-admin", totp_code(secret, NOW), now=NOW + 1)

    restarted = SecondFactor(sqlite3.connect(db), wrapping_key=b"k" * 32)
    assert restarted.failure_state("ops-admin") == (FREE_FAILURES, NOW + BACKOFF_BASE_S)
    later = NOW + BACKOFF_BASE_S + 1
    with pytest.raises(SecondFactorInvalid):  # one guess bought by waiting, then twice as long
        restarted.verify("ops-admin", _wrong(secret, later), now=later)
    assert restarted.failure_state("ops-admin") == (FREE_FAILURES + 1,
                                                    later + 2 * BACKOFF_BASE_S)
    with pytest.raises(SecondFactorLocked) as closed:
        restarted.verify("ops-admin", totp_code(secret, later), now=later + 1)
    assert closed.value.retry_after_s == int(2 * BACKOFF_BASE_S) - 1
    opened = later + 2 * BACKOFF_BASE_S + 1
    assert restarted.verify("ops-admin", totp_code(secret, opened), now=opened)
    assert restarted.failure_state("ops-admin")[0] == 0  # only an accepted code resets


def test_the_backoff_doubles_up_to_a_day():
    assert [backoff_seconds(n) for n in range(FREE_FAILURES + 3)] == [
        0, 0, 0, BACKOFF_BASE_S, 2 * BACKOFF_BASE_S, 4 * BACKOFF_BASE_S][:FREE_FAILURES + 3]
    assert backoff_seconds(10**6) == BACKOFF_MAX_S == 24 * 3600
    waited, guesses = 0.0, 0
    while waited < 24 * 3600:  # the guesser who waits out every delay, for one day
        guesses += 1
        waited += backoff_seconds(guesses)
    assert guesses == 14  # the docstring's bound


def test_secrets_wrapped_under_an_earlier_key_are_rewrapped(tmp_path):
    conn = sqlite3.connect(tmp_path / "2fa.db")
    old_key, new_key = os.urandom(32), os.urandom(32)
    secret = SecondFactor(conn, wrapping_key=old_key).enroll("ops-admin")
    factor = SecondFactor(conn, wrapping_key=new_key)
    assert factor.rewrap_from(old_key) == 1
    assert factor.rewrap_from(old_key) == 0  # already under the new key
    assert factor.verify("ops-admin", totp_code(secret, NOW), now=NOW)
    with pytest.raises(InvalidTag):
        SecondFactor(conn, wrapping_key=old_key).verify(
            "ops-admin", totp_code(secret, NOW + 30), now=NOW + 30)


def test_secret_is_stored_encrypted(tmp_path, factor):
    secret = factor.enroll("ops-admin")
    conn = sqlite3.connect(tmp_path / "2fa.db")
    (stored,) = conn.execute("SELECT secret_ciphertext FROM second_factor_accounts").fetchone()
    assert secret.encode() not in stored
    other = SecondFactor(conn, wrapping_key=os.urandom(32))
    with pytest.raises(InvalidTag):
        other.verify("ops-admin", totp_code(secret, NOW), now=NOW)
