"""Envelope encryption at rest: round trips, tampering, moved cells, crypto-shredding."""

import datetime as dt
from pathlib import Path

import pandas as pd
import pytest

from governance.at_rest import (
    AtRestError,
    CiphertextInvalid,
    DataKeyDestroyed,
    Keyring,
    KeyUnwrapFailed,
    UnknownDataKey,
    decrypt_columns,
    encrypt_columns,
    open_value,
    seal_value,
)

COLUMNS = ["national_id", "name", "born", "fen", "note"]


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame({
        "visit_id": ["hospital-1:V1", "hospital-1:V2", "hospital-2:ZY1"],
        "national_id": ["11010519491231002X", "440524188001010014", "32050519850317123X"],
        "name": ["王伟", "欧阳娜娜", "李娜"],
        "born": [dt.date(1949, 12, 31), dt.date(1880, 1, 1), dt.date(1985, 3, 17)],
        "fen": [123456, 0, -5],
        "note": [None, "x", b"\x00\xff"],
    })


def test_round_trip_restores_values_and_types(frame: pd.DataFrame) -> None:
    keyring = Keyring.generate()
    sealed = encrypt_columns(frame, COLUMNS, keyring, "visits", row_key="visit_id")
    assert all(isinstance(v, bytes) for c in COLUMNS for v in sealed[c])
    assert sealed["visit_id"].tolist() == frame["visit_id"].tolist()
    opened = decrypt_columns(sealed, COLUMNS, keyring, "visits", row_key="visit_id")
    for c in COLUMNS:
        assert opened[c].tolist() == frame[c].tolist(), c
    assert b"11010519491231002X" not in b"".join(sealed["national_id"])


def test_fresh_nonce_per_value() -> None:
    keyring = Keyring.generate()
    a = seal_value("王伟", keyring, "t", "name", "1")
    b = seal_value("王伟", keyring, "t", "name", "1")
    assert a != b and a[17:29] != b[17:29]
    assert open_value(a, keyring, "t", "name", "1") == open_value(b, keyring, "t", "name", "1")


@pytest.mark.parametrize("position", [0, 17, 20, 28, 29, 35, -1])
def test_one_flipped_byte_fails(position: int) -> None:
    keyring = Keyring.generate()
    sealed = bytearray(seal_value("11010519491231002X", keyring, "t", "national_id", "r1"))
    sealed[position] ^= 0x01
    with pytest.raises(CiphertextInvalid):
        open_value(bytes(sealed), keyring, "t", "national_id", "r1")


def test_a_flipped_key_id_names_no_key() -> None:
    keyring = Keyring.generate()
    sealed = bytearray(seal_value("x", keyring, "t", "c", "r"))
    sealed[5] ^= 0x80
    with pytest.raises(UnknownDataKey):
        open_value(bytes(sealed), keyring, "t", "c", "r")


def test_moved_cells_fail(frame: pd.DataFrame) -> None:
    keyring = Keyring.generate()
    sealed = encrypt_columns(frame, COLUMNS, keyring, "visits", row_key="visit_id")
    swapped_rows = sealed.copy()
    swapped_rows.loc[0, "name"], swapped_rows.loc[1, "name"] = sealed.loc[1, "name"], \
        sealed.loc[0, "name"]
    with pytest.raises(CiphertextInvalid, match=r"visits.name\[hospital-1:V1\]"):
        decrypt_columns(swapped_rows, ["name"], keyring, "visits", row_key="visit_id")
    swapped_columns = sealed.copy()
    swapped_columns["name"] = sealed["note"]
    with pytest.raises(CiphertextInvalid):
        decrypt_columns(swapped_columns, ["name"], keyring, "visits", row_key="visit_id")
    with pytest.raises(CiphertextInvalid):
        open_value(sealed.loc[0, "name"], keyring, "other", "name", "hospital-1:V1")
    rekeyed = sealed.copy()
    rekeyed["visit_id"] = ["a", "b", "c"]
    with pytest.raises(CiphertextInvalid):
        decrypt_columns(rekeyed, ["fen"], keyring, "visits", row_key="visit_id")


def test_crypto_shredding_makes_a_table_unreadable(frame: pd.DataFrame, tmp_path: Path) -> None:
    keyring = Keyring.generate()
    visits = encrypt_columns(frame, COLUMNS, keyring, "visits", row_key="visit_id")
    claims = encrypt_columns(frame, ["name"], keyring, "claims", row_key="visit_id")
    key_id = keyring.active["visits"]
    wrapped = keyring.records[key_id].wrapped
    assert keyring.destroy_table_keys("visits") == [key_id]
    with pytest.raises(DataKeyDestroyed):
        decrypt_columns(visits, COLUMNS, keyring, "visits", row_key="visit_id")
    path = tmp_path / "keyring.json"
    keyring.save(path)
    assert wrapped.hex() not in path.read_text()
    reloaded = Keyring.load(path, keyring.kek)
    with pytest.raises(DataKeyDestroyed):
        decrypt_columns(visits, ["name"], reloaded, "visits", row_key="visit_id")
    opened = decrypt_columns(claims, ["name"], reloaded, "claims", row_key="visit_id")
    assert opened["name"].tolist() == frame["name"].tolist()
    assert reloaded.tables() == ["claims"]


def test_keyring_file_holds_only_wrapped_keys_and_needs_the_kek(tmp_path: Path) -> None:
    keyring = Keyring.generate()
    key_id = keyring.create_data_key("visits")
    raw = keyring.data_key(key_id)
    path = tmp_path / "keyring.json"
    keyring.save(path)
    text = path.read_text()
    assert raw.hex() not in text and keyring.kek.hex() not in text
    assert Keyring.load(path, keyring.kek).data_key(key_id) == raw
    with pytest.raises(KeyUnwrapFailed):
        Keyring.load(path, bytes(32)).data_key(key_id)
    with pytest.raises(AtRestError):
        Keyring(kek=b"short")
    with pytest.raises(AtRestError):
        Keyring.from_json("{}", keyring.kek)


def test_rotation_keeps_old_values_readable(frame: pd.DataFrame) -> None:
    keyring = Keyring.generate()
    old = encrypt_columns(frame, ["name"], keyring, "visits")
    first = keyring.active["visits"]
    keyring.create_data_key("visits")
    new = encrypt_columns(frame, ["name"], keyring, "visits")
    assert old.loc[0, "name"][1:17].hex() == first != new.loc[0, "name"][1:17].hex()
    for sealed in (old, new):
        assert decrypt_columns(sealed, ["name"], keyring, "visits")["name"].tolist() == \
            frame["name"].tolist()


def test_bad_requests_are_refused(frame: pd.DataFrame) -> None:
    keyring = Keyring.generate()
    with pytest.raises(AtRestError, match="no such columns"):
        encrypt_columns(frame, ["nope"], keyring, "t")
    with pytest.raises(AtRestError, match="unique"):
        encrypt_columns(frame.assign(k=["a", "a", "b"]), ["name"], keyring, "t", row_key="k")
    with pytest.raises(AtRestError, match="row key"):
        encrypt_columns(frame, ["visit_id"], keyring, "t", row_key="visit_id")
    with pytest.raises(CiphertextInvalid):
        open_value("not bytes", keyring, "t", "c", "r")
    with pytest.raises(CiphertextInvalid):
        open_value(b"\x01short", keyring, "t", "c", "r")
