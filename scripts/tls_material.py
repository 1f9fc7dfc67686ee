"""Throw-away TLS and SuperNode-authentication material for scripts/deploy_local.sh --tls:
a CA, a server certificate for 127.0.0.1 and localhost signed by it, and one EC key pair per
SuperNode in OpenSSH format (what `flower-supernode --auth-supernode-private-key` and
`flwr supernode register` take). Made with the `cryptography` package Flower already needs,
so no openssl or ssh-keygen is required. For a prototype on one machine only: a real
deployment uses its organisation's CA (docs/deployment.md).

    python scripts/tls_material.py FOLDER NODES
"""

from __future__ import annotations

import datetime
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DAYS = 7  # the material outlives the demo run, not much more


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject, issuer, public_key, signer, *, ca: bool, names=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make(folder: Path, nodes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _certificate(_name("fedsoda local CA"), _name("fedsoda local CA"), ca_key.public_key(),
                      ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = (x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"))
    server = _certificate(_name("127.0.0.1"), ca.subject, server_key.public_key(), ca_key,
                          ca=False, names=names)
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(_pem_key(server_key))
    for k in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        (folder / f"node-{k}").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()))
        (folder / f"node-{k}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    for path in folder.iterdir():
        if not path.name.endswith((".crt", ".pem", ".pub")):
            path.chmod(0o600)  # private keys


if __name__ == "__main__":
    if len(sys.argv) != 3 or not sys.argv[2].isdigit():
        sys.exit("usage: python scripts/tls_material.py FOLDER NODES")
    make(Path(sys.argv[1]), int(sys.argv[2]))
