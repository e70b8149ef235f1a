"""A node changes or revokes its log signing key, in the log (`governance.ledger.key_history`).

Run on the node's machine with its state: the rotation entry is signed by the current key
and countersigned by a fresh one, appended (in place at the operator, over mTLS from a
witness), and only once the log holds it is the fresh key stored and certified, so a
failed append changes nothing. The node's running process keeps its loaded key until it
restarts, and other nodes check request signatures with the certified key they loaded:
restart the federation's nodes after a rotation.
"""

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.ledger.errors import KeyEntryInvalid
from governance.ledger.key_history import revocation_entry, rotation_entry
from governance.ledger.signing import public_key_hex
from parties.ledger.api import log_node
from parties.ledger.client import append_signed
from parties.node import open_node
from parties.runtime import pki
from parties.runtime.node_log import new_request_id
from parties.runtime.state import StateDir
from parties.runtime.topology import Topology


@dataclass(frozen=True)
class KeyChange:
    """Where the log recorded a key change, and the keys involved (hex)."""

    index: int
    old_key: str
    new_key: str


def rotate_signing_key(state: StateDir, topology: Topology, name: str) -> KeyChange:
    """Rotate node `name`'s signing key: log `signing_key_rotated`, then store and certify
    the new key (the TLS key is renewed with it). The log's own key also signs every tree
    head and checkpoint, which verifiers check with its certified key: it does not rotate
    here."""
    if name == log_node(topology):
        raise KeyEntryInvalid(f"{name} keeps the log: its key signs the tree heads and "
                              "checkpoints, and rotating it is not supported")
    ctx = open_node(state, topology, name)
    old = ctx.signing_key
    new = Ed25519PrivateKey.generate()
    appended = append_signed(ctx, rotation_entry(name, old, new, new_request_id()))
    pki.issue_node_certificate(state, name, topology.node(name).host, signing_key=new)
    return KeyChange(index=appended.first_index, old_key=public_key_hex(old),
                     new_key=public_key_hex(new))


def revoke_signing_key(state: StateDir, topology: Topology, name: str, revoked_key: str,
                       invalid_from: int) -> KeyChange:
    """Log that node `name`'s earlier key `revoked_key` signs nothing valid from log index
    `invalid_from` on (after a compromise), signed with the node's current key."""
    ctx = open_node(state, topology, name)
    entry = revocation_entry(name, ctx.signing_key, revoked_key, invalid_from,
                             new_request_id())
    appended = append_signed(ctx, entry)
    return KeyChange(index=appended.first_index, old_key=revoked_key,
                     new_key=public_key_hex(ctx.signing_key))
