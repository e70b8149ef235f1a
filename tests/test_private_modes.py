"""A node's directory is 0700 and its secret files 0600: tightened on start, or refused."""

import os
import stat

import pytest

from governance.at_rest import Keyring
from parties.runtime.secrets import PRIVATE_FILES, UnsafeStateFile, check_private_modes
from parties.runtime.store import NodeStore


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_loose_modes_are_tightened_and_reported(tmp_path):
    root = tmp_path / "operator"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    for name in ("kek.key", "keyring.json", "node.db"):
        (root / name).write_bytes(b"x")
        os.chmod(root / name, 0o644)
    (root / "node.log").write_bytes(b"{}")  # not secret: left as it is
    os.chmod(root / "node.log", 0o644)
    tightened = check_private_modes(root)
    assert sorted(tightened) == ["kek.key: 644", "keyring.json: 644", "node.db: 644",
                                 "operator: 755"]
    assert _mode(root) == 0o700
    assert all(_mode(root / n) == 0o600 for n in ("kek.key", "keyring.json", "node.db"))
    assert _mode(root / "node.log") == 0o644
    assert check_private_modes(root) == []  # nothing left to do


def test_a_linked_secret_file_is_refused(tmp_path):
    root = tmp_path / "operator"
    root.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.key"
    elsewhere.write_bytes(b"x")
    (root / "kek.key").symlink_to(elsewhere)
    with pytest.raises(UnsafeStateFile, match=r"kek\.key"):
        check_private_modes(root)


def test_new_stores_and_keyrings_are_private_from_the_first_byte(tmp_path):
    old = os.umask(0o022)
    try:
        store = NodeStore(tmp_path / "fresh" / "node.db")
        store.conn.execute("CREATE TABLE t (x)")
        keyring = Keyring(kek=os.urandom(32))
        keyring.create_data_key("visits")
        keyring.save(tmp_path / "fresh" / "keyring.json")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "fresh") == 0o700
    for name in ("node.db", "node.db-wal", "keyring.json"):
        if (tmp_path / "fresh" / name).exists():
            assert _mode(tmp_path / "fresh" / name) == 0o600, name
    assert "node.db" in PRIVATE_FILES and "admin.key" in PRIVATE_FILES
    store.conn.close()
