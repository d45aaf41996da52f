"""`ndp-storage-node`: one storage node as a standalone gRPC server (no Ray).

Serves the shards the sharding plan gives node `--node-id` (or, with `--tables t1,t2`, those
whole tables) until SIGINT/SIGTERM. Prints one JSON line with its addresses once listening:

    {"node_id": "0", "address": "127.0.0.1:50051", "unix_address": "unix:/tmp/..."}

The shared token comes from `--token-file` or the NDP_TOKEN environment variable; it is
never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace

from ndp.config import load_config
from ndp.errors import ConfigError, NDPError
from ndp.planner import shards_for
from storage_node.actor import LOOPBACK, StorageNodeActor

TOKEN_ENV = "NDP_TOKEN"


def read_token(token_file: str | None) -> str:
    """The shared token from a file (first line) or NDP_TOKEN; refuses an empty one."""
    if token_file is not None:
        try:
            with open(token_file) as handle:
                token = handle.readline().strip()
        except OSError as error:
            raise ConfigError(f"--token-file: cannot read {token_file}: {error.strerror}") from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(
            f"no shared token: pass --token-file FILE or set {TOKEN_ENV} (same value for every "
            "node and worker)"
        )
    return token


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ndp-storage-node", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's YAML config")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, repeatable",
    )
    parser.add_argument(
        "--host",
        default=None,
        help="address to listen on (default: cluster.bind_host, else 127.0.0.1)",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    parser.add_argument("--node-id", type=int, default=0, help="0-based storage node index")
    parser.add_argument(
        "--token-file", default=None, help=f"file holding the token (else ${TOKEN_ENV})"
    )
    parser.add_argument(
        "--tables",
        default=None,
        help="comma-separated whole tables to serve instead of the plan's pieces",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="GPU workers pushing each step (default: cluster.num_gpu_workers)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.host is not None:
            cfg = replace(cfg, cluster=replace(cfg.cluster, bind_host=args.host))
        tables = [t for t in args.tables.split(",") if t] if args.tables else None
        node = StorageNodeActor(
            args.node_id,
            shards_for(cfg, args.node_id, tables),
            cfg,
            read_token(args.token_file),
            args.num_workers or cfg.cluster.num_gpu_workers,
            cfg.cluster.bind_host or LOOPBACK,
            port=args.port,
        )
        node.start()
    except NDPError as error:
        print(f"ndp-storage-node: error: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    addresses = node.addresses()
    print(
        json.dumps(
            {
                "node_id": node.node_id,
                "address": addresses["tcp"],
                "unix_address": addresses["unix"],
            }
        ),
        flush=True,
    )
    try:
        while not stop.wait(1.0):  # wake now and then so signals are handled promptly
            pass
    finally:
        node.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
