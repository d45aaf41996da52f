"""An arena's update by FBGEMM's table-batched backward kernel, in place on the cache's slots.

FBGEMM's CPU `SplitTableBatchedEmbeddingBagsCodegen` trains with one fused call per step:
`split_embedding_backward_codegen_{optimizer}_cpu` groups a step's values by row, sums each
row's gradient from the pooled gradients `grad_output` [B, T * D] and applies the optimizer
to every touched row, without ever writing one [nnz, D] row per value. A node whose arena
rows are all cache-resident (every table fits its DRAM budget) hands that kernel the cache's
slot tensor as FBGEMM's `host_weights` and the slots of the step's values as its indices:

    pseudo-tables   one per (worker, feature) of the push, each [B] bags, D columns
    weights         the arena's slot tensor [C, D], shared by every pseudo-table
                    (weights_offsets all 0)
    hash_size_cumsum [0, 0, ..., 0, C]: every pseudo-table in one physical table, so the
                    kernel merges all values of a slot, across features and workers
    indices         slots of the values; offsets the pushes' KeyedJaggedTensor offsets
    indice_weights  per-sample weights x 1 / mean divisor (SUM pooling of scaled values)

Why: the node's own path (`keyed_bags.merge_row_gradients` + `optimizers.apply_update_at`)
needs a sort for the dedupe, a sparse product for the merge and an `index_add_`: 2.3 ms for
13 tables x 1024 one-hot bags against the kernel's 0.95 ms, and 11.8 ms against 7.0 ms at
pooling 8 (`ndp-bench`'s fits shape, one thread). It is also the reference trainer's own
arithmetic, so the node and the reference agree to the last bits FBGEMM's order gives.

The cache keeps a slot's weights [C, D] and optimizer state [C, S] in two arrays
(`cache.RowCache`), so they are FBGEMM's `host_weights` and `momentum1_host` as they are.
fbgemm-gpu-cpu has kernels for sgd, adagrad and rowwise_adagrad; Adam (no CPU kernel) keeps
the node's own vectorised path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ndp.config import SparseOptimizerConfig

FUSED_OPTIMIZERS = frozenset({"sgd", "adagrad", "rowwise_adagrad"})
"""Optimizers that fbgemm-gpu-cpu has a backward kernel for."""


def _load_kernels() -> None:
    """Register FBGEMM's CPU ops with torch (importing the training module does)."""
    import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401


@dataclass(frozen=True)
class KeyedGradients:
    """One push's gradients in the layout of FBGEMM's table-batched kernels.

    Every feature has the same batch B (a KeyedJaggedTensor's stride); the features are the
    kernel's pseudo-tables, in the order of `values` and `offsets`.
    """

    values: torch.Tensor
    """int64 [nnz] arena rows, feature after feature (bag after bag within a feature)."""
    offsets: torch.Tensor
    """int64 [features * B + 1]."""
    scale: torch.Tensor | None
    """float32 [nnz] per-value factor of the pooling (weights x 1/divisor); None = 1."""
    grad_output: torch.Tensor
    """float32 [B, features * D] contiguous: d(loss)/d(pooled) of every bag."""
    batch: int

    @property
    def num_features(self) -> int:
        return (self.offsets.numel() - 1) // self.batch if self.batch else 0

    @staticmethod
    def join(parts: list[KeyedGradients | None]) -> KeyedGradients | None:
        """Every worker's gradients as one push of more pseudo-tables (worker after worker);
        None when a part has none or the workers' batch sizes differ (the kernel's B is one)."""
        if not parts or any(p is None for p in parts):
            return None
        known = [p for p in parts if p is not None]
        if len({p.batch for p in known}) != 1:
            return None
        if len(known) == 1:
            return known[0]
        shifts = [0]
        for part in known[:-1]:
            shifts.append(shifts[-1] + int(part.offsets[-1]))
        scale = join_scales([p.scale for p in known], [p.values.numel() for p in known])
        return KeyedGradients(
            torch.cat([p.values for p in known]),
            torch.cat(
                [known[0].offsets[:1]]
                + [p.offsets[1:] + shift for p, shift in zip(known, shifts, strict=True)]
            ),
            scale,
            torch.cat([p.grad_output for p in known], dim=1),
            known[0].batch,
        )


def join_scales(scales: list[torch.Tensor | None], sizes: list[int]) -> torch.Tensor | None:
    """Parts' per-value scales as one tensor (1 for a part without); None when all are 1."""
    if all(scale is None for scale in scales):
        return None
    return torch.cat(
        [s if s is not None else torch.ones(n) for s, n in zip(scales, sizes, strict=True)]
    )


def keyed_grad_output(grads: list[torch.Tensor]) -> torch.Tensor:
    """float32 [B, features * D]: the features' [B, D] gradients side by side, read in place
    when they are already the column blocks of one such tensor (the wire's KeyedTensor
    holding exactly these features, in this order), else copied once."""
    head = grads[0]
    batch, dim = head.shape
    width = dim * len(grads)
    start = head.storage_offset()
    in_place = head.dtype == torch.float32 and all(
        g.dtype == torch.float32
        and g.shape == head.shape
        and g.stride() == (width, 1)
        and g.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
        and g.storage_offset() == start + i * dim
        for i, g in enumerate(grads)
    )
    if in_place and batch > 0:
        return head.as_strided((batch, width), (width, 1), start)
    return torch.cat(grads, dim=1).to(torch.float32).contiguous()


def fused_backward(
    cfg: SparseOptimizerConfig,
    weights: torch.Tensor,
    state: torch.Tensor,
    slots: torch.Tensor,
    grads: KeyedGradients,
) -> None:
    """Apply one step of `cfg` to the slots `grads` touch, in place, in one FBGEMM call.

    Args:
        weights: float32 [C, D] contiguous slot weights (FBGEMM's `host_weights`).
        state: float32 [C, S] contiguous slot optimizer state (`momentum1_host`: S = D for
            adagrad, 1 for rowwise_adagrad, 0 for sgd).
        slots: int64 [nnz] the slot of each of `grads.values`.
        grads: the step's gradients (every worker's, joined).
    """
    assert cfg.name in FUSED_OPTIMIZERS, f"no fused kernel for {cfg.name!r}"
    _load_kernels()
    num_slots, dim = weights.shape
    tables = grads.num_features
    if tables == 0 or slots.numel() == 0:
        return
    zeros = torch.zeros(tables, dtype=torch.int64)
    hash_size_cumsum = torch.zeros(tables + 1, dtype=torch.int64)
    hash_size_cumsum[-1] = num_slots
    scale = grads.scale if grads.scale is not None else torch.ones(slots.numel())
    host = torch.zeros(tables, dtype=torch.int32)  # placements: host memory
    common = (
        grads.grad_output,
        weights.view(-1),
        host,
        zeros,  # weights_offsets: every pseudo-table is the whole slot tensor
        torch.arange(0, (tables + 1) * dim, dim, dtype=torch.int32),  # D_offsets
        dim,
        hash_size_cumsum,
        max(1, math.ceil(math.log2(max(num_slots, 2)))) + 1,
        slots,
        grads.offsets,
        0,  # SUM pooling: mean divisors are in the per-value scale
        scale.to(torch.float32),
        False,  # no stochastic rounding (fp32 weights)
    )
    lr = torch.tensor(cfg.lr, dtype=torch.float32)
    if cfg.name == "sgd":
        torch.ops.fbgemm.split_embedding_backward_codegen_sgd_cpu(*common, lr)
        return
    momentum = (state.view(-1), host, zeros)  # one state array for every pseudo-table
    if cfg.name == "adagrad":
        torch.ops.fbgemm.split_embedding_backward_codegen_adagrad_cpu(
            *common, *momentum, lr, eps=cfg.eps
        )
    else:  # rowwise_adagrad, without weight decay (FBGEMM's default mode NONE)
        torch.ops.fbgemm.split_embedding_backward_codegen_rowwise_adagrad_cpu(
            *common, *momentum, lr, eps=cfg.eps
        )
