"""X.509 material: a CA, the certificates it issues, and a throwaway PKI for loopback runs.

The federation's PKI (`parties.runtime.pki`), the secret-sharing channel's
loopback runs and Flower's loopback deployment all build their certificates
here, so there is one way to make a CA and a leaf: ECDSA P-256 keys (accepted
by every TLS 1.3 stack the nodes and Flower use), SHA-256 signatures, a
five-minute back-dating for clock skew.
"""

from __future__ import annotations

import datetime as dt
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLOCK_SKEW = dt.timedelta(minutes=5)
SERVER_AND_CLIENT = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


def subject(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def private_key_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def new_ca(
    name: x509.Name, validity: dt.timedelta
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh self-signed CA that may sign certificates and revocation lists."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: x509.Name,
    alt_names: Sequence[x509.GeneralName],
    *,
    validity: dt.timedelta,
    not_before: dt.datetime | None = None,
    usages: Sequence[x509.ObjectIdentifier] = SERVER_AND_CLIENT,
    extensions: Sequence[x509.ExtensionType] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh key and a leaf certificate for it, signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (dt.datetime.now(dt.UTC) - CLOCK_SKEW)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(list(alt_names)), critical=False)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


# --- a throwaway PKI for loopback runs (tests, benchmarks, demos) ---------------------------


@dataclass(frozen=True)
class PartyMaterial:
    name: str
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


THROWAWAY_VALIDITY = dt.timedelta(days=1)


def make_pki(names: list[str], ca_name: str = "throwaway-ca") -> dict[str, PartyMaterial]:
    """A fresh CA and one certificate per party, its name as CN and DNS subjectAltName."""
    ca_key, ca_cert = new_ca(subject(ca_name), THROWAWAY_VALIDITY)
    ca_pem = certificate_pem(ca_cert)
    out = {}
    for name in names:
        key, cert = issue_certificate(ca_key, ca_cert, subject(name), [x509.DNSName(name)],
                                      validity=THROWAWAY_VALIDITY)
        out[name] = PartyMaterial(name, certificate_pem(cert), private_key_pem(key), ca_pem)
    return out


def tls_contexts(material: PartyMaterial) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context): TLS 1.3 only, peer certificate required."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert.write_bytes(material.cert_pem)
        key.write_bytes(material.key_pem)
        for ctx in (server, client):
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_cert_chain(cert, key)
            ctx.load_verify_locations(cadata=material.ca_pem.decode())
            ctx.verify_mode = ssl.CERT_REQUIRED
    client.check_hostname = True
    return server, client
