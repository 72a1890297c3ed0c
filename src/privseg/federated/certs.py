"""Certificates for a federation: a CA, the server's TLS certificate, one key per site.

Layout of the folder (what to hand to whom)::

    ca.crt                  everyone (sites verify the server with it)
    ca.key                  nobody: keep offline, only needed to issue new certificates
    server.pem, server.key  the server only
    sites/<name>.key        site <name> only (EC P-384, OpenSSH format: SuperNode auth)
    sites/<name>.pub        the server (registered with the SuperLink)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privseg.core.errors import FederationError
from privseg.core.io import atomic_write_bytes

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
SITES_DIR = "sites"


@dataclass(frozen=True)
class CertFiles:
    """Paths inside a certificate folder."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    def site_key(self, site: str) -> Path:
        return self.root / SITES_DIR / f"{site}.key"

    def site_pub(self, site: str) -> Path:
        return self.root / SITES_DIR / f"{site}.pub"

    def site_public_keys(self) -> dict[str, Path]:
        """Every site public key in the folder, by site name."""
        folder = self.root / SITES_DIR
        return {p.stem: p for p in sorted(folder.glob("*.pub"))} if folder.is_dir() else {}


def check_distinct_keys(keys: dict[str, Path]) -> None:
    """Refuse two site names for one public key: a key must stand for one site only."""
    seen: dict[bytes, str] = {}
    for site, path in keys.items():
        try:
            material = b" ".join(path.read_bytes().split()[:2])  # type and key, not the comment
        except OSError as exc:
            raise FederationError(f"cannot read {path}: {exc.strerror}") from exc
        other = seen.setdefault(material, site)
        if other != site:
            raise FederationError(
                f"{keys[other]} and {path} hold the same public key: one key may stand for "
                "one site only; remove one"
            )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_secret(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o600)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privseg"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certs(
    out: Path, sites: list[str], *, hosts: list[str] | None = None, days: int = 365
) -> CertFiles:
    """Write a CA, a server certificate for ``hosts`` and one EC P-384 key pair per site."""
    if not sites:
        raise FederationError("at least one site is needed")
    if len(set(sites)) != len(sites) or any(not s or "/" in s for s in sites):
        raise FederationError(f"site names must be unique and non-empty: {sites}")
    files = CertFiles(Path(out))
    if files.ca.exists():
        raise FederationError(
            f"{files.ca} exists: choose an empty folder (keys are never overwritten)"
        )
    hosts = list(dict.fromkeys(["127.0.0.1", "localhost", *(hosts or [])]))
    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("privseg federation CA"))
        .issuer_name(_name("privseg federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = _key()
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    _write_secret(files.root / CA_KEY, _pem_key(ca_key))
    atomic_write_bytes(files.ca, ca_cert.public_bytes(pem))
    _write_secret(files.server_key, _pem_key(server_key))
    atomic_write_bytes(files.server_cert, server_cert.public_bytes(pem))
    for site in sites:
        key = _key()
        _write_secret(
            files.site_key(site),
            key.private_bytes(
                pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        pub = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        atomic_write_bytes(files.site_pub(site), pub + f" {site}\n".encode())
    return files
