"""Near-data sparse optimizers with FBGEMM's semantics, applied once per unique row per step.

Each function updates `weights` [n, D] and `state` [n, S] in place from the merged row
gradients `grads` [n, D] (duplicates already summed, all workers already summed) -- the
"EXACT_*" family of FBGEMM's `SplitTableBatchedEmbeddingBagsCodegen`:

- `sgd` (EXACT_SGD): ``w -= lr * g``; S = 0.
- `adagrad` (EXACT_ADAGRAD): ``h += g^2; w -= lr * g / (sqrt(h) + eps)``; S = D.
- `rowwise_adagrad` (EXACT_ROWWISE_ADAGRAD): ``h += mean_d(g^2); w -= lr / (sqrt(h) + eps) * g``;
  S = 1 (one accumulator per row).
- `adam` (ADAM): ``m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
  w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``; S = 2D laid out ``[m | v]``.
  As in FBGEMM, ``t`` is the module's *global* iteration counter (1 at the first training
  step, +1 every step whether or not a row was touched), not a per-row count; rows not
  touched in a step are not updated at all (lazy/sparse Adam). FBGEMM's CPU build has no
  Adam ("Optimizer adam is not supported in CPU mode"), so this one is checked against the
  formula, not against FBGEMM.

Weight decay is not exposed (FBGEMM's default, `WeightDecayMode.NONE`).
"""

from __future__ import annotations

import torch

from ndp.config import SparseOptimizerConfig


def apply_update(
    cfg: SparseOptimizerConfig,
    weights: torch.Tensor,
    state: torch.Tensor,
    grads: torch.Tensor,
    *,
    iteration: int,
) -> None:
    """Apply one optimizer step to the given rows, in place.

    Args:
        weights: float32 [n, D], updated in place.
        state: float32 [n, S] (S from `optimizer_state_width`), updated in place.
        grads: float32 [n, D], one merged gradient per unique row.
        iteration: FBGEMM's global step counter, 1 for the first update (Adam only).
    """
    if cfg.name == "sgd":
        weights.sub_(cfg.lr * grads)
    elif cfg.name == "adagrad":
        state.add_(grads * grads)
        weights.sub_(cfg.lr * grads / (state.sqrt() + cfg.eps))
    elif cfg.name == "rowwise_adagrad":
        state[:, 0].add_((grads * grads).mean(dim=1))
        multiplier = cfg.lr / (state[:, 0].sqrt() + cfg.eps)
        weights.sub_(multiplier[:, None] * grads)
    elif cfg.name == "adam":
        dim = weights.shape[1]
        m, v = state[:, :dim], state[:, dim:]
        m.mul_(cfg.beta1).add_((1.0 - cfg.beta1) * grads)
        v.mul_(cfg.beta2).add_((1.0 - cfg.beta2) * grads * grads)
        m_hat = m / (1.0 - cfg.beta1**iteration)
        v_hat = v / (1.0 - cfg.beta2**iteration)
        weights.sub_(cfg.lr * (m_hat / (v_hat.sqrt() + cfg.eps)))
    else:  # the config validates names; a new one must be added here
        raise AssertionError(f"unhandled sparse optimizer {cfg.name!r}")


def apply_update_at(
    cfg: SparseOptimizerConfig,
    weights: torch.Tensor,
    state: torch.Tensor,
    slots: torch.Tensor,
    grads: torch.Tensor,
    *,
    iteration: int,
) -> None:
    """`apply_update` on the rows `slots` of the slot tensors, in place, without copying the
    weights out: the weight change is one `index_add_` into `weights`, and only the
    optimizer state the formula reads is gathered (nothing for sgd, one column for
    rowwise_adagrad). The same arithmetic as `apply_update`, so the same bits.

    Args:
        weights: float32 [C, D] slot weights.
        state: float32 [C, S] slot optimizer state.
        slots: int64 [n] distinct slots of the updated rows.
        grads: float32 [n, D], one merged gradient per row.
    """
    if cfg.name == "sgd":
        weights.index_add_(0, slots, (cfg.lr * grads).neg_())
    elif cfg.name == "adagrad":
        sums = state[slots]
        sums.add_(grads * grads)
        state[slots] = sums
        weights.index_add_(0, slots, (cfg.lr * grads / (sums.sqrt() + cfg.eps)).neg_())
    elif cfg.name == "rowwise_adagrad":
        accumulator = state[slots, 0]
        accumulator.add_((grads * grads).mean(dim=1))
        state[slots, 0] = accumulator
        multiplier = cfg.lr / (accumulator.sqrt() + cfg.eps)
        weights.index_add_(0, slots, (multiplier[:, None] * grads).neg_())
    else:  # adam reads and writes the whole record
        rows, moments = weights[slots], state[slots]
        apply_update(cfg, rows, moments, grads, iteration=iteration)
        weights[slots] = rows
        state[slots] = moments
