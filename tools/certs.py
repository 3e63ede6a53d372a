"""Development certificates: a private CA, one server certificate for every specdec service and one
client certificate for the orchestrator (and any other caller), plus a random bearer token.

``specdec certs DIR`` (``make certs``) writes them; the tests make throwaway sets the same way.
Not for production: there, certificates come from your own CA and the services only read files.

Written into DIR::

    ca.pem                 the CA certificate: --tls-ca and --tls-client-ca
    ca.key                 the CA's key (only to sign more certificates)
    server.pem server.key  --tls-cert / --tls-key of every service; names: localhost, 127.0.0.1,
                           ::1 and the compose and Kubernetes service names
    client.pem client.key  --tls-client-cert / --tls-client-key of callers (mutual TLS)
    token                  a bearer token: --auth-token-file
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

SERVICE_NAMES = (
    "localhost", "verify", "draft-0", "draft-1", "orchestrator", "verify-cpu", "draft-cpu",
    "orchestrator-cpu",
)
SERVICE_ADDRESSES = ("127.0.0.1", "::1")


@dataclass
class DevCerts:
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    token: Path


def _write(path: Path, data: bytes, private: bool = False) -> None:
    # Keys and the token are created owner-only from the start, never briefly world-readable.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        os.chmod(path, 0o600)


def make_dev_certs(directory: str | os.PathLike, extra_names: tuple[str, ...] = (), days: int = 365,
                   common_name: str = "specdec development CA") -> DevCerts:
    """Create a CA, a server and a client certificate (ECDSA P-256) and a token in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "specdec"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name(common_name)).issuer_name(name(common_name))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage, sans: list | None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    names = list(dict.fromkeys([*SERVICE_NAMES, *extra_names]))
    sans = []
    for entry in [*names, *SERVICE_ADDRESSES]:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            sans.append(x509.DNSName(entry))
    server_key, server_cert = leaf("specdec service", ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client_key, client_cert = leaf("specdec client", ExtendedKeyUsageOID.CLIENT_AUTH, None)

    certs = DevCerts(out / "ca.pem", out / "ca.key", out / "server.pem", out / "server.key", out / "client.pem",
                     out / "client.key", out / "token")
    pem = serialization.Encoding.PEM
    _write(certs.ca, ca_cert.public_bytes(pem))
    _write(certs.ca_key, key_pem(ca_key), private=True)
    _write(certs.server_cert, server_cert.public_bytes(pem))
    _write(certs.server_key, key_pem(server_key), private=True)
    _write(certs.client_cert, client_cert.public_bytes(pem))
    _write(certs.client_key, key_pem(client_key), private=True)
    _write(certs.token, (secrets.token_urlsafe(32) + "\n").encode(), private=True)
    return certs
