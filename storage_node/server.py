"""Start a storage node's gRPC server: `serve(core, ...) -> RunningServer`.

Binds the named host (127.0.0.1 locally, never every interface by default) at a free port,
and optionally a unix-domain socket for clients on the same machine. Max message size is
raised on both directions so a large batch never meets gRPC's 4 MB default; the thread pool
is large enough that lookups blocked on a step barrier never starve the pushes that release
them.
"""

from __future__ import annotations

import os
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from ndp.errors import ConfigError
from storage_node.auth import TokenInterceptor
from storage_node.link import EmulatedLink
from storage_node.rpc_methods import add_servicer, channel_options
from storage_node.service import StorageNodeServicer
from storage_node.tls import TlsFiles, server_credentials

if TYPE_CHECKING:
    from storage_node.node import StorageNodeCore

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
"""Hosts that would bind every interface; refused so a node is never exposed by accident."""


def tcp_address(host: str, port: int) -> str:
    """`host:port`, bracketing IPv6 literals."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


@dataclass
class RunningServer:
    """A started server and where it listens."""

    address: str
    """`host:port` of the TCP listener."""
    unix_address: str | None
    """`unix:PATH` of the unix-domain listener, or None."""
    server: grpc.Server = field(repr=False)
    link: EmulatedLink = field(repr=False)
    """The emulated link every data RPC crosses (`storage.emulation`); its `stats()`."""
    unix_socket_path: str | None = field(default=None, repr=False)

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Stop listening, let in-flight calls finish for `grace_s`, remove the socket file."""
        self.server.stop(grace_s).wait()
        if self.unix_socket_path and os.path.exists(self.unix_socket_path):
            os.unlink(self.unix_socket_path)


def serve(
    core: StorageNodeCore,
    *,
    host: str,
    port: int = 0,
    token: str,
    max_message_bytes: int,
    unix_socket_path: str | None = None,
    max_workers: int = 16,
    step_wait_timeout_s: float = 120.0,
    tls: TlsFiles | None = None,
) -> RunningServer:
    """Serve `core` over gRPC and return once it is listening.

    Args:
        core: the node's core; the server does not close it.
        host: address to bind (e.g. 127.0.0.1 or the node's cluster address).
        port: TCP port; 0 picks a free one (see `RunningServer.address`).
        token: shared secret every call must carry in metadata `ndp-token`.
        max_message_bytes: largest request or reply (`storage.max_message_bytes`).
        unix_socket_path: also listen on this unix-domain socket (same-machine clients).
        max_workers: RPC threads; keep above twice the number of GPU workers.
        step_wait_timeout_s: longest a lookup waits for the previous step's update.
        tls: serve TLS only (both listeners) with these PEM files (`storage_node.tls`).

    Raises:
        ConfigError: `host` names every interface, or the address cannot be bound.
    """
    if host in WILDCARD_HOSTS:
        raise ConfigError(
            f"storage node host {host!r} would listen on every interface; "
            "name this machine's address (127.0.0.1 for local runs)"
        )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ndp-rpc"),
        interceptors=[TokenInterceptor(token, node_id=str(getattr(core, "node_id", "")))],
        options=[*channel_options(max_message_bytes), ("grpc.so_reuseport", 0)],
    )
    servicer = StorageNodeServicer(core, step_wait_timeout_s=step_wait_timeout_s)
    add_servicer(servicer, server)
    try:
        credentials = server_credentials(tls) if tls is not None else None

        def listen(address: str) -> int:
            if credentials is None:
                return server.add_insecure_port(address)
            return server.add_secure_port(address, credentials)

        bound_port = listen(tcp_address(host, port))
        unix_address = None
        if unix_socket_path is not None:
            unix_address = f"unix:{unix_socket_path}"
            listen(unix_address)
    except RuntimeError as error:
        raise ConfigError(
            f"cannot bind storage node to {tcp_address(host, port)}"
            + (f" / unix:{unix_socket_path}" if unix_socket_path else "")
            + f": {error}; pick another --host/--port"
        ) from None
    if bound_port == 0:
        raise ConfigError(
            f"cannot bind storage node to {tcp_address(host, port)}; pick another port"
        )
    server.start()
    return RunningServer(
        address=tcp_address(host, bound_port),
        unix_address=unix_address,
        server=server,
        link=servicer.link,
        unix_socket_path=unix_socket_path,
    )
