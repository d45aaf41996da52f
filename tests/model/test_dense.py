"""The dense half is torchrec's DLRM minus its embedding tables."""

from __future__ import annotations

import pytest
import torch

from model.tiny import random_sparse, tiny_config, torchrec_dlrm_with_same_weights
from ndp.model.dense import build_dense_half
from ndp.model.embedding import build_reference_embeddings


def test_dense_half_plus_pooled_embeddings_reproduces_torchrec_dlrm_logits(cfg):
    embeddings = build_reference_embeddings(cfg)
    dense_half = build_dense_half(cfg.model, seed=3)
    dlrm = torchrec_dlrm_with_same_weights(cfg, embeddings, dense_half)
    sparse = random_sparse(cfg, batch_size=6, seed=0)
    dense = torch.randn(6, cfg.model.dense_in_features, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        ours = dense_half(dense, embeddings(sparse))
        theirs = dlrm(dense, sparse).squeeze(-1)

    assert ours.shape == (6,)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_logits_depend_on_pooled_embeddings_in_feature_order(cfg):
    dense_half = build_dense_half(cfg.model, seed=0)
    dense = torch.randn(4, cfg.model.dense_in_features)
    pooled = {f: torch.randn(4, 8) for f in cfg.model.feature_names}
    swapped = dict(pooled, f0=pooled["f1"], f1=pooled["f0"])

    with torch.no_grad():
        assert not torch.allclose(dense_half(dense, pooled), dense_half(dense, swapped))


def test_same_seed_gives_same_weights_and_leaves_global_rng_alone(cfg):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)

    first = build_dense_half(cfg.model, seed=7)
    after_build = torch.rand(1)
    second = build_dense_half(cfg.model, seed=7)
    other = build_dense_half(cfg.model, seed=8)

    assert torch.equal(after_build, expected_next)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert any(
        not torch.equal(a, c)
        for a, c in zip(first.state_dict().values(), other.state_dict().values(), strict=True)
    )


def test_single_layer_top_mlp_is_one_linear_logit():
    cfg = tiny_config(model={"top_mlp": [1]})
    dense_half = build_dense_half(cfg.model, seed=0)
    logits = dense_half(torch.randn(5, 13), {f: torch.randn(5, 8) for f in cfg.model.feature_names})
    assert logits.shape == (5,)


def test_missing_pooled_feature_is_named(cfg):
    dense_half = build_dense_half(cfg.model, seed=0)
    pooled = {f: torch.randn(2, 8) for f in cfg.model.feature_names if f != "f2"}
    with pytest.raises(KeyError, match="f2"):
        dense_half(torch.randn(2, 13), pooled)
