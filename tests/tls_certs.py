"""Test certificates made with the openssl CLI: a CA, a node certificate it signs, and client
certificates for mutual TLS."""

from __future__ import annotations

import subprocess
from pathlib import Path

from storage_node.tls import TlsFiles


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_test_certs(d: Path) -> TlsFiles:
    """A self-signed CA and a certificate for 127.0.0.1 / localhost signed by it, in `d`."""
    ca_cert, ca_key = make_ca(d, "ca", subject="ndp test CA")
    cert, key = _signed_cert(
        d,
        "node",
        subject="127.0.0.1",
        extensions="subjectAltName=IP:127.0.0.1,DNS:localhost",
        ca_cert=ca_cert,
        ca_key=ca_key,
    )
    return TlsFiles(cert=cert, key=key, ca=str(ca_cert))


def make_ca(d: Path, name: str, *, subject: str | None = None) -> tuple[Path, Path]:
    """A self-signed CA `d/<name>.pem` with key `d/<name>.key`; -> (cert, key)."""
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={subject or name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        cwd=d,
    )
    return d / f"{name}.pem", d / f"{name}.key"


def make_client_cert(d: Path, name: str, *, ca_cert: Path, ca_key: Path) -> tuple[str, str]:
    """A client certificate `d/<name>.pem` (key `d/<name>.key`) signed by the given CA."""
    return _signed_cert(
        d,
        name,
        subject=name,
        extensions="extendedKeyUsage=clientAuth",
        ca_cert=ca_cert,
        ca_key=ca_key,
    )


def _signed_cert(
    d: Path, name: str, *, subject: str, extensions: str, ca_cert: Path, ca_key: Path
) -> tuple[str, str]:
    """Key `d/<name>.key` and certificate `d/<name>.pem` for CN=`subject`, signed by the CA."""
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={subject}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        cwd=d,
    )
    (d / f"{name}.ext").write_text(extensions + "\n")
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        str(ca_cert),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
        cwd=d,
    )
    return str(d / f"{name}.pem"), str(d / f"{name}.key")
