"""Second factor for administrators' privileged actions: TOTP (RFC 6238) with replay refusal.

Secrets are stored encrypted (AES-GCM under a node key kept apart from the node's
key-encryption key: `parties.runtime.admin_session`) in SQLite. A code is accepted within
±1 time step (clock drift); once a step's code is accepted, that step and every earlier
one are refused for the account (RFC 6238 §5.2: a code is single-use).

Wrong codes back off exponentially, and the state is in the store, so a restart does not
reset it: after `FREE_FAILURES` wrong codes in a row, the n-th wrong code closes the
account for `BACKOFF_BASE_S` · 2^(n - FREE_FAILURES) seconds, at most `BACKOFF_MAX_S`
(one day). Only an accepted code resets the count, so waiting out one delay buys one
guess, not a fresh round. A code sent while closed is refused (`SecondFactorLocked`, 429,
with the seconds to wait) without being looked at, and changes nothing. The limit this
gives: 3 of 10^6 codes open a session (the ±1 window), so a guesser who waits out every
delay has made 14 guesses after a day and one a day after that: a chance of about 4·10^-5
after a day and about 10^-3 after a year. `failures` counts wrong codes since the last
accepted one and `locked_until` is the next time a code is looked at.
"""

import base64
import hmac
import math
import os
import sqlite3
import time
from dataclasses import dataclass

import pyotp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from governance.errors import GovernanceError
from governance.ledger.transactions import write_transaction
from governance.migrations import apply_migrations

COMPONENT = "second_factor"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE second_factor_accounts (
        account TEXT PRIMARY KEY,
        secret_ciphertext BLOB NOT NULL,
        last_step INTEGER NOT NULL DEFAULT -1,
        failures INTEGER NOT NULL DEFAULT 0,
        locked_until REAL NOT NULL DEFAULT 0
    );
    """,
)

FREE_FAILURES = 3
BACKOFF_BASE_S = 30.0
BACKOFF_MAX_S = 24 * 3600.0


class SecondFactorError(GovernanceError):
    http_status = 401


class SecondFactorUnknownAccount(SecondFactorError):
    pass


class SecondFactorInvalid(SecondFactorError):
    """The code is wrong or outside the accepted window."""


class SecondFactorReplayed(SecondFactorError):
    """The code (or an older one) was already accepted."""


class SecondFactorLocked(SecondFactorError):
    """Too many wrong codes; try again after `retry_after_s` seconds."""

    http_status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def backoff_seconds(failures: int) -> float:
    """How long the account stays closed after its `failures`-th wrong code in a row."""
    if failures < FREE_FAILURES:
        return 0.0
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** min(failures - FREE_FAILURES, 32))


def provision_secret() -> str:
    """A fresh 160-bit TOTP secret in base32 (the RFC 4226 recommended length)."""
    return base64.b32encode(os.urandom(20)).decode("ascii")


def provisioning_uri(secret: str, account: str, issuer: str = "cogov") -> str:
    """The otpauth:// URI an authenticator app scans."""
    return pyotp.TOTP(secret).provisioning_uri(name=account, issuer_name=issuer)


def totp_code(
    secret: str, at: float, *, digits: int = 6, step: int = 30, digest: str = "sha1"
) -> str:
    """The TOTP code for `secret` at Unix time `at`."""
    return pyotp.TOTP(secret, digits=digits, interval=step, digest=digest).at(int(at))


@dataclass(frozen=True)
class Accepted:
    account: str
    step: int


class SecondFactor:
    """Enrolment and verification of TOTP codes, persisted per account."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        wrapping_key: bytes,
        *,
        digits: int = 6,
        step: int = 30,
        window: int = 1,
    ) -> None:
        if len(wrapping_key) not in (16, 24, 32):
            raise ValueError("wrapping_key: an AES key of 16, 24 or 32 bytes")
        apply_migrations(conn, COMPONENT, MIGRATIONS)
        self._conn = conn
        self._aead = AESGCM(wrapping_key)
        self._digits, self._step, self._window = digits, step, window

    def enroll(self, account: str) -> str:
        """Create (or replace) the account's secret; returns it for the authenticator app."""
        secret = provision_secret()
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, secret.encode(), account.encode())
        with write_transaction(self._conn):
            self._conn.execute(
                "INSERT OR REPLACE INTO second_factor_accounts (account, secret_ciphertext)"
                " VALUES (?, ?)",
                (account, sealed),
            )
        return secret

    def verify(self, account: str, code: str, now: float | None = None) -> Accepted:
        """Accept a fresh code or raise; the state change is one transaction."""
        now = time.time() if now is None else now
        with write_transaction(self._conn):
            row = self._conn.execute(
                "SELECT secret_ciphertext, last_step, failures, locked_until"
                " FROM second_factor_accounts WHERE account = ?",
                (account,),
            ).fetchone()
            if row is None:
                raise SecondFactorUnknownAccount(f"no second factor enrolled for {account}")
            sealed, last_step, failures, locked_until = row
            if now < locked_until:
                wait = math.ceil(locked_until - now)
                raise SecondFactorLocked(f"{account} is closed for {wait} s after "
                                         f"{failures} wrong codes", wait)
            secret = self._aead.decrypt(sealed[:12], sealed[12:], account.encode()).decode()
            matched = self._matching_step(secret, code.strip(), now)
            if matched is not None and matched <= last_step:
                raise SecondFactorReplayed("this code was already used")
            if matched is None:
                failures += 1
                self._conn.execute(
                    "UPDATE second_factor_accounts SET failures = ?, locked_until = ?"
                    " WHERE account = ?",
                    (failures, now + backoff_seconds(failures), account),
                )
                failure = SecondFactorInvalid("wrong code")
            else:
                self._conn.execute(
                    "UPDATE second_factor_accounts SET last_step = ?, failures = 0"
                    " WHERE account = ?",
                    (matched, account),
                )
                return Accepted(account=account, step=matched)
        raise failure  # after commit, so the failure count is kept

    def failure_state(self, account: str) -> tuple[int, float]:
        """(wrong codes since the last accepted one, the next time a code is looked at)."""
        row = self._conn.execute(
            "SELECT failures, locked_until FROM second_factor_accounts WHERE account = ?",
            (account,)).fetchone()
        if row is None:
            raise SecondFactorUnknownAccount(f"no second factor enrolled for {account}")
        return int(row[0]), float(row[1])

    def rewrap_from(self, old_key: bytes) -> int:
        """Re-encrypt under this instance's key the secrets still sealed under `old_key`
        (an earlier key); returns how many. Secrets already under this key are left alone."""
        old = AESGCM(old_key)
        moved = 0
        with write_transaction(self._conn):
            rows = self._conn.execute(
                "SELECT account, secret_ciphertext FROM second_factor_accounts").fetchall()
            for account, sealed in rows:
                try:
                    secret = old.decrypt(sealed[:12], sealed[12:], account.encode())
                except InvalidTag:
                    continue
                nonce = os.urandom(12)
                self._conn.execute(
                    "UPDATE second_factor_accounts SET secret_ciphertext = ? WHERE account = ?",
                    (nonce + self._aead.encrypt(nonce, secret, account.encode()), account))
                moved += 1
        return moved

    def _matching_step(self, secret: str, code: str, now: float) -> int | None:
        if len(code) != self._digits or not code.isdigit():
            return None
        totp = pyotp.TOTP(secret, digits=self._digits, interval=self._step)
        current = int(now) // self._step
        found = None
        for step in range(current - self._window, current + self._window + 1):
            # Compare every candidate: timing does not reveal which step matched.
            if hmac.compare_digest(totp.at(step * self._step), code) and found is None:
                found = step
        return found
