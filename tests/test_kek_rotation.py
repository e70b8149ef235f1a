"""Rotating the key-encryption key (on every shred): live keys re-sealed, old KEK useless,
a crash at any point leaves one whole KEK that opens everything."""

import os

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from parties.runtime import secrets as secrets_module
from parties.runtime.secrets import COMPONENT, MIGRATIONS, NodeSecrets
from parties.runtime.state import NodePaths
from parties.runtime.store import NodeStore


def _open(root):
    store = NodeStore(root / "node.db", [(COMPONENT, MIGRATIONS)])
    return store, NodeSecrets(NodePaths(root), store)


def _sealed(store, name: str) -> bytes:
    return bytes(store.conn.execute("SELECT sealed FROM xid_keys WHERE name = ?",
                                    (name,)).fetchone()[0])


def test_rotation_reseals_live_keys_and_the_old_kek_opens_nothing(tmp_path):
    store, node = _open(tmp_path)
    key = node.xid_key("domain:a", create=True).to_bytes()
    data_key_id = node.data_key_for("visits").active_key_id("visits")
    data_key = node.keyring.data_key(data_key_id)
    old_kek, old_sealed = node.kek, _sealed(store, "domain:a")
    node.rotate_kek()
    assert node.kek != old_kek
    assert (tmp_path / "kek.key").read_bytes() == node.kek
    assert node.xid_key("domain:a").to_bytes() == key
    assert node.keyring.data_key(data_key_id) == data_key
    new_sealed = _sealed(store, "domain:a")
    with pytest.raises(InvalidTag):
        AESGCM(old_kek).decrypt(new_sealed[:12], new_sealed[12:], b"domain:a")
    with pytest.raises(InvalidTag):  # a backup's sealed form does not open under the new KEK
        AESGCM(node.kek).decrypt(old_sealed[:12], old_sealed[12:], b"domain:a")
    store.close()
    store, reopened = _open(tmp_path)  # a restart reads the new KEK and keyring
    assert reopened.xid_key("domain:a").to_bytes() == key
    assert reopened.keyring.data_key(data_key_id) == data_key
    store.close()


def test_a_rotation_that_crashed_before_the_store_took_it_is_dropped(tmp_path):
    store, node = _open(tmp_path)
    key = node.xid_key("domain:a", create=True).to_bytes()
    kek = node.kek
    (tmp_path / "kek.key.next").write_bytes(os.urandom(32))  # written, store not yet sealed
    store.close()
    store, reopened = _open(tmp_path)
    assert reopened.kek == kek and not (tmp_path / "kek.key.next").exists()
    assert reopened.xid_key("domain:a").to_bytes() == key
    store.close()


def test_a_rotation_that_crashed_after_the_store_took_it_is_finished(tmp_path, monkeypatch):
    store, node = _open(tmp_path)
    key = node.xid_key("domain:a", create=True).to_bytes()
    data_key_id = node.data_key_for("visits").active_key_id("visits")
    data_key = node.keyring.data_key(data_key_id)

    real_replace = os.replace

    def crash(src, dst):  # the `.next` files are written whole; the power goes at the renames
        if str(src).endswith(".next"):
            raise OSError("power cut between the store's commit and the renames")
        real_replace(src, dst)

    monkeypatch.setattr(secrets_module.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        node.rotate_kek()
    monkeypatch.undo()
    assert (tmp_path / "kek.key.next").exists()
    store.close()
    store, reopened = _open(tmp_path)
    assert not (tmp_path / "kek.key.next").exists()
    assert not (tmp_path / "keyring.json.next").exists()
    assert reopened.xid_key("domain:a").to_bytes() == key
    assert reopened.keyring.data_key(data_key_id) == data_key
    store.close()
