"""The single-process reference trainer: the whole DLRM in one process, torchrec/FBGEMM style.

Why it exists: synchronous ndp must produce the same model as this engine (same init, data
order and optimizers), so it is the yardstick for equivalence tests and the baseline for
benchmarks. It implements `ndp.train_loop.StepEngine`, the protocol that `run_training`
drives.

One step, split at the same seam as ndp (the pooled vectors)::

    data -> device | embedding forward (TBE) | dense forward + backward -> d(loss)/d(pooled)
                   | embedding backward + fused sparse update | dense optimizer step
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import nn

from ndp.config import Config, DenseOptimizerConfig
from ndp.data.batch import Batch
from ndp.errors import ConfigError
from ndp.model.dense import DenseHalf, build_dense_half
from ndp.model.embedding import ReferenceEmbeddings, build_reference_embeddings


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


class ReferenceEngine:
    """Whole-model training in one process (a `ndp.train_loop.StepEngine`).

    Attributes:
        device: where both halves run.
        dense_half: bottom MLP + interaction + top MLP.
        embeddings: FBGEMM tables with the fused sparse optimizer.
        dense_optimizer: torch.optim over `dense_half`'s parameters.
    """

    mode = "reference"
    """Name of the engine in summaries and `ndp-train --mode`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.dense_half: DenseHalf = build_dense_half(cfg.model, seed=cfg.train.seed).to(
            self.device
        )
        self.embeddings: ReferenceEmbeddings = build_reference_embeddings(cfg, self.device)
        self.dense_optimizer = build_dense_optimizer(
            cfg.optimizer.dense, list(self.dense_half.parameters())
        )
        self.loss_fn = nn.BCEWithLogitsLoss(reduction="mean")
        self._seconds: dict[str, float] = defaultdict(float)

    def train_step(self, step: int, batch: Batch) -> float:
        """One synchronous step; returns the batch loss computed before the update."""
        self.dense_half.train()
        with self._phase("data_to_device_s"):
            dense, sparse, labels = self._to_device(batch)
        with self._phase("embedding_forward_s"):
            group_outputs = self.embeddings.pooled_by_group(sparse)
        with self._phase("dense_forward_backward_s"):
            # Cut the graph at the pooled vectors, as ndp does: the dense backward ends in
            # d(loss)/d(pooled), which is then fed to the embedding half's fused backward.
            leaves = [out.detach().requires_grad_() for out in group_outputs]
            logits = self.dense_half(dense, self.embeddings.split_features(leaves))
            loss = self.loss_fn(logits, labels)
            self.dense_optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with self._phase("embedding_backward_update_s"):
            torch.autograd.backward(group_outputs, [leaf.grad for leaf in leaves])
        with self._phase("dense_optimizer_s"):
            self.dense_optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, step: int, batch: Batch) -> torch.Tensor:
        """Logits [B] on CPU; no update of either half."""
        self.dense_half.eval()
        dense, sparse, _ = self._to_device(batch)
        logits = self.dense_half(dense, self.embeddings(sparse))
        return logits.float().cpu()

    def timings(self) -> dict[str, float]:
        """Seconds per phase since the last call (cuda phases are synchronised)."""
        seconds, self._seconds = dict(self._seconds), defaultdict(float)
        return seconds

    def close(self) -> None:
        """Nothing to release: everything lives in this process."""

    def _to_device(self, batch: Batch):
        non_blocking = self.device.type == "cuda"
        return (
            batch.dense.to(self.device, non_blocking=non_blocking),
            batch.sparse.to(self.device, non_blocking=non_blocking),
            batch.labels.to(self.device, non_blocking=non_blocking),
        )

    def _phase(self, name: str) -> _PhaseTimer:
        return _PhaseTimer(self._seconds, name, self.device)


class _PhaseTimer:
    """Adds the wall time of a `with` block to `seconds[name]` (synchronising cuda first)."""

    def __init__(self, seconds: dict[str, float], name: str, device: torch.device) -> None:
        self.seconds, self.name, self.sync = seconds, name, device.type == "cuda"

    def __enter__(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.seconds[self.name] += time.perf_counter() - self.start
