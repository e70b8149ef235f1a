"""A node's secret keys: its key-encryption key, data keys and xID keys, and its admin key.

The key-encryption key (KEK) is 32 random bytes in `<state>/<node>/kek.key`
(mode 0600) and never leaves the node. Data keys for encryption at rest live
in `keyring.json`, wrapped by the KEK (`governance.at_rest.Keyring`); xID keys
live in the store, sealed with AES-256-GCM under the KEK. Destroying a key
overwrites its sealed form, so what it protected is unreadable for good
(crypto-shredding). A shred also rotates the KEK (`rotate_kek`): every live key is
re-sealed under a fresh KEK and the old one is overwritten, so a backup of the store from
before the shred does not open under the node's KEK any more. The rotation is crash-safe:
the new KEK and keyring are written beside the old ones (`*.next`), the store re-seals in
one transaction together with a check value, and on the next start a pending rotation is
finished if the store took it, dropped if not. Limits: a backup that holds `kek.key`
too still opens that backup's keys (rotation protects against a backup of the store or of
the keyring alone), and the old KEK file's blocks are unlinked, not wiped, on the disk.
On the regulator, the HE key and the consent pepper are derived from the KEK outside this
module; no shred runs there (shreds are the operator's), so no rotation does either.

The admin key is another 32 random bytes, in `<state>/<node>/admin.key` (0600): the
root of the second factor's keys, never derived from the KEK, so a copy of `kek.key`
opens neither the TOTP secret nor an admin session. Each use gets its own subkey,
HKDF-SHA256(admin key, salt "cogov/admin-key/v1", info = the use's label), so a key
that leaks from one use (a session MAC) says nothing about another (the TOTP wrapping).
The limit: both files sit in the same directory with the same owner, so whoever reads
the directory (root, a backup of it) holds both; they are apart against a leak of one
file, not against the machine.

Every node directory is 0700 and its secret files 0600 (`check_private_modes`, on
start): a looser mode is tightened and logged; a file that is not this user's, which
cannot be tightened, is refused.
"""

import os
import sqlite3
import stat
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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
    # Which KEK the store is sealed under: a check value, re-sealed with the keys.
    """
    CREATE TABLE kek_check (id INTEGER PRIMARY KEY CHECK (id = 1), sealed BLOB NOT NULL)
    """,
)
KEK_CHECK = b"cogov kek check v1"


class KeyDestroyed(GovernanceError):
    """The key was destroyed; what it protected cannot be read or recomputed."""

    http_status = 410


class UnknownKey(GovernanceError):
    http_status = 404


class UnsafeStateFile(GovernanceError):
    """A node's directory or secret file is not this user's, so its mode cannot be made
    private: the node does not start on it."""

    http_status = 500


ADMIN_KEY_SALT = b"cogov/admin-key/v1"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# The node's files that hold secrets or personal data (relative to its directory).
PRIVATE_FILES = ("kek.key", "kek.key.next", "admin.key", "keyring.json", "keyring.json.next",
                 "node.db", "node.db-wal", "node.db-shm", "admin.session", "signing.key",
                 "tls.key", "totp.secret")


def check_private_modes(root: Path) -> list[str]:
    """Make the node directory 0700 and its private files 0600; returns what was tightened
    (`path: old mode`). Raises `UnsafeStateFile` for one owned by another user."""
    tightened = []
    for path, mode in [(root, PRIVATE_DIR_MODE),
                       *((root / name, PRIVATE_FILE_MODE) for name in PRIVATE_FILES)]:
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
            raise UnsafeStateFile(f"{path} is a link or not owned by this user: refusing it")
        if stat.S_IMODE(info.st_mode) & ~mode:
            os.chmod(path, mode)
            tightened.append(f"{path.name}: {stat.S_IMODE(info.st_mode):o}")
    return tightened


class NodeSecrets:
    def __init__(self, paths: NodePaths, store: NodeStore) -> None:
        self._paths = paths
        self._store = store
        self._lock = threading.RLock()
        kek_path = paths.root / "kek.key"
        if not kek_path.exists():
            write_private(kek_path, os.urandom(32))
        self._kek_path = kek_path
        self._keyring_path = paths.root / "keyring.json"
        self._finish_rotation()
        self._kek = kek_path.read_bytes()
        self._seal_check_value()
        admin_path = paths.root / "admin.key"
        if not admin_path.exists():
            write_private(admin_path, os.urandom(32))
        self._admin_key = admin_path.read_bytes()
        self.keyring = (
            Keyring.load(self._keyring_path, self._kek)
            if self._keyring_path.exists()
            else Keyring(kek=self._kek)
        )

    @property
    def kek(self) -> bytes:
        """The key-encryption key; only for deriving further node-local keys."""
        return self._kek

    def admin_subkey(self, label: str) -> bytes:
        """The 32-byte key of one admin use (`label`), derived from the admin key alone."""
        return HKDF(SHA256(), 32, ADMIN_KEY_SALT, label.encode()).derive(self._admin_key)

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

    # -- rotating the KEK -----------------------------------------------------------

    def rotate_kek(self) -> None:
        """Re-seal every live key under a fresh KEK and forget the old one."""
        new = os.urandom(32)
        with self._lock, self._store.lock:
            write_private(_next(self._kek_path), new)
            if self._keyring_path.exists():
                write_private(_next(self._keyring_path),
                              self.keyring.rewrapped(new).to_json().encode())
            conn = self._store.conn
            rows = conn.execute(
                "SELECT name, sealed FROM xid_keys WHERE sealed IS NOT NULL").fetchall()
            resealed = [(_seal_bytes(new, name, self._open(name, bytes(sealed)).to_bytes()),
                         name) for name, sealed in rows]
            with conn:
                conn.executemany("UPDATE xid_keys SET sealed = ? WHERE name = ?", resealed)
                conn.execute("UPDATE kek_check SET sealed = ? WHERE id = 1",
                             (_seal_bytes(new, "kek_check", KEK_CHECK),))
            self._finish_rotation()
            _truncate_wal(conn)
            self._kek = new
            self.keyring = (Keyring.load(self._keyring_path, new)
                            if self._keyring_path.exists() else Keyring(kek=new))

    def _finish_rotation(self) -> None:
        """Complete a rotation the store committed (rename the `.next` files), or drop one
        it did not."""
        pending = _next(self._kek_path)
        if not pending.exists():
            return
        row = self._store.conn.execute("SELECT sealed FROM kek_check WHERE id = 1").fetchone()
        taken = row is not None and _opens(pending.read_bytes(), "kek_check", bytes(row[0]))
        for path in (self._keyring_path, self._kek_path):
            if _next(path).exists():
                if taken:
                    os.replace(_next(path), path)
                else:
                    _next(path).unlink()

    def _seal_check_value(self) -> None:
        with self._store.lock, self._store.conn as conn:
            conn.execute("INSERT OR IGNORE INTO kek_check (id, sealed) VALUES (1, ?)",
                         (_seal_bytes(self._kek, "kek_check", KEK_CHECK),))

    # -- xID keys -------------------------------------------------------------------

    def _seal(self, name: str, key: XidKey) -> bytes:
        return _seal_bytes(self._kek, name, key.to_bytes())

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
        with self._store.lock:
            with self._store.conn as conn:
                updated = conn.execute(
                    "UPDATE xid_keys SET sealed = NULL, destroyed_at = datetime('now')"
                    " WHERE name = ? AND destroyed_at IS NULL",
                    (name,),
                ).rowcount
                if not updated:
                    raise UnknownKey(f"no live key named {name!r}")
            _truncate_wal(conn)


def _truncate_wal(conn: sqlite3.Connection) -> None:
    """Checkpoint and empty the WAL: `secure_delete` scrubs the database's pages, not the
    older frames still in `node.db-wal`, where a destroyed or old-KEK sealing would linger
    (rev15b). Best effort: a reader holding an old snapshot keeps the frames it needs."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _next(path: Path) -> Path:
    return path.with_name(path.name + ".next")


def _seal_bytes(kek: bytes, name: str, plain: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(kek).encrypt(nonce, plain, name.encode())


def _opens(kek: bytes, name: str, sealed: bytes) -> bool:
    try:
        AESGCM(kek).decrypt(sealed[:12], sealed[12:], name.encode())
    except InvalidTag:
        return False
    return True
