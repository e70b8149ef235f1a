"""A throwaway CA and SuperLink certificate for loopback runs (tests, benchmarks, demos).

Real federations use certificates issued by the federation CA (the node PKI); this
exists so a laptop can run the deployment engine without one.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from federated.deployment import DeployCertificates
from mpc.certificates import (
    THROWAWAY_VALIDITY,
    certificate_pem,
    issue_certificate,
    new_ca,
    private_key_pem,
    subject,
)


def issue_loopback_certificates(
    directory: Path, ca_name: str = "cogov loopback federation CA"
) -> DeployCertificates:
    """A fresh CA and a SuperLink certificate for 127.0.0.1 / localhost, as PEM files."""
    ca_key, ca = new_ca(subject(ca_name), THROWAWAY_VALIDITY)
    key, cert = issue_certificate(
        ca_key, ca, subject("superlink"),
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        validity=THROWAWAY_VALIDITY, usages=(ExtendedKeyUsageOID.SERVER_AUTH,),
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = DeployCertificates(directory / "ca.pem", directory / "superlink.pem",
                               directory / "superlink.key")
    paths.ca_cert.write_bytes(certificate_pem(ca))
    paths.server_cert.write_bytes(certificate_pem(cert))
    paths.server_key.write_bytes(private_key_pem(key))
    return paths
