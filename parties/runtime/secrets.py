"""A node's secret keys: its key-encryption key, data keys and xID keys.

The key-encryption key (KEK) is 32 random bytes in `<state>/<node>/kek.key`
(mode 0600) and never leaves the node. Data keys for encryption at rest live
in `keyring.json`, wrapped by the KEK (`governance.at_rest.Keyring`); xID keys
live in the store, sealed with AES-256-GCM under the KEK. Destroying a key
overwrites its sealed form, so what it protected is unreadable for good
(crypto-shredding).
"""

import os
import threading

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from governance.at_rest import Keyring
from governance.errors import GovernanceError
from mpc.xid import XidKey
from parties.runtime.state import NodePaths, write_private
from parties.runtime.store import NodeStore

COMPONENT = "secrets"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE xid_keys (
        name TEXT PRIMARY KEY, sealed BLOB, created_at TEXT NOT NULL DEFAULT (datetime('now')),
        destroyed_at TEXT
    )
    """,
)


class KeyDestroyed(GovernanceError):
    """The key was destroyed; what it protected cannot be read or recomputed."""

    http_status = 410


class UnknownKey(GovernanceError):
    http_status = 404


class NodeSecrets:
    def __init__(self, paths: NodePaths, store: NodeStore) -> None:
        self._paths = paths
        self._store = store
        self._lock = threading.RLock()
        kek_path = paths.root / "kek.key"
        if not kek_path.exists():
            write_private(kek_path, os.urandom(32))
        self._kek = kek_path.read_bytes()
        self._keyring_path = paths.root / "keyring.json"
        self.keyring = (
            Keyring.load(self._keyring_path, self._kek)
            if self._keyring_path.exists()
            else Keyring(kek=self._kek)
        )

    @property
    def kek(self) -> bytes:
        """The key-encryption key; only for deriving further node-local keys."""
        return self._kek

    # -- data keys for encryption at rest -------------------------------------------

    def data_key_for(self, table: str) -> Keyring:
        """The keyring, with an active data key for `table` (created and saved if new)."""
        with self._lock:
            if table not in self.keyring.tables():
                self.keyring.create_data_key(table)
                self.keyring.save(self._keyring_path)
            return self.keyring

    def destroy_table_keys(self, table: str) -> list[str]:
        with self._lock:
            destroyed = self.keyring.destroy_table_keys(table)
            self.keyring.save(self._keyring_path)
            return destroyed

    # -- xID keys -------------------------------------------------------------------

    def _seal(self, name: str, key: XidKey) -> bytes:
        nonce = os.urandom(12)
        return nonce + AESGCM(self._kek).encrypt(nonce, key.to_bytes(), name.encode())

    def _open(self, name: str, sealed: bytes) -> XidKey:
        return XidKey.from_bytes(AESGCM(self._kek).decrypt(sealed[:12], sealed[12:], name.encode()))

    def xid_key(self, name: str, *, create: bool = False) -> XidKey:
        """The xID key `name`; generated on first use when `create`."""
        conn = self._store.conn
        with self._store.lock:
            row = conn.execute(
                "SELECT sealed, destroyed_at FROM xid_keys WHERE name = ?", (name,)
            ).fetchone()
            if row is not None:
                if row[1] is not None:
                    raise KeyDestroyed(f"key {name!r} was destroyed at {row[1]}")
                return self._open(name, bytes(row[0]))
            if not create:
                raise UnknownKey(f"no key named {name!r}")
            key = XidKey.generate(name)
            with conn:
                conn.execute(
                    "INSERT INTO xid_keys (name, sealed) VALUES (?, ?)",
                    (name, self._seal(name, key)),
                )
            return key

    def put_xid_key(self, name: str, key: XidKey) -> None:
        """Store `key` under `name`, replacing whatever was there (live or destroyed)."""
        with self._store.lock, self._store.conn as conn:
            conn.execute(
                "INSERT INTO xid_keys (name, sealed) VALUES (?, ?) ON CONFLICT(name) DO UPDATE"
                " SET sealed = excluded.sealed, destroyed_at = NULL",
                (name, self._seal(name, key)),
            )

    def replace_xid_key(self, name: str, key: XidKey) -> None:
        """Store a rotated version of key `name`."""
        with self._store.lock, self._store.conn as conn:
            conn.execute(
                "UPDATE xid_keys SET sealed = ? WHERE name = ? AND destroyed_at IS NULL",
                (self._seal(name, key), name),
            )

    def drop_xid_key(self, name: str) -> None:
        """Forget key `name` (a key that protects nothing stored, e.g. a pending rotation)."""
        with self._store.lock, self._store.conn as conn:
            conn.execute("DELETE FROM xid_keys WHERE name = ?", (name,))

    def destroy_xid_key(self, name: str) -> None:
        """Overwrite key `name`'s sealed form; it can never be used again."""
        with self._store.lock, self._store.conn as conn:
            updated = conn.execute(
                "UPDATE xid_keys SET sealed = NULL, destroyed_at = datetime('now')"
                " WHERE name = ? AND destroyed_at IS NULL",
                (name,),
            ).rowcount
            if not updated:
                raise UnknownKey(f"no live key named {name!r}")
