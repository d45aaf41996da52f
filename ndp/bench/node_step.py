"""A storage node's step in-process against FBGEMM's table-batched kernel, CPU ms per step.

    python -m ndp.bench.node_step [--pooling 1 20] [--rows-cap 20000] [--steps 20] [--json PATH]

Why: `ndp-bench train` measures a node through Ray and gRPC on cores it shares with every
other process; this isolates the embedding work near the data. The node holds every second
Criteo-shaped table (the bench's node-0 share at its quick sizes, `ROWS_CAP` rows at most),
its cache holds every row, one thread; each step is one lookup of 1024 bags per feature and
one push (row-wise Adagrad). FBGEMM's `SplitTableBatchedEmbeddingBagsCodegen` does the same
tables' forward + backward + fused update on the same bags. Reported: process CPU ms per
step of the node's lookup, of its push + update, and of FBGEMM's whole step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ndp.bench.train import CRITEO_ROWS
from ndp.config import SparseOptimizerConfig, StorageConfig
from ndp.plan import Bags, ShardSpec
from storage_node.node import StorageNodeCore

DIM, BATCH = 16, 1024


def _batches(sizes: list[int], pooling: float, steps: int, seed: int) -> list[dict[str, Bags]]:
    """Zipf(1.05) rows, Poisson(pooling) bag lengths (1 each at pooling 1), per feature."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        step = {}
        for i, num_rows in enumerate(sizes):
            lengths = rng.poisson(pooling, BATCH) if pooling > 1 else np.ones(BATCH, np.int64)
            rows = (rng.zipf(1.05, int(lengths.sum())) - 1) % num_rows
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            step[f"f{i}"] = Bags(torch.from_numpy(rows), torch.from_numpy(offsets))
        out.append(step)
    return out


def node_ms(sizes: list[int], pooling: float, batches: list[dict[str, Bags]]) -> dict[str, float]:
    """CPU ms per step of the node's lookup and of its push + update (first 3 steps untimed)."""
    mode = "mean" if pooling > 1 else "sum"
    shards = [ShardSpec(f"t{i}", n, DIM, 0, n, mode, (f"f{i}",)) for i, n in enumerate(sizes)]
    storage = StorageConfig(cache_bytes=sum(sizes) * 256, use_odirect=True)
    optimizer = SparseOptimizerConfig(name="rowwise_adagrad", lr=0.01)
    grads = {f"f{i}": torch.randn(BATCH, DIM) for i in range(len(sizes))}
    lookup = push = 0.0
    with tempfile.TemporaryDirectory(prefix="ndp-node-step-") as flash_dir:
        node = StorageNodeCore(
            node_id="n0",
            shards=shards,
            storage=storage,
            optimizer=optimizer,
            seed=1,
            flash_dir=flash_dir,
        )
        try:
            for step, bags in enumerate(batches):
                started = time.process_time()
                node.lookup(step, 0, bags)
                looked_up = time.process_time()
                node.push_gradients(step, 0, grads)
                if step >= 3:
                    lookup += looked_up - started
                    push += time.process_time() - looked_up
        finally:
            node.close()
    timed = len(batches) - 3
    return {"lookup_ms": lookup / timed * 1e3, "push_update_ms": push / timed * 1e3}


def fbgemm_ms(sizes: list[int], pooling: float, batches: list[dict[str, Bags]]) -> float:
    """CPU ms per step of FBGEMM's forward + backward + fused row-wise Adagrad."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            EmbeddingLocation,
            PoolingMode,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(n, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU) for n in sizes],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01,
        eps=1e-8,
        pooling_mode=PoolingMode.MEAN if pooling > 1 else PoolingMode.SUM,
    )
    grad = torch.randn(BATCH, DIM * len(sizes))
    total = 0.0
    for step, bags in enumerate(batches):
        features = list(bags.values())
        indices = torch.cat([b.indices for b in features])
        lengths = torch.cat([b.offsets[1:] - b.offsets[:-1] for b in features])
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        started = time.process_time()
        tbe(indices, offsets).backward(grad)
        if step >= 3:
            total += time.process_time() - started
    return total / (len(batches) - 3) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ndp.bench.node_step", description=__doc__)
    parser.add_argument("--pooling", type=float, nargs="+", default=[1.0, 20.0])
    parser.add_argument("--rows-cap", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=23)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sizes = [min(r, args.rows_cap) for r in CRITEO_ROWS][0::2]
    results = []
    for pooling in args.pooling:
        batches = _batches(sizes, pooling, args.steps, seed=0)
        node = node_ms(sizes, pooling, batches)
        fbgemm = fbgemm_ms(sizes, pooling, batches)
        total = node["lookup_ms"] + node["push_update_ms"]
        results.append({"pooling": pooling, **node, "fbgemm_ms": fbgemm, "ratio": total / fbgemm})
        print(
            f"pooling {pooling:g}: node lookup {node['lookup_ms']:.1f} + push/update "
            f"{node['push_update_ms']:.1f} = {total:.1f} CPU-ms per step; FBGEMM fwd+bwd+update "
            f"{fbgemm:.1f} ms; node / FBGEMM {total / fbgemm:.2f}x"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"tables": len(sizes), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
