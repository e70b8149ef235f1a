"""Encryption at rest: envelope encryption of sensitive fields, per table, per cell.

Each table has a 256-bit data key; every field value is sealed with AES-256-GCM under
a fresh 96-bit nonce, with associated data binding (table, column, row key) so a
ciphertext moved to another cell no longer opens. Data keys are stored only wrapped by
the node's key-encryption key (AES key wrap, RFC 3394). Destroying a table's data keys
makes its ciphertexts permanently unreadable (crypto-shredding).

Cell format: version byte 0x01 | key id (16 bytes) | nonce (12) | ciphertext and tag.
"""

import datetime as dt
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from governance.errors import GovernanceError

_VERSION = b"\x01"
_KEY_ID_BYTES = 16
_NONCE_BYTES = 12
_HEADER = 1 + _KEY_ID_BYTES + _NONCE_BYTES
_AAD_LABEL = b"cogov/at-rest/v1"


class AtRestError(GovernanceError):
    """Base of encryption-at-rest errors."""

    http_status = 500


class CiphertextInvalid(AtRestError):
    """A sealed cell fails authentication: tampered, truncated, or moved to another cell."""

    http_status = 422


class DataKeyDestroyed(AtRestError):
    """The data key of this ciphertext was destroyed: the value is gone for good."""

    http_status = 410


class UnknownDataKey(AtRestError):
    """No data key with this id exists in the keyring."""

    http_status = 404


class KeyUnwrapFailed(AtRestError):
    """A wrapped data key does not open under this key-encryption key."""

    http_status = 403


@dataclass
class DataKeyRecord:
    key_id: str  # hex
    table: str
    wrapped: bytes | None  # None once destroyed
    created_at: str
    destroyed_at: str | None = None


@dataclass
class Keyring:
    """Data keys of one node, held wrapped under its key-encryption key (KEK)."""

    kek: bytes = field(repr=False)
    records: dict[str, DataKeyRecord] = field(default_factory=dict)
    active: dict[str, str] = field(default_factory=dict)  # table -> key id used to encrypt

    def __post_init__(self) -> None:
        if len(self.kek) != 32:
            raise AtRestError("the key-encryption key must be 32 bytes")

    @classmethod
    def generate(cls) -> "Keyring":
        return cls(kek=AESGCM.generate_key(bit_length=256))

    def create_data_key(self, table: str) -> str:
        """A fresh data key for `table`; it becomes the key new values are sealed with."""
        key_id = secrets.token_hex(_KEY_ID_BYTES)
        data_key = AESGCM.generate_key(bit_length=256)
        self.records[key_id] = DataKeyRecord(
            key_id=key_id, table=table, wrapped=aes_key_wrap(self.kek, data_key),
            created_at=_now(),
        )
        self.active[table] = key_id
        return key_id

    def active_key_id(self, table: str) -> str:
        return self.active.get(table) or self.create_data_key(table)

    def data_key(self, key_id: str) -> bytes:
        """Unwrap one data key (hazardous: the raw key; callers keep it in memory only)."""
        record = self.records.get(key_id)
        if record is None:
            raise UnknownDataKey(f"no data key {key_id}")
        if record.wrapped is None:
            raise DataKeyDestroyed(
                f"data key {key_id} of table {record.table!r} "
                f"was destroyed at {record.destroyed_at}"
            )
        try:
            return aes_key_unwrap(self.kek, record.wrapped)
        except InvalidUnwrap as exc:
            raise KeyUnwrapFailed(f"data key {key_id} does not unwrap under this KEK") from exc

    def destroy_table_keys(self, table: str) -> list[str]:
        """Crypto-shred a table: forget every one of its data keys; returns their ids."""
        destroyed = []
        for record in self.records.values():
            if record.table == table and record.wrapped is not None:
                record.wrapped = None
                record.destroyed_at = _now()
                destroyed.append(record.key_id)
        self.active.pop(table, None)
        return destroyed

    def rewrapped(self, kek: bytes) -> "Keyring":
        """This keyring with every live data key wrapped under `kek` instead (a KEK rotation;
        tombstones stay tombstones)."""
        records = {
            r.key_id: DataKeyRecord(
                key_id=r.key_id, table=r.table, created_at=r.created_at,
                destroyed_at=r.destroyed_at,
                wrapped=None if r.wrapped is None else aes_key_wrap(kek, self.data_key(r.key_id)))
            for r in self.records.values()
        }
        return Keyring(kek=kek, records=records, active=dict(self.active))

    def tables(self) -> list[str]:
        return sorted({r.table for r in self.records.values() if r.wrapped is not None})

    def to_json(self) -> str:
        """The keyring without its KEK: wrapped keys and tombstones of destroyed ones."""
        return json.dumps({
            "version": 1,
            "active": self.active,
            "keys": [
                {"key_id": r.key_id, "table": r.table,
                 "wrapped": r.wrapped.hex() if r.wrapped is not None else None,
                 "created_at": r.created_at, "destroyed_at": r.destroyed_at}
                for r in self.records.values()
            ],
        }, indent=2)

    @classmethod
    def from_json(cls, text: str, kek: bytes) -> "Keyring":
        try:
            data = json.loads(text)
            records = {
                k["key_id"]: DataKeyRecord(
                    key_id=k["key_id"], table=k["table"],
                    wrapped=bytes.fromhex(k["wrapped"]) if k["wrapped"] else None,
                    created_at=k["created_at"], destroyed_at=k.get("destroyed_at"),
                )
                for k in data["keys"]
            }
            return cls(kek=kek, records=records, active=dict(data["active"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise AtRestError(f"not a keyring document: {exc}") from exc

    def save(self, path: Path | str) -> None:
        """Write atomically (temp file, fsync, rename), so a crash never half-writes keys;
        mode 0600 from the first byte."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a leftover temp file keeps its old mode otherwise
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(self.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path | str, kek: bytes) -> "Keyring":
        return cls.from_json(Path(path).read_text(encoding="utf-8"), kek)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# --- values <-> bytes ------------------------------------------------------------------


def _encode(value: Any) -> bytes:
    """Type-tagged bytes, so decryption gives back the same Python type."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return b"n"
    if isinstance(value, bool):
        return b"b1" if value else b"b0"
    if isinstance(value, int):
        return b"i" + str(value).encode("ascii")
    if isinstance(value, float):
        return b"f" + repr(value).encode("ascii")
    if isinstance(value, dt.datetime):
        return b"t" + value.isoformat().encode("ascii")
    if isinstance(value, dt.date):
        return b"d" + value.isoformat().encode("ascii")
    if isinstance(value, bytes):
        return b"y" + value
    if isinstance(value, str):
        return b"s" + value.encode("utf-8")
    if hasattr(value, "item"):  # numpy scalars
        return _encode(value.item())
    raise AtRestError(f"cannot encrypt a value of type {type(value).__name__}")


def _decode(data: bytes) -> Any:
    tag, body = data[:1], data[1:]
    if tag == b"n":
        return None
    if tag == b"b":
        return body == b"1"
    if tag == b"i":
        return int(body)
    if tag == b"f":
        return float(body)
    if tag == b"t":
        return dt.datetime.fromisoformat(body.decode("ascii"))
    if tag == b"d":
        return dt.date.fromisoformat(body.decode("ascii"))
    if tag == b"y":
        return body
    if tag == b"s":
        return body.decode("utf-8")
    raise CiphertextInvalid(f"unknown value tag {tag!r}")


def cell_aad(table: str, column: str, row_key: str, key_id: bytes) -> bytes:
    """Associated data of one cell: length-prefixed, so no two cells share it."""
    parts = [_AAD_LABEL, table.encode(), column.encode(), str(row_key).encode(), key_id]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


# --- cells and columns -----------------------------------------------------------------


def seal_value(
    value: Any, keyring: Keyring, table: str, column: str, row_key: str,
    _cipher: tuple[bytes, AESGCM] | None = None,
) -> bytes:
    """Encrypt one field value for the cell (table, column, row_key)."""
    if _cipher is None:
        key_id = keyring.active_key_id(table)
        _cipher = (bytes.fromhex(key_id), AESGCM(keyring.data_key(key_id)))
    kid, aead = _cipher
    nonce = os.urandom(_NONCE_BYTES)
    sealed = aead.encrypt(nonce, _encode(value), cell_aad(table, column, row_key, kid))
    return _VERSION + kid + nonce + sealed


def open_value(
    sealed: bytes, keyring: Keyring, table: str, column: str, row_key: str,
    _ciphers: dict[bytes, AESGCM] | None = None,
) -> Any:
    """Decrypt one cell; fails with CiphertextInvalid if it was altered or moved."""
    if not isinstance(sealed, bytes | bytearray | memoryview):
        raise CiphertextInvalid(f"{table}.{column}[{row_key}]: not a sealed value")
    sealed = bytes(sealed)
    if len(sealed) < _HEADER + 16 or sealed[:1] != _VERSION:
        raise CiphertextInvalid(f"{table}.{column}[{row_key}]: malformed ciphertext")
    kid = sealed[1 : 1 + _KEY_ID_BYTES]
    nonce, body = sealed[1 + _KEY_ID_BYTES : _HEADER], sealed[_HEADER:]
    ciphers = _ciphers if _ciphers is not None else {}
    if kid not in ciphers:
        ciphers[kid] = AESGCM(keyring.data_key(kid.hex()))
    try:
        plain = ciphers[kid].decrypt(nonce, body, cell_aad(table, column, row_key, kid))
    except InvalidTag as exc:
        raise CiphertextInvalid(
            f"{table}.{column}[{row_key}]: authentication failed (tampered or moved)"
        ) from exc
    return _decode(plain)


def _row_keys(frame: pd.DataFrame, row_key: str | None) -> list[str]:
    if row_key is None:
        keys = [str(i) for i in frame.index]
    elif row_key in frame.columns:
        keys = [str(v) for v in frame[row_key].tolist()]
    else:
        raise AtRestError(f"row key column {row_key!r} not in the frame")
    if len(set(keys)) != len(keys):
        raise AtRestError("row keys must be unique, or two cells would share associated data")
    return keys


def _check_columns(frame: pd.DataFrame, columns: Iterable[str], row_key: str | None) -> list[str]:
    cols = list(columns)
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise AtRestError(f"no such columns: {missing}")
    if row_key in cols:
        raise AtRestError("the row key column cannot itself be encrypted")
    return cols


def encrypt_columns(
    frame: pd.DataFrame,
    columns: Iterable[str],
    keyring: Keyring,
    table: str,
    row_key: str | None = None,
) -> pd.DataFrame:
    """A copy of `frame` with `columns` sealed (bytes cells) under the table's data key.

    `row_key` names a column that identifies rows (e.g. `visit_id`); by default the index.
    """
    cols = _check_columns(frame, columns, row_key)
    keys = _row_keys(frame, row_key)
    key_id = keyring.active_key_id(table)
    cipher = (bytes.fromhex(key_id), AESGCM(keyring.data_key(key_id)))
    out = frame.copy()
    for col in cols:
        out[col] = pd.Series(
            [seal_value(v, keyring, table, col, k, cipher)
             for v, k in zip(frame[col].tolist(), keys, strict=True)],
            index=frame.index, dtype=object,
        )
    return out


def decrypt_columns(
    frame: pd.DataFrame,
    columns: Iterable[str],
    keyring: Keyring,
    table: str,
    row_key: str | None = None,
) -> pd.DataFrame:
    """Inverse of `encrypt_columns`; all-or-nothing (a bad cell raises, nothing returned)."""
    cols = _check_columns(frame, columns, row_key)
    keys = _row_keys(frame, row_key)
    ciphers: dict[bytes, AESGCM] = {}
    out = frame.copy()
    for col in cols:
        out[col] = pd.Series(
            [open_value(v, keyring, table, col, k, ciphers)
             for v, k in zip(frame[col].tolist(), keys, strict=True)],
            index=frame.index, dtype=object,
        )
    return out
