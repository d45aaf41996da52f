"""The typed config tree of an ndp run.

One frozen dataclass per section, each field documented once where it is declared (the
string under it; `ndp.config_loader.field_docs` reads these for the README's reference).
`load_config` is strict: unknown keys, keys given twice, wrong types, NaN or infinite
floats and impossible values fail at load with the dotted path of the field and what is
allowed (how the YAML is read: `ndp.config_loader`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from ndp.config_loader import apply_overrides, dump_yaml, from_dict, load_yaml, to_dict
from ndp.device_profiles import apply_device_profile
from ndp.errors import ConfigError

NUM_DENSE_FEATURES = 13
"""Criteo has 13 integer ("dense") features."""


def _fail(path: str, message: str) -> None:
    raise ConfigError(f"{path}: {message}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _positive(path: str, name: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        _fail(_join(path, name), f"{value} must be > 0")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, kw_only=True)
class TableConfig:
    """One embedding table and the sparse features that look it up."""

    name: str
    """Unique table name, e.g. `t_cat_0`."""
    num_rows: int
    """Rows in the table; categorical values are hashed into [0, num_rows)."""
    embedding_dim: int
    """Width of a row; FBGEMM needs a multiple of 4."""
    pooling: Literal["sum", "mean"] = "sum"
    """How the rows of one bag are combined."""
    features: list[str]
    """Sparse feature names (KeyedJaggedTensor keys) served by this table."""

    def validate(self, path: str) -> None:
        _positive(path, "num_rows", self.num_rows)
        _positive(path, "embedding_dim", self.embedding_dim)
        if self.embedding_dim % 4:
            _fail(
                _join(path, "embedding_dim"),
                f"{self.embedding_dim} is not a multiple of 4 (FBGEMM needs dim % 4 == 0)",
            )
        if not self.features:
            _fail(_join(path, "features"), "a table needs at least one feature")
        if not self.name:
            _fail(_join(path, "name"), "must not be empty")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The DLRM: embedding tables, bottom MLP, interaction, top MLP."""

    tables: list[TableConfig]
    """Embedding tables; every sparse feature belongs to exactly one table."""
    dense_in_features: int = NUM_DENSE_FEATURES
    """Width of the dense feature vector fed to the bottom MLP."""
    bottom_mlp: list[int] = field(default_factory=lambda: [512, 256, 64, 16])
    """Bottom (dense arch) layer sizes; the last must equal the embedding dim."""
    top_mlp: list[int] = field(default_factory=lambda: [512, 256, 1])
    """Top (over arch) layer sizes; the last must be 1 (the click logit)."""
    interaction: Literal["dot"] = "dot"
    """Feature interaction: pairwise dot products of the bottom output and pooled embeddings."""
    max_rows_per_table: int | None = None
    """Caps every table's `num_rows` (values are hashed into fewer rows): runs the big
    reference shapes on a laptop without editing the table list."""

    def validate(self, path: str) -> None:
        if not self.tables:
            _fail(_join(path, "tables"), "at least one table is required")
        _positive(path, "dense_in_features", self.dense_in_features)
        _positive(path, "max_rows_per_table", self.max_rows_per_table)
        for name, sizes in (("bottom_mlp", self.bottom_mlp), ("top_mlp", self.top_mlp)):
            if not sizes:
                _fail(_join(path, name), "needs at least one layer")
            for i, size in enumerate(sizes):
                if size <= 0:
                    _fail(f"{_join(path, name)}[{i}]", f"{size} must be > 0")
        if self.top_mlp[-1] != 1:
            _fail(
                _join(path, "top_mlp"), f"last layer is {self.top_mlp[-1]}, must be 1 (one logit)"
            )
        seen_tables: set[str] = set()
        owner: dict[str, str] = {}
        for i, table in enumerate(self.tables):
            where = f"{_join(path, 'tables')}[{i}]"
            if table.name in seen_tables:
                _fail(f"{where}.name", f"duplicate table name {table.name!r}")
            seen_tables.add(table.name)
            for feature in table.features:
                if feature in owner:
                    _fail(
                        f"{where}.features",
                        f"feature {feature!r} is already mapped to table {owner[feature]!r}; "
                        "a feature belongs to exactly one table",
                    )
                owner[feature] = table.name
            if table.embedding_dim != self.bottom_mlp[-1]:
                _fail(
                    f"{where}.embedding_dim",
                    f"{table.embedding_dim} cannot be combined by the dot interaction with the "
                    f"bottom MLP output {self.bottom_mlp[-1]}: all embedding dims must equal "
                    "model.bottom_mlp[-1]",
                )

    @property
    def embedding_dim(self) -> int:
        return self.bottom_mlp[-1]

    @property
    def feature_names(self) -> list[str]:
        """Sparse feature names in model order (table order, then feature order)."""
        return [f for t in self.tables for f in t.features]

    def effective_tables(self) -> list[TableConfig]:
        """Tables with `max_rows_per_table` applied."""
        if self.max_rows_per_table is None:
            return list(self.tables)
        return [replace(t, num_rows=min(t.num_rows, self.max_rows_per_table)) for t in self.tables]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """Synthetic Criteo-shaped data (power-law rows, multi-hot bags, learnable labels)."""

    num_samples: int = 65536
    """Samples in the training split."""
    num_val_samples: int = 8192
    """Samples in the validation split."""
    zipf_exponent: float = 1.1
    """Exponent s of the Zipf row popularity p(rank) ~ rank^-s (production traces: 1.05-1.2)."""
    pooling_factor: float | list[float] = 1.0
    """Mean bag length: one number for every feature or one per feature (model order)."""
    pooling_distribution: Literal["fixed", "poisson", "uniform"] = "fixed"
    """How bag lengths vary around the mean (`fixed`: every bag has round(mean) rows)."""
    seed: int = 1234
    """Seed of the generator (rows, bags, hidden model); same seed, same data."""
    positive_rate: float = 0.25
    """Target fraction of positive labels from the hidden model."""

    def validate(self, path: str) -> None:
        _positive(path, "num_samples", self.num_samples)
        _positive(path, "num_val_samples", self.num_val_samples)
        _positive(path, "zipf_exponent", self.zipf_exponent)
        factors = (
            self.pooling_factor if isinstance(self.pooling_factor, list) else [self.pooling_factor]
        )
        for value in factors:
            if value < 1:
                _fail(_join(path, "pooling_factor"), f"{value} must be >= 1")
        if not 0 < self.positive_rate < 1:
            _fail(_join(path, "positive_rate"), f"{self.positive_rate} must be in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where batches come from and what to do with bad input."""

    source: Literal["criteo", "synthetic"] = "criteo"
    """`criteo`: TSV files or a preprocessed directory at `path`; `synthetic`: generated."""
    path: str | None = None
    """A Criteo TSV file, a directory of TSV files, or a directory made by `ndp-data preprocess`."""
    val_path: str | None = None
    """Validation data in the same forms as `path`; if unset, `val_fraction` of `path` is held out."""
    val_fraction: float = 0.1
    """Fraction of samples held out for validation (deterministic: the last lines)."""
    bad_line_policy: Literal["fail", "skip"] = "fail"
    """Malformed TSV lines: fail naming file:line, or skip and count them."""
    nan_policy: Literal["fail", "zero"] = "fail"
    """NaN/Inf dense values: fail naming file:line, or replace with 0."""
    index_policy: Literal["fail", "hash", "clamp"] = "fail"
    """Out-of-range sparse indices in preprocessed/synthetic data: fail naming table, feature and
    value; `hash` takes value mod num_rows; `clamp` clips to [0, num_rows)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Used when `source` is `synthetic`."""

    def validate(self, path: str) -> None:
        if self.source == "criteo" and not self.path:
            _fail(_join(path, "path"), "required when data.source is 'criteo'")
        if not 0 <= self.val_fraction < 1:
            _fail(_join(path, "val_fraction"), f"{self.val_fraction} must be in [0, 1)")


# --------------------------------------------------------------------------- optimizer


@dataclass(frozen=True, kw_only=True)
class DenseOptimizerConfig:
    """Optimizer of the dense half (bottom and top MLP)."""

    name: Literal["sgd", "adagrad", "adam"] = "sgd"
    """torch.optim optimizer."""
    lr: float = 0.1
    """Learning rate."""
    eps: float = 1e-8
    """Numerical epsilon (adagrad, adam)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam's (beta1, beta2)."""

    def validate(self, path: str) -> None:
        _positive(path, "lr", self.lr)
        _positive(path, "eps", self.eps)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail(_join(path, "betas"), f"{self.betas} must be two numbers in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class SparseOptimizerConfig:
    """Optimizer applied to embedding rows (by FBGEMM in the reference, by storage nodes in ndp)."""

    name: Literal["sgd", "adagrad", "rowwise_adagrad", "adam"] = "rowwise_adagrad"
    """FBGEMM semantics: EXACT_SGD, EXACT_ADAGRAD, EXACT_ROWWISE_ADAGRAD, ADAM."""
    lr: float = 0.1
    """Learning rate."""
    eps: float = 1e-8
    """Numerical epsilon (adagrad variants, adam)."""
    beta1: float = 0.9
    """Adam's first-moment decay."""
    beta2: float = 0.999
    """Adam's second-moment decay."""

    def validate(self, path: str) -> None:
        _positive(path, "lr", self.lr)
        _positive(path, "eps", self.eps)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                _fail(_join(path, name), f"{value} must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Optimizers of both halves."""

    dense: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig)
    """Dense half."""
    sparse: SparseOptimizerConfig = field(default_factory=SparseOptimizerConfig)
    """Embedding tables."""


# --------------------------------------------------------------------------- train


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Length of the run and the batch."""

    steps: int | None = None
    """Training steps; if unset, `epochs` passes over the training data."""
    epochs: int | None = 1
    """Passes over the training data when `steps` is unset."""
    batch_size: int = 128
    """Global batch size (split evenly across GPU workers)."""
    eval_interval_steps: int | None = None
    """Validate every this many steps (and always at the end); unset: only at the end."""
    eval_batches: int | None = None
    """Validation batches per evaluation; unset: the whole validation split."""
    seed: int = 0
    """Seed for dense init, embedding init and any shuffling."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of the dense half (`auto`: cuda when available)."""

    def validate(self, path: str) -> None:
        if self.steps is None and self.epochs is None:
            _fail(_join(path, "steps"), "set train.steps or train.epochs")
        _positive(path, "steps", self.steps)
        _positive(path, "epochs", self.epochs)
        _positive(path, "batch_size", self.batch_size)
        _positive(path, "eval_interval_steps", self.eval_interval_steps)
        _positive(path, "eval_batches", self.eval_batches)


# --------------------------------------------------------------------------- cluster


@dataclass(frozen=True, kw_only=True)
class ShardingConstraint:
    """A user's override of the planner for one table (as torchrec's ParameterConstraints)."""

    sharding_type: Literal["table_wise", "row_wise", "table_row_wise"] | None = None
    """Force this sharding type."""
    nodes: list[int] | None = None
    """Only place the table's pieces on these storage nodes (0-based)."""


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Where the actors run."""

    address: str | None = None
    """Ray cluster address (`auto`, `ray://host:10001`, `host:6379`); unset: start a local Ray."""
    dashboard: bool = True
    """Start Ray's dashboard (127.0.0.1:8265) with a local Ray instance, so the named ndp actors can be watched."""
    num_storage_nodes: int = 2
    """Storage-node actors (emulated CSDs)."""
    num_gpu_workers: int = 1
    """Dense-half actors; `train.batch_size` must divide evenly among them."""
    storage_node_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 0.0})
    """Ray resources each storage-node actor asks for, e.g. {"storage_node": 1}."""
    gpu_worker_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 0.0})
    """Ray resources each GPU-worker actor asks for, e.g. {"GPU": 1}."""
    gpu_worker_env: dict[str, str] = field(default_factory=dict)
    """Environment variables of each GPU-worker process (Ray runtime_env env_vars), on top
    of OMP_WAIT_POLICY=PASSIVE, which a value given here overrides. Why that default: it
    stops the dense half's OpenMP threads spinning while they wait, which on a machine whose
    cores the worker shares with storage nodes took their CPU (measured on 2 cores: worker
    72-94 -> 49-54 CPU-ms per step, ndp_lookahead +6% fits_in_dram, +22% cache_5pct)."""
    node_capacity_bytes: int = 64 << 30
    """Bytes of table state (weights + optimizer state) one storage node can hold on flash."""
    bind_host: str | None = None
    """Address gRPC servers bind to; unset: 127.0.0.1 locally, the Ray node address on a cluster."""
    rpc_timeout_s: float = 120.0
    """Deadline of one storage-node RPC."""
    step_timeout_s: float = 600.0
    """Longest the coordinator waits for the actors' answer to one step, flush or predict; an
    actor silent for longer counts as failed (restarted and rolled back like a dead one)."""
    constraints: dict[str, ShardingConstraint] = field(default_factory=dict)
    """Per-table planner overrides, keyed by table name."""
    plan_sample_batches: int = 0
    """Training batches read before planning to measure index frequencies, so that row-wise
    pieces split the lookups (not only the rows) evenly; 0: plan from pooling factors only."""
    tls_cert: str | None = None
    """PEM certificate of the storage nodes' gRPC servers; with tls_key and tls_ca: TLS only."""
    tls_key: str | None = None
    """PEM private key of `tls_cert`."""
    tls_ca: str | None = None
    """PEM CA certificate that signed `tls_cert`; clients trust only it."""
    tls_client_cert: str | None = None
    """PEM client certificate signed by `tls_ca`; with tls_client_key: mutual TLS, the nodes
    refuse every client that does not present a certificate from `tls_ca`."""
    tls_client_key: str | None = None
    """PEM private key of `tls_client_cert`."""

    def validate(self, path: str) -> None:
        tls = {"tls_cert": self.tls_cert, "tls_key": self.tls_key, "tls_ca": self.tls_ca}
        if any(tls.values()) and not all(tls.values()):
            missing = ", ".join(k for k, v in tls.items() if not v)
            _fail(path, f"TLS needs tls_cert, tls_key and tls_ca together; set {missing}")
        client = {"tls_client_cert": self.tls_client_cert, "tls_client_key": self.tls_client_key}
        if any(client.values()) and not (all(client.values()) and all(tls.values())):
            missing = ", ".join(k for k, v in {**tls, **client}.items() if not v)
            _fail(
                path,
                "mutual TLS needs tls_client_cert and tls_client_key together, and tls_cert, "
                f"tls_key and tls_ca; set {missing}",
            )
        _positive(path, "num_storage_nodes", self.num_storage_nodes)
        _positive(path, "num_gpu_workers", self.num_gpu_workers)
        _positive(path, "node_capacity_bytes", self.node_capacity_bytes)
        _positive(path, "rpc_timeout_s", self.rpc_timeout_s)
        _positive(path, "step_timeout_s", self.step_timeout_s)
        if self.plan_sample_batches < 0:
            _fail(_join(path, "plan_sample_batches"), f"{self.plan_sample_batches} must be >= 0")
        for key, value in {**self.storage_node_resources, **self.gpu_worker_resources}.items():
            if value < 0:
                _fail(path, f"resource {key!r}: {value} must be >= 0")
        if "" in self.gpu_worker_env:
            _fail(_join(path, "gpu_worker_env"), "an environment variable needs a name")
        if self.bind_host in ("0.0.0.0", "::", "[::]"):
            _fail(
                _join(path, "bind_host"),
                "binding to all interfaces is refused; name the node's own address",
            )


# --------------------------------------------------------------------------- storage


@dataclass(frozen=True, kw_only=True)
class EmulationConfig:
    """Knobs that make a storage node behave like a given device (all off by default)."""

    flash_read_bandwidth_mbps: float | None = None
    """Cap on flash reads, MB/s."""
    flash_write_bandwidth_mbps: float | None = None
    """Cap on flash writes, MB/s."""
    flash_read_latency_us: float | None = None
    """Added latency per batch of flash reads, microseconds."""
    flash_write_latency_us: float | None = None
    """Added latency per batch of flash writes, microseconds."""
    link_bandwidth_mbps: float | None = None
    """Cap on bytes a node sends/receives per second on its link, MB/s."""

    def validate(self, path: str) -> None:
        for name in (
            "flash_read_bandwidth_mbps",
            "flash_write_bandwidth_mbps",
            "flash_read_latency_us",
            "flash_write_latency_us",
            "link_bandwidth_mbps",
        ):
            _positive(path, name, getattr(self, name))


@dataclass(frozen=True, kw_only=True)
class EnergyConfig:
    """Per-access and per-byte energy constants of the energy model (`ndp.energy`).

    Defaults are order-of-magnitude figures from the literature: DRAM access ~ 20 pJ/bit
    (Horowitz, ISSCC 2014, "Computing's energy problem") -> 160 pJ/byte; NAND flash read
    ~ 1-2 nJ/byte at the device interface and program ~ 5-10 nJ/byte (Grupp et al., MICRO
    2009); one 4 KiB page access ~ 10 uJ for the controller; a board-level serial link
    ~ 1.4-1.9 pJ/bit per PHY (IBM, 32nm SOI source-synchronous I/O, ISSCC 2012), both ends
    plus controller and protocol assumed 5 pJ/bit -> 40 pJ/byte; a busy server core ~ 7.5 W
    (Intel Xeon Gold 6248: 150 W TDP over 20 cores, Intel ARK). docs/energy.md explains
    the model and which figures transfer to real hardware.
    """

    dram_pj_per_byte: float = 160.0
    """DRAM cache read or write."""
    flash_read_pj_per_byte: float = 1500.0
    """Flash read."""
    flash_write_pj_per_byte: float = 7500.0
    """Flash program."""
    flash_pj_per_page: float = 10_000_000.0
    """Fixed cost per flash page touched."""
    link_pj_per_byte: float = 40.0
    """Byte over the host link or network (PCIe, CXL, loopback gRPC standing in for them)."""
    cpu_busy_watts: float = 7.5
    """Power of one busy host core (package power / cores); times busy CPU-seconds."""
    device_busy_watts: float = 7.5
    """Power of one busy core of the storage nodes' processes, i.e. of the device's compute
    (default: a host core's, what the emulation runs on; a profile may set its device's)."""

    def validate(self, path: str) -> None:
        for name in (
            "dram_pj_per_byte",
            "flash_read_pj_per_byte",
            "flash_write_pj_per_byte",
            "flash_pj_per_page",
            "link_pj_per_byte",
            "cpu_busy_watts",
            "device_busy_watts",
        ):
            if getattr(self, name) < 0:
                _fail(_join(path, name), f"{getattr(self, name)} must be >= 0")


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """Tiered embedding store of every storage node."""

    flash_dir: str | None = None
    """Directory for shard files; unset: a temporary directory per node, removed at exit."""
    page_bytes: int = 4096
    """Flash page size; rows are laid out so that no row straddles a page when it fits in one."""
    use_odirect: bool = False
    """Open shard files with O_DIRECT (bypass the OS page cache)."""
    io_threads: int = 16
    """Parallel flash reads/writes in flight."""
    io_merge_gap_bytes: int = 32 << 10
    """Gaps up to this size between wanted flash blocks are read (and written back) with them,
    so one request replaces several (0: only adjacent blocks merge). 32 KiB did best of 8 /
    32 / 128 KiB in `ndp-bench train --quick` (large_zipf and cache_5pct together)."""
    update_threads: int = 1
    """Arenas a node updates at once (one arena per embedding dim; each arena's update is
    already one batched call over all its tables), so more than 1 helps only a node with
    tables of several dims and idle cores."""
    cache_bytes: int = 256 << 20
    """DRAM cache budget per node for rows (weights + optimizer state)."""
    cache_policy: Literal["lru", "lfu", "hot+lfu"] = "hot+lfu"
    """Eviction policy; `hot+lfu` pins the rows that access counts mark as hot."""
    hot_fraction: float = 0.5
    """Share of the cache pinned for the hot set under `hot+lfu`."""
    wire_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Dtype of pooled vectors and gradients on the wire (fp32 is exact)."""
    max_message_bytes: int = 512 << 20
    """gRPC max send/receive message size."""
    use_unix_socket: bool = True
    """Clients on the same machine talk over a unix-domain socket instead of TCP."""
    step_wait_timeout_s: float = 300.0
    """How long a training lookup for a future step waits for the previous step's update."""
    emulation: EmulationConfig = field(default_factory=EmulationConfig)
    """Device emulation throttles."""
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    """Energy model constants (`ndp.energy`)."""
    device_profile: str | None = None
    """Named device of `configs/devices/` (e.g. `pcie_gen3_x4_csd`) whose `emulation`,
    `energy` and `cache_bytes` apply under the keys this config sets itself; unset: none."""

    def validate(self, path: str) -> None:
        _positive(path, "page_bytes", self.page_bytes)
        if self.page_bytes % 512:
            _fail(_join(path, "page_bytes"), f"{self.page_bytes} must be a multiple of 512")
        _positive(path, "io_threads", self.io_threads)
        _positive(path, "update_threads", self.update_threads)
        if self.io_merge_gap_bytes < 0:
            _fail(_join(path, "io_merge_gap_bytes"), f"{self.io_merge_gap_bytes} must be >= 0")
        _positive(path, "cache_bytes", self.cache_bytes)
        _positive(path, "max_message_bytes", self.max_message_bytes)
        _positive(path, "step_wait_timeout_s", self.step_wait_timeout_s)
        if not 0 <= self.hot_fraction <= 1:
            _fail(_join(path, "hot_fraction"), f"{self.hot_fraction} must be in [0, 1]")


# --------------------------------------------------------------------------- pipeline


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Overlap of the embedding and dense halves."""

    lookahead_depth: int = 0
    """Batches read ahead whose rows are prefetched and pinned (0: no lookahead)."""
    mode: Literal["exact", "stale"] = "exact"
    """`exact` keeps synchronous semantics (early pools get the exact correction); `stale`
    pools early without correction: a step sees rows one update old (changes the math;
    needs lookahead_depth >= 1 and early_pooling)."""
    early_pooling: bool = True
    """With lookahead_depth >= 1: the nodes pool batch s+1 while batch s is in the dense half
    and add step s's update to it, so the lookup of s+1 does no pooling (exact in mode exact)."""
    push: Literal["with_next_lookup", "during_backward"] = "with_next_lookup"
    """How a worker sends step s's gradients to a node. `with_next_lookup`: inside the lookup
    of s+1 (one call per node and step; `flush` sends a held push alone), the node applies
    the update when that lookup arrives. `during_backward`: its own call as soon as backward
    produced them, so the update overlaps the rest of the worker's step, at one more call per
    node and step (~1 ms of gRPC CPU on each side here). The math is the same."""

    def validate(self, path: str) -> None:
        if self.lookahead_depth < 0:
            _fail(_join(path, "lookahead_depth"), f"{self.lookahead_depth} must be >= 0")
        if self.mode == "stale" and (self.lookahead_depth < 1 or not self.early_pooling):
            _fail(
                _join(path, "mode"),
                "stale pools the next batch early; it needs pipeline.lookahead_depth >= 1 and "
                "pipeline.early_pooling=true (or use pipeline.mode=exact)",
            )


# --------------------------------------------------------------------------- checkpoint


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Consistent checkpoints at a step barrier."""

    dir: str | None = None
    """Checkpoint directory; unset: `<output-dir>/checkpoints`. Needs `enabled: true`."""
    interval_steps: int | None = None
    """Checkpoint every this many steps; unset and no minutes: only at the end. Needs
    `enabled: true`."""
    interval_minutes: float | None = None
    """Checkpoint when this many minutes passed since the last one. Needs `enabled: true`."""
    keep_last: int = 3
    """Retention: keep the newest n checkpoints."""
    enabled: bool = False
    """Write checkpoints at all. While off (`false` or left out), setting `dir`,
    `interval_steps` or `interval_minutes` is an error rather than ignored: it would write no
    checkpoint and say nothing."""
    max_restarts: int = 3
    """Failure recovery: how many times a run restarts its actors and rolls back to the last
    checkpoint (after a storage node or GPU worker dies) before it gives up; 0: never."""

    def validate(self, path: str) -> None:
        if not self.enabled:
            for name in ("dir", "interval_steps", "interval_minutes"):
                value = getattr(self, name)
                if value is not None:
                    _fail(
                        _join(path, name),
                        f"{value!r} is set but {_join(path, 'enabled')} is false, so no "
                        f"checkpoint would be written; set {_join(path, 'enabled')}: true "
                        f"(or remove {_join(path, name)})",
                    )
        _positive(path, "interval_steps", self.interval_steps)
        _positive(path, "interval_minutes", self.interval_minutes)
        _positive(path, "keep_last", self.keep_last)
        if self.max_restarts < 0:
            _fail(
                _join(path, "max_restarts"),
                f"{self.max_restarts} is negative; use 0 to never restart, or a positive count",
            )


# --------------------------------------------------------------------------- logging


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """What a run reports and how often."""

    interval_steps: int = 10
    """Write a training line to metrics.jsonl every this many steps (1 = every step)."""
    progress_bar: bool = True
    """Show a tqdm progress bar (samples/s, loss)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars (train/*, eval/*) into `<output-dir>/tensorboard/`."""

    def validate(self, path: str) -> None:
        _positive(path, "interval_steps", self.interval_steps)


# --------------------------------------------------------------------------- root


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole ndp run."""

    model: ModelConfig
    """The DLRM."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input data."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizers."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run length, batch, seed."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Actors and placement."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Storage-node tiers and wire."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Lookahead."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Reporting."""

    def validate(self, path: str) -> None:
        if self.train.batch_size % self.cluster.num_gpu_workers:
            _fail(
                "train.batch_size",
                f"{self.train.batch_size} does not divide evenly among "
                f"cluster.num_gpu_workers={self.cluster.num_gpu_workers}",
            )
        if self.model.dense_in_features != NUM_DENSE_FEATURES and self.data.source == "criteo":
            _fail(
                "model.dense_in_features",
                f"{self.model.dense_in_features}: Criteo data has {NUM_DENSE_FEATURES} dense features",
            )
        table_names = {t.name for t in self.model.tables}
        for name, constraint in self.cluster.constraints.items():
            where = f"cluster.constraints.{name}"
            if name not in table_names:
                _fail(where, f"unknown table; tables: {', '.join(sorted(table_names))}")
            for node in constraint.nodes or []:
                if not 0 <= node < self.cluster.num_storage_nodes:
                    _fail(
                        f"{where}.nodes",
                        f"node {node} does not exist; nodes are 0..{self.cluster.num_storage_nodes - 1}",
                    )
        factors = self.data.synthetic.pooling_factor
        if isinstance(factors, list) and len(factors) != len(self.model.feature_names):
            _fail(
                "data.synthetic.pooling_factor",
                f"{len(factors)} values given, the model has {len(self.model.feature_names)} features",
            )

    def to_yaml(self) -> str:
        return dump_yaml(to_dict(self))


def config_from_dict(raw: Any, base_dir: str | Path | None = None) -> Config:
    """Validate a raw mapping into a `Config`; relative data paths resolve against `base_dir`."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"<config>: expected a mapping at the top level, got {type(raw).__name__}"
        )
    cfg = from_dict(Config, apply_device_profile(raw))
    if base_dir is not None:
        cfg = _resolve_paths(cfg, Path(base_dir))
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--set`` overrides, validate, and resolve relative paths.

    Relative `data.path`/`data.val_path` are tried against the current directory first and
    then against the repository root (the parent of `configs/`), so that the shipped configs
    work from anywhere.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        raw = load_yaml(path.read_text(), source=str(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, base_dir=path.resolve().parent.parent)


def _resolve_paths(cfg: Config, repo_root: Path) -> Config:
    def resolve(value: str | None, name: str) -> str | None:
        if value is None:
            return None
        candidate = Path(os.path.expanduser(value))
        if candidate.is_absolute() or candidate.exists():
            resolved = candidate
        else:
            resolved = repo_root / candidate
        if not resolved.exists():
            raise ConfigError(f"data.{name}: file or directory not found: {value}")
        return str(resolved.resolve())

    if cfg.data.source != "criteo":
        return cfg
    data = replace(
        cfg.data,
        path=resolve(cfg.data.path, "path"),
        val_path=resolve(cfg.data.val_path, "val_path"),
    )
    return replace(cfg, data=data)
