"""Optional TLS for storage-node RPCs: credentials from PEM files named in the config.

With `cluster.tls_cert`, `cluster.tls_key` and `cluster.tls_ca` set, a node serves only TLS
(no plaintext port) and clients dial with the CA that signed the node's certificate; the
shared `ndp-token` is still checked on every call, now inside the encrypted channel. With
`cluster.tls_client_cert` and `cluster.tls_client_key` set as well (mutual TLS), clients
present that certificate and a node refuses the handshake of any client without a
certificate signed by `tls_ca` (`require_client_auth`), before any call reaches it.

Unset (the default), traffic is plaintext on the node's own address (loopback locally):
fine for a single machine, not for a shared network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from ndp.errors import ConfigError


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one side of a TLS connection."""

    cert: str | None
    """This side's certificate chain (a server always has one; a client only for mutual TLS)."""
    key: str | None
    """Private key of `cert`."""
    ca: str
    """CA certificate(s) that sign the peer: the server's for a client, clients' for a server."""
    require_client_auth: bool = False
    """Server side: refuse clients that present no certificate signed by `ca` (mutual TLS)."""

    @staticmethod
    def from_cluster(cluster: object) -> TlsFiles | None:
        """A node's side from `cfg.cluster` (`tls_cert`, `tls_key`, `tls_ca`; client certs
        required when `tls_client_cert` is set); None when TLS is off."""
        ca = getattr(cluster, "tls_ca", None)
        if ca is None:
            return None
        return TlsFiles(
            cert=cluster.tls_cert,  # type: ignore[attr-defined]
            key=cluster.tls_key,  # type: ignore[attr-defined]
            ca=ca,
            require_client_auth=getattr(cluster, "tls_client_cert", None) is not None,
        )

    @staticmethod
    def client_from_cluster(cluster: object) -> TlsFiles | None:
        """A client's side from `cfg.cluster`: trust `tls_ca`, present `tls_client_cert` /
        `tls_client_key` (None when unset: no client certificate); None when TLS is off."""
        ca = getattr(cluster, "tls_ca", None)
        if ca is None:
            return None
        return TlsFiles(
            cert=getattr(cluster, "tls_client_cert", None),
            key=getattr(cluster, "tls_client_key", None),
            ca=ca,
        )


def _read(path: str | None, field: str) -> bytes:
    if path is None:
        raise ConfigError(f"cluster.{field}: a PEM file is needed for TLS; set its path")
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(
            f"cluster.{field}: cannot read {path!r} ({error.strerror}); fix the path"
        ) from None


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for `grpc.Server.add_secure_port`: the node's cert/key; with
    `files.require_client_auth`, only clients with a certificate signed by `files.ca`."""
    return grpc.ssl_server_credentials(
        [(_read(files.key, "tls_key"), _read(files.cert, "tls_cert"))],
        root_certificates=_read(files.ca, "tls_ca"),
        require_client_auth=files.require_client_auth,
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Credentials for `grpc.secure_channel`: trust `ca`; present cert/key if both are set."""
    with_client_cert = files.cert is not None and files.key is not None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(files.ca, "tls_ca"),
        private_key=_read(files.key, "tls_client_key") if with_client_cert else None,
        certificate_chain=_read(files.cert, "tls_client_cert") if with_client_cert else None,
    )
