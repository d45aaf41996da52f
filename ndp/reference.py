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

import torch

from ndp.config import Config
from ndp.data.batch import Batch
from ndp.model.dense import DenseHalf
from ndp.model.dense_step import DenseStep
from ndp.model.embedding import ReferenceEmbeddings, build_reference_embeddings


class ReferenceEngine:
    """Whole-model training in one process (a `ndp.train_loop.StepEngine`).

    Attributes:
        dense: the dense half's step (`ndp.model.dense_step.DenseStep`, as in the GPU
            workers), its optimizer and this engine's phase clock.
        device: where both halves run (`dense.device`).
        dense_half: bottom MLP + interaction + top MLP (`dense.dense_half`).
        embeddings: FBGEMM tables with the fused sparse optimizer.
    """

    mode = "reference"
    """Name of the engine in summaries and `ndp-train --mode`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.dense = DenseStep(cfg)
        self.device = self.dense.device
        self.dense_half: DenseHalf = self.dense.dense_half
        self.embeddings: ReferenceEmbeddings = build_reference_embeddings(cfg, self.device)
        self._clock = self.dense.clock

    def train_step(self, step: int, batch: Batch) -> float:
        """One synchronous step; returns the batch loss computed before the update."""
        with self._clock.phase("data_to_device_s"):
            dense, sparse, labels = self._to_device(batch)
        with self._clock.phase("embedding_forward_s"):
            group_outputs = self.embeddings.pooled_by_group(sparse)
        # Cut the graph at the pooled vectors, as ndp does: the dense backward ends in
        # d(loss)/d(pooled), which is then fed to the embedding half's fused backward. The
        # leaves are the TBE's per-group outputs [B, sum of dims]; features are views of them.
        leaves = [out.detach().requires_grad_() for out in group_outputs]
        loss = self.dense.forward_backward(dense, self.embeddings.split_features(leaves), labels)
        with self._clock.phase("embedding_backward_update_s"):
            torch.autograd.backward(group_outputs, [leaf.grad for leaf in leaves])
        self.dense.optimizer_step()
        return float(loss)

    @torch.no_grad()
    def predict(self, step: int, batch: Batch) -> torch.Tensor:
        """Logits [B] on CPU; no update of either half."""
        dense, sparse, _ = self._to_device(batch)
        return self.dense.predict(dense, self.embeddings(sparse)).float().cpu()

    def timings(self) -> dict[str, float]:
        """Seconds per phase since the last call (cuda phases are synchronised)."""
        return self._clock.take()

    def phase_medians(self) -> dict[str, float]:
        """Median seconds of one step's block per phase since the last `timings()`."""
        return self._clock.medians()

    def close(self) -> None:
        """Nothing to release: everything lives in this process."""

    def _to_device(self, batch: Batch):
        non_blocking = self.device.type == "cuda"
        return (
            batch.dense.to(self.device, non_blocking=non_blocking),
            batch.sparse.to(self.device, non_blocking=non_blocking),
            batch.labels.to(self.device, non_blocking=non_blocking),
        )
