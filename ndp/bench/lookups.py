"""Pooled-lookup throughput: a storage node over gRPC vs `embedding_bag` in process.

The node runs in a *separate process* (multiprocessing `spawn`): a real `StorageNodeCore`
behind `serve()` on 127.0.0.1, listening on TCP and on a unix-domain socket. The bench
process is the client (`StorageClient`), sending one `Lookup` per batch that carries every
feature, as ndp's coordinator does. The in-process side pools the same rows (the same
`init_rows` weights, so results are compared too) from the same indices with
`torch.nn.functional.embedding_bag`, one call per feature.

The node's cache is sized to hold every table and warmed before timing, so the figure is
the wire plus near-data pooling, not flash. A lookup is one pooled bag (one sample of one
feature): lookups/s = batch_size * num_features * calls / elapsed seconds.

    bench process                         node process (spawn)
    +----------------------+  Lookup   +------------------------------+
    | StorageClient        | --------> | serve() -> StorageNodeCore   |
    | (unix: or host:port) | <-------- | cache (all rows) -> pooling  |
    +----------------------+  pooled   +------------------------------+

The transport floor: in the same rounds, a bare gRPC unary call over the same transport
carries a request and a reply of exactly the byte sizes the client measured for that point's
`Lookup`, to a server in its own spawned process that does no work (raw bytes in, a reply
built before timing out; no protobuf, no token check). What a node with zero work and
zero (de)serialisation could reach is in-process time / floor time.

    bench process                         echo process (spawn)
    +----------------------+  N bytes  +------------------------------+
    | channel.unary_unary  | --------> | generic handler, no          |
    | (raw bytes, no pb)   | <-------- | deserialiser: prebuilt reply |
    +----------------------+  M bytes  +------------------------------+
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Self

import grpc
import torch
import torch.nn.functional as F

from ndp.config import SparseOptimizerConfig, StorageConfig
from ndp.model.init import init_rows
from ndp.plan import Bags, ShardSpec
from storage_node.cache import slot_bytes
from storage_node.client import StorageClient
from storage_node.process_env import keep_wire_buffers_in_heap
from storage_node.rpc_methods import channel_options

SEED = 0
MAX_MESSAGE_BYTES = 1 << 30
_READY_TIMEOUT_S = 300.0
ECHO_SERVICE = "ndp.bench.Echo"
"""gRPC service of the echo server; one method per reply size (`Reply<bytes>`)."""
_STOP = "stop"
_STATS = "stats"
_CALL_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class LookupShape:
    """What one lookup call carries."""

    num_features: int
    """Features per call, one table each."""
    num_rows: int
    """Rows per table (all cached on the node)."""
    embedding_dim: int
    batch_size: int

    def shards(self) -> list[ShardSpec]:
        return [
            ShardSpec(
                table_name=f"bench_t{f}",
                table_num_rows=self.num_rows,
                embedding_dim=self.embedding_dim,
                row_start=0,
                row_end=self.num_rows,
                pooling="sum",
                features=(f"bench_f{f}",),
            )
            for f in range(self.num_features)
        ]

    def cache_bytes(self) -> int:
        """A node cache budget that holds every row of every table (SGD: no optimizer state)."""
        rows = self.num_features * self.num_rows  # one arena: every table has the same dim
        return rows * slot_bytes(4 * self.embedding_dim, rows) + (1 << 20)


def _socket_path(work_dir: str) -> str:
    """Where a child server listens on a unix-domain socket: inside its temporary directory."""
    return str(Path(work_dir) / "sock")


def _next_command(conn: Connection) -> object:
    """The parent's next message to a child server; EOF (the parent died) means stop."""
    try:
        return conn.recv()
    except EOFError:
        return _STOP


def _node_process(conn: Connection, work_dir: str, shape: LookupShape, token: str) -> None:
    """Child process: build the core, serve it, report addresses; answer each 'stats' with
    the core's counters (the node's control plane: no RPC carries them) until 'stop'.

    The process's allocator is set as a storage-node actor sets its own
    (`keep_wire_buffers_in_heap`): without it every reply and request buffer is a fresh
    mapping that faults page by page, which the nodes of a training job never pay.
    """
    from storage_node.node import StorageNodeCore
    from storage_node.server import serve

    keep_wire_buffers_in_heap()

    storage = StorageConfig(cache_bytes=shape.cache_bytes(), cache_policy="lru")
    core = StorageNodeCore(
        node_id="bench",
        shards=shape.shards(),
        storage=storage,
        optimizer=SparseOptimizerConfig(name="sgd"),
        seed=SEED,
        flash_dir=work_dir,
    )
    server = serve(
        core,
        host="127.0.0.1",
        token=token,
        max_message_bytes=MAX_MESSAGE_BYTES,
        unix_socket_path=_socket_path(work_dir),
    )
    conn.send({"tcp": server.address, "unix": server.unix_address})
    try:
        while _next_command(conn) == _STATS:  # anything else means stop
            conn.send(core.stats())
    finally:
        server.stop(0.5)
        core.close()


def _add_echo_method(server: grpc.Server, reply_bytes: int) -> str:
    """Serve `/ndp.bench.Echo/Reply<reply_bytes>`: any request in, one prebuilt reply out.

    Why no (de)serialisers: gRPC then hands the handler the request's bytes and sends the
    returned bytes as they are, so a call costs the transport and gRPC itself and nothing
    else. The reply is built here, once, so that building it is never timed.

    Returns:
        The method's full name, for `channel.unary_unary`.
    """
    reply = bytes(reply_bytes)
    method = f"Reply{reply_bytes}"
    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, context: reply, request_deserializer=None, response_serializer=None
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(ECHO_SERVICE, {method: handler}),)
    )
    return f"/{ECHO_SERVICE}/{method}"


def _echo_process(conn: Connection, work_dir: str) -> None:
    """Child process: a gRPC server that does no work, listening where the node would.

    Same server options and RPC threads as the node's `serve()`; TCP on 127.0.0.1 only (port
    0: the server picks) and a unix socket. Each int the parent sends is a reply size to
    serve (answered with the method's name) until 'stop'. Its allocator is set as the node's.
    """
    keep_wire_buffers_in_heap()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="ndp-echo"),
        options=[*channel_options(MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    unix_address = f"unix:{_socket_path(work_dir)}"
    if port == 0 or server.add_insecure_port(unix_address) == 0:
        raise RuntimeError("benchmark echo server could not bind 127.0.0.1:0 or its socket")
    server.start()
    conn.send({"tcp": f"127.0.0.1:{port}", "unix": unix_address})
    methods: dict[int, str] = {}
    try:
        while (reply_bytes := _next_command(conn)) != _STOP:
            if reply_bytes not in methods:
                methods[reply_bytes] = _add_echo_method(server, reply_bytes)
            conn.send(methods[reply_bytes])
    finally:
        server.stop(0.5).wait()


@contextlib.contextmanager
def _environment(**variables: str) -> Iterator[None]:
    """`os.environ` with `variables` set while the block runs (a spawned child inherits it)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _ServerProcess:
    """A benchmark gRPC server in a spawned child process (context manager).

    The child gets a temporary directory (its unix socket, a node's flash files) and a pipe:
    it sends its addresses {"tcp": "127.0.0.1:PORT", "unix": "unix:PATH"} once listening and
    reads commands from it ('stop', or EOF when this process dies). It runs one intra-op
    thread, as a storage-node actor does (Ray gives an actor without a CPU request
    OMP_NUM_THREADS=1).

    Args:
        target: the child's function, called as `target(conn, work_dir, *args)`.
        kind: what the child is, for its directory name and errors ("node", "echo").
    """

    def __init__(self, target: Callable[..., None], *args: object, kind: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"ndp-bench-{kind}-")
        context = mp.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=target, args=(child_conn, self._tmp.name, *args), daemon=True
        )
        with _environment(OMP_NUM_THREADS="1"):
            self._process.start()
        child_conn.close()
        try:
            if not self._conn.poll(_READY_TIMEOUT_S):
                raise EOFError
            self.addresses: dict[str, str] = self._conn.recv()
        except EOFError:  # silent past the timeout, or the child died before listening
            self.close()
            raise RuntimeError(f"benchmark {kind} server did not start") from None

    def close(self) -> None:
        try:
            self._conn.send(_STOP)
        except (BrokenPipeError, OSError):
            pass
        self._process.join(30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class NodeProcess(_ServerProcess):
    """A storage node serving `shape`'s tables in a spawned process (context manager).

    One intra-op thread (see `_ServerProcess`): with more, every gRPC handler thread that
    pools gets its own OpenMP team, and on 2 cores the idle teams' spinning slowed the node's
    own lookup from ~1.5 to ~1.9 ms per call (pooling 1).
    """

    def __init__(self, shape: LookupShape) -> None:
        self.shape = shape
        self.token = secrets.token_hex(16)
        super().__init__(_node_process, shape, self.token, kind="node")

    def client(self, transport: str, wire_dtype: str) -> StorageClient:
        return StorageClient(
            self.addresses[transport],
            token=self.token,
            wire_dtype=wire_dtype,
            max_message_bytes=MAX_MESSAGE_BYTES,
            timeout_s=_CALL_TIMEOUT_S,
        )

    def stats(self) -> dict:
        """The node core's counters (`StorageNodeCore.stats`), asked over the pipe."""
        self._conn.send(_STATS)
        return self._conn.recv()


class EchoProcess(_ServerProcess):
    """A gRPC server that does no work, in a spawned process: the transport's floor.

    Why a process and not a thread of the bench: like the node, its gRPC threads then have
    their own interpreter (no shared GIL with the client) and compete for the same cores.
    """

    def __init__(self) -> None:
        super().__init__(_echo_process, kind="echo")
        self._channels: dict[str, grpc.Channel] = {}

    def caller(
        self, transport: str, *, request_bytes: int, reply_bytes: int
    ) -> Callable[[], bytes]:
        """A blocking unary call over `transport` ("unix", "tcp") that sends `request_bytes`
        bytes and gets `reply_bytes` back; the request is built here, once."""
        self._conn.send(reply_bytes)
        method = self._conn.recv()
        if transport not in self._channels:
            self._channels[transport] = grpc.insecure_channel(
                self.addresses[transport], options=channel_options(MAX_MESSAGE_BYTES)
            )
        call = self._channels[transport].unary_unary(
            method, request_serializer=None, response_deserializer=None
        )
        request = bytes(request_bytes)
        return lambda: call(request, timeout=_CALL_TIMEOUT_S)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        super().close()


def make_batches(
    shape: LookupShape, pooling_factor: int, count: int, seed: int
) -> list[dict[str, Bags]]:
    """`count` batches of fixed-length bags with uniform random rows, per feature."""
    generator = torch.Generator().manual_seed(seed * 1000 + pooling_factor)
    nnz = shape.batch_size * pooling_factor
    offsets = torch.arange(0, nnz + 1, pooling_factor, dtype=torch.int64)
    return [
        {
            f"bench_f{f}": Bags(
                torch.randint(0, shape.num_rows, (nnz,), generator=generator), offsets
            )
            for f in range(shape.num_features)
        }
        for _ in range(count)
    ]


def table_weights(shape: LookupShape) -> dict[str, torch.Tensor]:
    """The rows the node initialises, {feature: [num_rows, D]} (the in-process side's tables)."""
    return {
        f"bench_f{f}": torch.from_numpy(
            init_rows(
                seed=SEED,
                table_name=f"bench_t{f}",
                num_rows=shape.num_rows,
                embedding_dim=shape.embedding_dim,
                row_start=0,
                row_end=shape.num_rows,
            )
        )
        for f in range(shape.num_features)
    }


def pool_in_process(
    weights: dict[str, torch.Tensor], batch: dict[str, Bags]
) -> dict[str, torch.Tensor]:
    """The in-process side: one `embedding_bag` per feature."""
    return {
        feature: F.embedding_bag(
            bags.indices, weights[feature], bags.offsets, mode="sum", include_last_offset=True
        )
        for feature, bags in batch.items()
    }


def _call_seconds(call, batches: list, calls: int, first: int) -> list[float]:
    """Seconds of each of `calls` calls of `call(batch)`, cycling over `batches`."""
    seconds = []
    for i in range(calls):
        began = time.perf_counter()
        call(batches[(first + i) % len(batches)])
        seconds.append(time.perf_counter() - began)
    return seconds


def _side(seconds: list[float], lookups_per_call: int) -> dict:
    """Raw figures of one side; the rate uses the median call (robust to a busy machine)."""
    median = statistics.median(seconds)
    return {
        "calls": len(seconds),
        "elapsed_s": sum(seconds),
        "lookups": len(seconds) * lookups_per_call,
        "median_call_s": median,
        "min_call_s": min(seconds),
        "lookups_per_s": lookups_per_call / median,
        "lookups_per_s_mean": len(seconds) * lookups_per_call / sum(seconds),
    }


@dataclass(frozen=True)
class LookupCheck:
    """What one untimed `Lookup` of a point showed: its error and its size on the wire."""

    max_abs_error: float
    """Largest |node - in-process| over the pooled vectors of the batch."""
    request_bytes: int
    """Serialised LookupRequest, as the client counted it (`take_wire_bytes`)."""
    reply_bytes: int
    """Serialised LookupResponse, as the client counted it."""


def warm_and_check(
    client: StorageClient, batches: list[dict[str, Bags]], expected: dict[str, torch.Tensor]
) -> LookupCheck:
    """Warm the node's cache and the channel with every batch, then look `batches[0]` up
    once more, compare it with `expected` and keep the bytes that call put on the wire."""
    for batch in batches:
        client.lookup(0, 0, batch, train=False)
    client.take_wire_bytes()  # forget what earlier calls sent
    got = client.lookup(0, 0, batches[0], train=False)
    wire = client.take_wire_bytes()
    return LookupCheck(
        max_abs_error=max(float((got[f] - expected[f]).abs().max()) for f in got),
        request_bytes=wire["Lookup.sent"],
        reply_bytes=wire["Lookup.received"],
    )


def _floor_side(seconds: list[float], check: LookupCheck) -> dict:
    """Raw figures of the bare round trips of one point (median call, as the other sides)."""
    return {
        "median_call_s": statistics.median(seconds),
        "min_call_s": min(seconds),
        "calls": len(seconds),
        "request_bytes": check.request_bytes,
        "reply_bytes": check.reply_bytes,
    }


def ratio_bounds(in_process_s: float, floor_s: float, node_s: float) -> dict[str, float]:
    """The best gRPC / in-process ratios the measured costs allow (from median calls).

    `transport_only`: a node with no work and no (de)serialisation, only the bare round trip
    of the same bytes; `transport_and_node`: that round trip plus the node's own lookup time.
    """
    return {
        "ratio_bound_transport_only": in_process_s / floor_s,
        "ratio_bound_transport_and_node": in_process_s / (floor_s + node_s),
    }


@dataclass
class _PointTimes:
    """Seconds of every timed call of one (transport, wire dtype) at one pooling factor."""

    grpc: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    node_lookup_seconds: float = 0.0
    """The node's own lookup time over the timed calls (from its stats)."""
    node_lookup_calls: int = 0


def _time_round(
    node: NodeProcess,
    client: StorageClient,
    floor: Callable[[], bytes],
    times: _PointTimes,
    batches: list[dict[str, Bags]],
    calls: int,
    first: int,
) -> None:
    """One round of one point: `calls` Lookups, then as many bare round trips."""
    before = node.stats()
    times.grpc += _call_seconds(
        lambda b: client.lookup(0, 0, b, train=False), batches, calls, first
    )
    after = node.stats()
    times.node_lookup_seconds += after["lookup_seconds"] - before["lookup_seconds"]
    times.node_lookup_calls += after["lookup_calls"] - before["lookup_calls"]
    times.floor += _call_seconds(lambda _batch: floor(), batches, calls, first)


def _point(
    shape: LookupShape,
    pooling: int,
    key: tuple[str, str],
    address: str,
    check: LookupCheck,
    times: _PointTimes,
    local: dict,
) -> dict:
    """The results entry of one (pooling, transport, wire dtype) from its raw figures."""
    transport, dtype = key
    remote = _side(times.grpc, shape.batch_size * shape.num_features)
    # the node's own time per call (checks + pooling), measured inside it:
    # the rest of a call is the wire, (de)serialisation and gRPC itself
    remote["node_lookup_s_per_call"] = times.node_lookup_seconds / max(1, times.node_lookup_calls)
    floor = _floor_side(times.floor, check)
    return {
        "pooling_factor": pooling,
        "transport": transport,
        "address": address,
        "wire_dtype": dtype,
        "batch_size": shape.batch_size,
        "num_features": shape.num_features,
        "embedding_dim": shape.embedding_dim,
        "num_rows": shape.num_rows,
        "max_abs_error": check.max_abs_error,
        "grpc": remote,
        "in_process": local,
        "transport_floor": floor,
        "ratio": remote["lookups_per_s"] / local["lookups_per_s"],
        **ratio_bounds(
            local["median_call_s"], floor["median_call_s"], remote["node_lookup_s_per_call"]
        ),
    }


def _measure_pooling(
    shape: LookupShape,
    weights: dict[str, torch.Tensor],
    pooling: int,
    node: NodeProcess,
    echo: EchoProcess,
    clients: dict[tuple[str, str], StorageClient],
    *,
    rounds: int,
    calls_per_round: int,
    distinct_batches: int,
) -> list[dict]:
    """The points of one pooling factor: checks and warm-up, interleaved rounds, figures."""
    batches = make_batches(shape, pooling, distinct_batches, seed=SEED)
    expected = pool_in_process(weights, batches[0])
    checks = {key: warm_and_check(client, batches, expected) for key, client in clients.items()}
    floors = {
        (transport, dtype): echo.caller(
            transport, request_bytes=check.request_bytes, reply_bytes=check.reply_bytes
        )
        for (transport, dtype), check in checks.items()
    }
    for key, floor in floors.items():  # warm the echo channels, check the reply's size
        for _ in batches:
            assert len(floor()) == checks[key].reply_bytes
    local_seconds: list[float] = []
    times = {key: _PointTimes() for key in clients}
    for r in range(rounds):
        first = r * calls_per_round
        local_seconds += _call_seconds(
            lambda b: pool_in_process(weights, b), batches, calls_per_round, first
        )
        for key, client in clients.items():
            _time_round(node, client, floors[key], times[key], batches, calls_per_round, first)
    local = _side(local_seconds, shape.batch_size * shape.num_features)
    return [
        _point(shape, pooling, key, node.addresses[key[0]], checks[key], times[key], local)
        for key in clients
    ]


def measure_lookups(
    shape: LookupShape,
    *,
    pooling_factors: tuple[int, ...],
    transports: tuple[str, ...],
    wire_dtypes: tuple[str, ...],
    rounds: int,
    calls_per_round: int,
    distinct_batches: int = 4,
) -> list[dict]:
    """Lookups/s of every (pooling, transport, wire dtype) against in-process pooling, and the
    bare transport's floor for the same bytes.

    The sides are measured in interleaved rounds (in-process, then each client followed by
    its bare round trips, repeated `rounds` times) so that load from other processes hits all
    of them alike; each side's figure comes from its median call.

    Returns:
        One point per (pooling, transport, wire dtype) with the raw figures of every side.
    """
    # this process is the client, as a GPU worker is in a job: the same allocator settings
    # (without them a 4.2 MB fp32 reply is a fresh mapping per call: 20 vs 11 ms per call)
    keep_wire_buffers_in_heap()
    weights = table_weights(shape)
    points = []
    with NodeProcess(shape) as node, EchoProcess() as echo:
        clients = {(t, d): node.client(t, d) for t in transports for d in wire_dtypes}
        try:
            for pooling in pooling_factors:
                points += _measure_pooling(
                    shape,
                    weights,
                    pooling,
                    node,
                    echo,
                    clients,
                    rounds=rounds,
                    calls_per_round=calls_per_round,
                    distinct_batches=distinct_batches,
                )
        finally:
            for client in clients.values():
                client.close()
    return points
