"""The dense half's training step at the pooled-vector seam, shared by every engine.

The GPU worker (`gpu_worker.worker.DenseWorker`), the single-process reference
(`ndp.reference.ReferenceEngine`) and the benchmark baselines (`ndp.bench.baselines`) differ
only in where the pooled vectors come from and where their gradients go; the dense half in
between is this one class, so the three compute the same numbers by construction::

    leaves(pooled)        {feature: [B, D]} -> on the device, leaves of a fresh graph
    forward_backward      dense [B, 13], pooled, labels [B] -> DenseHalf -> logits [B]
                          -> BCE-with-logits (mean) -> backward of loss / loss_divisor:
                          d(loss)/d(pooled) in each leaf's .grad, dense gradients in the
                          parameters' .grad
        (the engine's seam: the worker all-reduces the dense gradients and pushes the pooled
        ones to the storage nodes; the reference feeds them to the TBE's fused backward)
    optimizer_step        the dense optimizer

Phases, on the step's `clock` (which the engine also times its own phases on):
`dense_compute_s` (leaves, forward, backward) and `dense_optimizer_s`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ndp.config import Config, DenseOptimizerConfig
from ndp.errors import ConfigError
from ndp.model.dense import build_dense_half
from ndp.phase_clock import PhaseClock


def resolve_device(name: str) -> torch.device:
    """`train.device` -> torch.device (`auto`: cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device: 'cuda' requested but no CUDA device is available; use auto or cpu"
        )
    return torch.device(name)


def build_dense_optimizer(
    config: DenseOptimizerConfig, params: list[nn.Parameter]
) -> torch.optim.Optimizer:
    """torch.optim optimizer of the dense half (Adagrad starts from a zero accumulator)."""
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    if config.name == "adagrad":
        return torch.optim.Adagrad(
            params, lr=config.lr, eps=config.eps, initial_accumulator_value=0.0
        )
    if config.name == "adam":
        beta1, beta2 = config.betas
        return torch.optim.Adam(params, lr=config.lr, betas=(beta1, beta2), eps=config.eps)
    raise ConfigError(f"optimizer.dense.name: {config.name!r} is not one of sgd, adagrad, adam")


class DenseStep:
    """The dense half on `train.device`, its optimizer, its loss and the engine's phase clock.

    Args:
        cfg: the run's config (`model`, `train.device`, `train.seed`, `optimizer.dense`).

    Attributes:
        device: where the dense half runs (`resolve_device(cfg.train.device)`).
        dense_half: bottom MLP + interaction + top MLP (`ndp.model.dense.build_dense_half`).
        optimizer: torch.optim over `dense_half`'s parameters (`build_dense_optimizer`).
        clock: seconds per phase; the engine times its other phases on it too.
    """

    def __init__(self, cfg: Config) -> None:
        self.device = resolve_device(cfg.train.device)
        self.dense_half = build_dense_half(cfg.model, seed=cfg.train.seed).to(self.device)
        self.optimizer = build_dense_optimizer(
            cfg.optimizer.dense, list(self.dense_half.parameters())
        )
        self.loss_fn = nn.BCEWithLogitsLoss(reduction="mean")
        self.clock = PhaseClock(self.device)

    def leaves(self, pooled: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{feature: [B, D]} on the device, detached and requiring grad: the graph starts here."""
        with self.clock.phase("dense_compute_s"):
            return {f: t.detach().to(self.device).requires_grad_() for f, t in pooled.items()}

    def forward_backward(
        self,
        dense: torch.Tensor,
        pooled: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        *,
        loss_divisor: int = 1,
    ) -> torch.Tensor:
        """Forward and backward of the mean BCE loss; returns it (detached, before any update).

        Args:
            dense: [B, dense_in_features] dense features.
            pooled: {feature: [B, D]} on the device, views of leaves that require grad.
            labels: [B] click labels.
            loss_divisor: backward runs on loss / loss_divisor (the worker's world size: the
                workers' summed gradients are then the whole batch's mean-loss gradients).
        """
        with self.clock.phase("dense_compute_s"):
            self.dense_half.train()
            logits = self.dense_half(dense.to(self.device), pooled)
            loss = self.loss_fn(logits, labels.to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            (loss / loss_divisor).backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        """Apply the dense gradients (after any all-reduce)."""
        with self.clock.phase("dense_optimizer_s"):
            self.optimizer.step()

    def train_on(
        self, dense: torch.Tensor, pooled: Mapping[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[float, dict[str, torch.Tensor]]:
        """A whole step of one process (no all-reduce) on `pooled` {feature: [B, D]}.

        Returns:
            The loss before the update and {feature: d(loss)/d(pooled) [B, D] on CPU}.
        """
        leaves = self.leaves(pooled)
        loss = self.forward_backward(dense, leaves, labels)
        self.optimizer_step()
        grads = {f: leaf.grad.detach().cpu() for f, leaf in leaves.items()}
        return float(loss), grads

    @torch.no_grad()
    def predict(self, dense: torch.Tensor, pooled: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits [B] on the device, in eval mode, without touching any gradient."""
        self.dense_half.eval()
        logits = self.dense_half(
            dense.to(self.device), {f: t.to(self.device) for f, t in pooled.items()}
        )
        self.dense_half.train()
        return logits
