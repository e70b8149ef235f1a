"""The federation's PKI: one CA, one certificate per node, a revocation list.

Keys are ECDSA P-256 (accepted by every TLS 1.3 stack the nodes and Flower use).
A node certificate names the node in its subject CN and carries the node's host
as a subjectAltName, so clients check both the host and the node identity.
"""

import datetime as dt
import ipaddress
import json
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID, ObjectIdentifier

from mpc.certificates import (
    certificate_pem,
    issue_certificate,
    new_ca,
    private_key_pem,
    subject,
)
from parties.runtime.state import StateDir, write_private, write_public
from parties.runtime.topology import Topology

CA_VALIDITY = dt.timedelta(days=3650)
NODE_VALIDITY = dt.timedelta(days=365)
CRL_VALIDITY = dt.timedelta(days=30)

# The node's Ed25519 signing key (log entries, approvals, contract signatures) is
# separate from its TLS key; its public half rides in the node certificate under
# this private-arc OID, so the CA vouches for it and verifiers need only the
# CA certificate and the node certificates.
SIGNING_KEY_OID = ObjectIdentifier("1.3.6.1.4.1.55555.1.1")
ORGANIZATION = "cogov federation"


class PkiError(ValueError):
    """The PKI cannot do what was asked (no CA yet, unknown node, ...)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init_ca(state: StateDir, federation: str, *, force: bool = False) -> x509.Certificate:
    """Create the federation CA and an empty revocation list."""
    paths = state.ca
    if paths.cert.exists() and not force:
        raise PkiError(f"a CA already exists in {paths.root}; pass force to replace it")
    key, cert = new_ca(subject(f"{federation} federation CA", ORGANIZATION), CA_VALIDITY)
    write_private(paths.key, private_key_pem(key))
    write_public(paths.cert, certificate_pem(cert))
    write_public(paths.issued, b"{}")
    _write_crl(state, key, cert, revoked={})
    return cert


def _load_ca(state: StateDir) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    paths = state.ca
    if not paths.key.exists():
        raise PkiError(f"no CA in {paths.root}: run `cogov pki init` first")
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, x509.load_pem_x509_certificate(paths.cert.read_bytes())


def _alt_names(host: str, name: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(name), x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    if host != "127.0.0.1":
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    return names


def issue_node_certificate(
    state: StateDir,
    name: str,
    host: str,
    *,
    not_before: dt.datetime | None = None,
    validity: dt.timedelta = NODE_VALIDITY,
    signing_key: Ed25519PrivateKey | None = None,
) -> x509.Certificate:
    """Issue a fresh TLS key and certificate for node `name` carrying `signing_key` (default:
    a fresh one, for a new node). A renewal passes the node's current key, so the log's
    entries it signed stay verifiable; a node that is in the log changes its signing key
    only by a rotation (`cogov ledger rotate-key`), which the log records."""
    ca_key, ca_cert = _load_ca(state)
    signing_key = signing_key or Ed25519PrivateKey.generate()
    signing_public = signing_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key, cert = issue_certificate(
        ca_key, ca_cert, subject(name, ORGANIZATION), _alt_names(host, name),
        validity=validity, not_before=not_before,
        extensions=[x509.UnrecognizedExtension(SIGNING_KEY_OID, signing_public)],
    )
    paths = state.node(name)
    write_private(paths.key, private_key_pem(key))
    write_private(paths.signing_key, private_key_pem(signing_key))
    write_public(paths.cert, certificate_pem(cert))
    issued = json.loads(state.ca.issued.read_text())
    issued.setdefault(name, []).append(format(cert.serial_number, "x"))
    write_public(state.ca.issued, json.dumps(issued, indent=2).encode())
    return cert


def init_federation(state: StateDir, topology: Topology, *, force: bool = False) -> None:
    """Create the CA and issue a certificate for every node of the topology."""
    init_ca(state, topology.name, force=force)
    for node in topology.nodes:
        issue_node_certificate(state, node.name, node.host)


def revoke_node(state: StateDir, name: str) -> list[str]:
    """Revoke every certificate issued to `name`; return the revoked serials (hex)."""
    ca_key, ca_cert = _load_ca(state)
    issued = json.loads(state.ca.issued.read_text())
    if name not in issued:
        raise PkiError(f"no certificate was issued to {name!r}")
    revoked = _revoked_serials(state)
    for serial in issued[name]:
        revoked.setdefault(serial, _now().isoformat())
    _write_crl(state, ca_key, ca_cert, revoked)
    return issued[name]


def _revoked_serials(state: StateDir) -> dict[str, str]:
    crl = x509.load_pem_x509_crl(state.ca.crl.read_bytes())
    return {
        format(r.serial_number, "x"): r.revocation_date_utc.isoformat() for r in crl
    }


def _write_crl(
    state: StateDir,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: dict[str, str],
) -> None:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + CRL_VALIDITY)
    )
    for serial, when in revoked.items():
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(serial, 16))
            .revocation_date(dt.datetime.fromisoformat(when))
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    write_public(state.ca.crl, crl.public_bytes(serialization.Encoding.PEM))


def certificate_node_name(cert: x509.Certificate) -> str:
    """The node name a certificate was issued to (its subject CN)."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise PkiError("certificate has no common name")
    return str(attrs[0].value)


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def certificate_signing_key(cert: x509.Certificate) -> bytes:
    """The raw Ed25519 signing public key the CA bound to this node certificate."""
    try:
        ext = cert.extensions.get_extension_for_oid(SIGNING_KEY_OID)
    except x509.ExtensionNotFound as exc:
        raise PkiError("certificate carries no signing key") from exc
    value = ext.value
    assert isinstance(value, x509.UnrecognizedExtension)
    return value.value


def load_signing_key(state: StateDir, name: str) -> Ed25519PrivateKey:
    """Node `name`'s Ed25519 signing key (only on the node's own machine)."""
    key = serialization.load_pem_private_key(
        state.node(name).signing_key.read_bytes(), password=None
    )
    if not isinstance(key, Ed25519PrivateKey):
        raise PkiError(f"{name}: signing key is not Ed25519")
    return key


def verified_node_certificate(ca_cert: x509.Certificate, cert: x509.Certificate) -> str:
    """Check that the CA issued `cert`; return the node name it certifies."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PkiError("certificate was not issued by the federation CA") from exc
    return certificate_node_name(cert)


def federation_signing_keys(state: StateDir, names: list[str]) -> dict[str, bytes]:
    """node -> signing public key, read from CA-verified node certificates."""
    ca_cert = load_certificate(state.ca.cert)
    keys = {}
    for name in names:
        cert = load_certificate(state.node(name).cert)
        if verified_node_certificate(ca_cert, cert) != name:
            raise PkiError(f"{state.node(name).cert} does not certify {name}")
        keys[name] = certificate_signing_key(cert)
    return keys
