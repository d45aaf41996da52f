"""Test certificates made with the openssl CLI: a CA and a node certificate it signs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from storage_node.tls import TlsFiles


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_test_certs(d: Path) -> TlsFiles:
    """A self-signed CA and a certificate for 127.0.0.1 / localhost signed by it, in `d`."""
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=ndp test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "node.key",
        "-out",
        "node.csr",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "node.pem",
        cwd=d,
    )
    return TlsFiles(cert=str(d / "node.pem"), key=str(d / "node.key"), ca=str(d / "ca.pem"))
