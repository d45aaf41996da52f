"""The dense half of the DLRM: bottom MLP, dot interaction, top MLP.

Why a module of its own: in ndp the dense half runs on GPU workers while the embedding half
lives on storage nodes, so the two halves meet only at the pooled vectors. The same module
serves the single-process reference trainer, which is what makes the two paths comparable.
The parts are torchrec's own (`DenseArch`, `InteractionArch`, `OverArch`), so a DLRM built by
torchrec with the same weights computes the same logits.

Layout at the seam::

    dense  [B, dense_in_features] --bottom MLP--> [B, D] ----------+
    pooled {feature: [B, D]} --stack in model.feature_names order-> [B, F, D]
                                                                    |
                               dot interaction: [B, D + F + F*(F-1)/2]
                                                                    |
                                           top MLP (last layer linear) --> logits [B]
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch

from ndp.config import ModelConfig


def interaction_width(num_features: int, embedding_dim: int) -> int:
    """Width of the dot interaction's output: the bottom output plus every pairwise dot."""
    return embedding_dim + num_features + num_features * (num_features - 1) // 2


class DenseHalf(nn.Module):
    """Bottom MLP + dot interaction + top MLP; consumes pooled embeddings, emits logits.

    Attributes:
        feature_names: sparse features in the order they are stacked for the interaction.
        dense_arch, inter_arch, over_arch: torchrec modules (same names as in
            `torchrec.models.dlrm.DLRM`, so its state dict keys line up).
    """

    def __init__(self, model: ModelConfig) -> None:
        super().__init__()
        self.feature_names: list[str] = list(model.feature_names)
        num_features = len(self.feature_names)
        self.dense_arch = DenseArch(
            in_features=model.dense_in_features, layer_sizes=list(model.bottom_mlp)
        )
        self.inter_arch = InteractionArch(num_sparse_features=num_features)
        over_in = interaction_width(num_features, model.embedding_dim)
        if len(model.top_mlp) > 1:
            self.over_arch: nn.Module = OverArch(
                in_features=over_in, layer_sizes=list(model.top_mlp)
            )
        else:
            # torchrec's OverArch needs two layers; a single-layer top MLP is a logistic
            # regression on the interaction output, which is one linear layer.
            self.over_arch = nn.Sequential(nn.Linear(over_in, 1))

    def forward(self, dense: torch.Tensor, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of a batch.

        Args:
            dense: float32 [B, dense_in_features].
            pooled: feature name -> float32 [B, D], every feature of the model.

        Returns:
            logits: float32 [B] (no sigmoid; the loss is BCE-with-logits).
        """
        missing = [name for name in self.feature_names if name not in pooled]
        if missing:
            raise KeyError(f"pooled embeddings missing for features {missing}")
        sparse = torch.stack([pooled[name] for name in self.feature_names], dim=1)
        embedded_dense = self.dense_arch(dense)
        interacted = self.inter_arch(dense_features=embedded_dense, sparse_features=sparse)
        return self.over_arch(interacted).squeeze(-1)


def build_dense_half(model: ModelConfig, seed: int) -> DenseHalf:
    """The dense half with weights drawn deterministically from `seed` (on CPU).

    Why fork_rng: initialisation must depend on `seed` only, not on what else consumed the
    global RNG before; forking keeps the caller's global RNG state untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DenseHalf(model)
