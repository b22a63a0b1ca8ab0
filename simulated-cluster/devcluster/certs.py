"""The devcluster's credentials in its directory: a CA, the server and gateway certificates it
signs, and bearer tokens. Made on first start, reused afterwards so clients keep trusting them."""
from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .auth import GATEWAY_USER

_CA_DAYS = 3650
_LEAF_DAYS = 825


@dataclass(frozen=True)
class Credentials:
    ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    gateway_cert_file: Path
    gateway_key_file: Path
    gateway_token_file: Path
    admin_token_file: Path


def ensure_credentials(directory: Path) -> Credentials:
    directory.mkdir(parents=True, exist_ok=True)
    creds = Credentials(
        ca_file=directory / "ca.crt",
        server_cert_file=directory / "server.crt",
        server_key_file=directory / "server.key",
        gateway_cert_file=directory / "gateway.crt",
        gateway_key_file=directory / "gateway.key",
        gateway_token_file=directory / "gateway.token",
        admin_token_file=directory / "admin.token",
    )
    ca_key_file = directory / "ca.key"
    if not (creds.ca_file.exists() and ca_key_file.exists()):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        _write_private(ca_key_file, _key_pem(ca_key))
        creds.ca_file.write_bytes(_pem(_ca_certificate(ca_key)))
        # Certificates of an earlier CA would no longer verify.
        for stale in (creds.server_cert_file, creds.gateway_cert_file):
            stale.unlink(missing_ok=True)
    ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(creds.ca_file.read_bytes())
    if not (creds.server_cert_file.exists() and creds.server_key_file.exists()):
        _issue(ca_cert, ca_key, creds.server_cert_file, creds.server_key_file, server=True,
               subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "devcluster-apiserver")]))
    if not (creds.gateway_cert_file.exists() and creds.gateway_key_file.exists()):
        _issue(ca_cert, ca_key, creds.gateway_cert_file, creds.gateway_key_file, server=False,
               subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GATEWAY_USER)]))
    for token_file in (creds.gateway_token_file, creds.admin_token_file):
        if not token_file.exists():
            _write_private(token_file, secrets.token_urlsafe(32).encode())
    return creds


def read_token(path: Path) -> str:
    return path.read_text().strip()


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastproxy-devcluster-ca")])
    now = datetime.now(UTC)
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


def _issue(ca_cert: x509.Certificate, ca_key, cert_file: Path, key_file: Path, *, server: bool,
           subject: x509.Name) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5))
               .not_valid_after(now + timedelta(days=_LEAF_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                            content_commitment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]), critical=False)
    _write_private(key_file, _key_pem(key))
    cert_file.write_bytes(_pem(builder.sign(ca_key, hashes.SHA256())))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only, never briefly world-readable."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)
