"""The regulator's HE decryption key for the claim check, where the regulator keeps it.

Generated on first use and stored sealed with AES-256-GCM under the node's key-encryption
key (as the node's xID keys are), so a copy of the database alone opens nothing. The
regulator serves its public context to insurers (`HE_PUBLIC_CONTEXT`) and hands it to the
operator before the first he batch (`KEEP_HE_CONTEXT`); it decrypts only the operator's
answers, into verdict bits (`mpc.he`).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from parties.runtime.context import NodeContext

if TYPE_CHECKING:
    from mpc.he import HeDecryptionKey

COMPONENT = "claims_he_key"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE claim_he_key (
        slot INTEGER PRIMARY KEY CHECK (slot = 1), digest TEXT NOT NULL, sealed BLOB NOT NULL,
        created_at TEXT NOT NULL DEFAULT (datetime('now'))
    )
    """,
)
_AD = b"cogov claim he key v1"


class RegulatorHeKey:
    """The node's one key, loaded (or generated and stored) on first use."""

    def __init__(self, ctx: NodeContext) -> None:
        self._ctx = ctx
        self._lock = threading.Lock()
        self._key: HeDecryptionKey | None = None
        self.delivered_to: set[str] = set()  # operator nodes known to hold the public context

    def key(self) -> HeDecryptionKey:
        from mpc.he import HeDecryptionKey  # TenSEAL: loaded by the regulator on first he use

        with self._lock:
            if self._key is None:
                store, kek = self._ctx.store, self._ctx.secrets.kek
                with store.lock:
                    row = store.conn.execute("SELECT sealed FROM claim_he_key").fetchone()
                if row is not None:
                    sealed = bytes(row[0])
                    self._key = HeDecryptionKey.from_bytes(
                        AESGCM(kek).decrypt(sealed[:12], sealed[12:], _AD))
                else:
                    key = HeDecryptionKey.generate()
                    nonce = os.urandom(12)
                    sealed = nonce + AESGCM(kek).encrypt(nonce, key.to_bytes(), _AD)
                    with store.lock, store.conn as conn:
                        conn.execute("INSERT INTO claim_he_key (slot, digest, sealed)"
                                     " VALUES (1, ?, ?)", (key.public.digest, sealed))
                    self._ctx.log.event("he_key_generated", digest=key.public.digest)
                    self._key = key
            return self._key


def regulator_he_key(ctx: NodeContext) -> RegulatorHeKey:
    return ctx.component(RegulatorHeKey)
