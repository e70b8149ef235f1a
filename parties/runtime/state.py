"""Where a federation keeps its files: one directory per node under a state root.

    <state>/ca/ca.key            federation CA private key (0600; stays with whoever runs the CA)
    <state>/ca/ca.crt            federation CA certificate (public)
    <state>/ca/crl.pem           certificate revocation list (public)
    <state>/ca/issued.json       serials issued, per node
    <state>/<node>/tls.key       the node's private key (0600)
    <state>/<node>/tls.crt       the node's certificate (carries its signing public key)
    <state>/<node>/signing.key   the node's Ed25519 signing key (0600)
    <state>/<node>/node.db       the node's SQLite store
    <state>/<node>/node.log      the node's structured log (JSON lines)
    <state>/<node>/node.pid      the PID of the running node process
"""

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE = Path(".cogov")


def default_state_dir() -> Path:
    """`$COGOV_STATE` when set, else `.cogov/` in the working directory."""
    return Path(os.environ.get("COGOV_STATE", DEFAULT_STATE))


@dataclass(frozen=True)
class NodePaths:
    root: Path

    @property
    def key(self) -> Path:
        return self.root / "tls.key"

    @property
    def cert(self) -> Path:
        return self.root / "tls.crt"

    @property
    def signing_key(self) -> Path:
        return self.root / "signing.key"

    @property
    def db(self) -> Path:
        return self.root / "node.db"

    @property
    def log(self) -> Path:
        return self.root / "node.log"

    @property
    def pid(self) -> Path:
        return self.root / "node.pid"

    @property
    def stdout(self) -> Path:
        return self.root / "node.out"


@dataclass(frozen=True)
class CaPaths:
    root: Path

    @property
    def key(self) -> Path:
        return self.root / "ca.key"

    @property
    def cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def issued(self) -> Path:
        return self.root / "issued.json"


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def ca(self) -> CaPaths:
        return CaPaths(self.root / "ca")

    def node(self, name: str) -> NodePaths:
        return NodePaths(self.root / name)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file atomically with mode 0600 from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    """Write a file atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
