"""Synthetic data: Zipf skew, spread-out hot rows, bag lengths, determinism, learnable labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from ndp.data.loader import build_datasets
from ndp.data.synthetic import (
    BLOCK_SAMPLES,
    RowPermutation,
    SyntheticDataset,
    ZipfSampler,
    fit_zipf_exponent,
)


def first_batch(cfg, batch_size, split="train"):
    return next(SyntheticDataset(cfg, split).batches(batch_size))


@pytest.mark.parametrize("exponent", [1.05, 1.2])
def test_zipf_sampler_fits_its_exponent_on_the_top_ranks(exponent):
    ranks = ZipfSampler(1_000_000, exponent).sample(np.random.default_rng(0), 200_000)
    assert ranks.min() >= 1 and ranks.max() <= 1_000_000
    assert fit_zipf_exponent(ranks, top_ranks=100) == pytest.approx(exponent, abs=0.08)


def test_zipf_sampler_matches_exact_probabilities_on_a_small_support():
    exponent, n = 1.1, 5
    ranks = ZipfSampler(n, exponent).sample(np.random.default_rng(1), 100_000)
    weights = np.arange(1, n + 1, dtype=float) ** -exponent
    observed = np.bincount(ranks, minlength=n + 1)[1:] / ranks.size
    np.testing.assert_allclose(observed, weights / weights.sum(), atol=0.01)


def test_dataset_rows_follow_the_configured_zipf_exponent(synthetic_config):
    cfg = synthetic_config({"f0": 1_000_000}, zipf_exponent=1.1, num_samples=40_000)
    rows = np.concatenate(
        [b.sparse.values().numpy() for b in SyntheticDataset(cfg, "train").batches(10_000)]
    )
    assert fit_zipf_exponent(rows, top_ranks=50) == pytest.approx(1.1, abs=0.12)


def test_hot_rows_are_spread_over_the_table_not_rows_0_to_k(synthetic_config):
    cfg = synthetic_config({"f0": 1_000_000}, num_samples=8192)
    rows = first_batch(cfg, 8192).sparse.values().numpy()
    values, counts = np.unique(rows, return_counts=True)
    hottest = values[np.argsort(counts)[::-1][:10]]
    assert hottest.max() > 10_000


@pytest.mark.parametrize("num_rows", [1, 2, 3, 1000, 4097])
def test_row_permutation_is_a_bijection_of_the_row_range(num_rows):
    permuted = RowPermutation(num_rows, key=42)(np.arange(num_rows))
    assert sorted(permuted.tolist()) == list(range(num_rows))
    if num_rows >= 1000:
        assert (permuted != np.arange(num_rows)).mean() > 0.99


def test_row_permutation_depends_on_the_key():
    index = np.arange(1000)
    assert not np.array_equal(RowPermutation(1000, 1)(index), RowPermutation(1000, 2)(index))


def test_a_table_of_five_billion_rows_works_without_materialising_it(synthetic_config):
    cfg = synthetic_config({"huge": 5_000_000_000}, num_samples=2048)
    rows = first_batch(cfg, 2048).sparse.values()
    assert rows.dtype == torch.int64
    assert int(rows.min()) >= 0 and int(rows.max()) < 5_000_000_000
    assert int(rows.max()) > 2**32  # ids really use the range beyond 32 bits


@pytest.mark.parametrize(
    ("distribution", "mean"), [("poisson", 4.0), ("uniform", 3.0), ("fixed", 2.0)]
)
def test_mean_pooling_factor_matches_config_and_bags_are_never_empty(
    distribution, mean, synthetic_config
):
    cfg = synthetic_config(pooling_factor=mean, pooling_distribution=distribution)
    lengths = first_batch(cfg, 4096).sparse.lengths().double()
    assert lengths.min() >= 1
    assert lengths.mean().item() == pytest.approx(mean, abs=0.1)
    if distribution == "fixed":
        assert (lengths == mean).all()
    else:
        assert lengths.std() > 0.5


def test_pooling_factor_can_be_given_per_feature(synthetic_config):
    cfg = synthetic_config(pooling_factor=[1.0, 5.0], pooling_distribution="poisson")
    sparse = first_batch(cfg, 4096).sparse.to_dict()
    assert sparse["f0"].lengths().double().mean().item() == 1.0
    assert sparse["f1"].lengths().double().mean().item() == pytest.approx(5.0, abs=0.15)


def test_same_seed_gives_the_same_batches_and_another_seed_different_ones(synthetic_config):
    a, b = (first_batch(synthetic_config(seed=7), 256) for _ in range(2))
    c = first_batch(synthetic_config(seed=8), 256)
    assert torch.equal(a.sparse.values(), b.sparse.values())
    assert torch.equal(a.dense, b.dense) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.sparse.values(), c.sparse.values())
    assert not torch.equal(a.dense, c.dense)


def test_train_and_val_are_different_streams(synthetic_config):
    cfg = synthetic_config()
    train, val = build_datasets(cfg)
    assert (train.num_samples, val.num_samples) == (4096, 1024)
    assert not torch.equal(next(train.batches(256)).dense, next(val.batches(256)).dense)


def test_start_batch_and_batch_size_do_not_change_the_samples(synthetic_config):
    cfg = synthetic_config(
        num_samples=BLOCK_SAMPLES + 512, pooling_distribution="poisson", pooling_factor=2.0
    )
    dataset = SyntheticDataset(cfg, "train")
    whole = next(dataset.batches(768, start_batch=5))  # crosses the first block boundary
    halves = list(SyntheticDataset(cfg, "train").batches(384, start_batch=10))[:2]
    assert torch.equal(whole.dense, torch.cat([h.dense for h in halves]))
    assert torch.equal(
        whole.sparse["f1"].values(), torch.cat([h.sparse["f1"].values() for h in halves])
    )
    assert len(list(dataset.batches(1000))) == (BLOCK_SAMPLES + 512) // 1000


def test_dense_features_are_log1p_of_non_negative_counts(synthetic_config):
    dense = first_batch(synthetic_config(), 1024).dense.double()
    assert dense.min() >= 0
    counts = torch.expm1(dense)
    assert torch.allclose(counts, counts.round(), atol=1e-3 * counts.clamp(min=1).max().item())
    assert (dense.std(dim=0) > 0.1).all()


@pytest.mark.parametrize("rate", [0.03, 0.25])
def test_positive_rate_is_near_the_target(rate, synthetic_config):
    labels = first_batch(synthetic_config(positive_rate=rate), 4096).labels
    assert set(labels.unique().tolist()) <= {0.0, 1.0}
    assert labels.mean().item() == pytest.approx(rate, abs=max(0.02, rate * 0.3))


def test_labels_follow_the_hidden_score(synthetic_config):
    dataset = SyntheticDataset(synthetic_config(), "train")
    block = dataset.block(0)
    logits = torch.from_numpy(dataset.generator.hidden_logits(block))
    assert binary_auroc(logits, torch.from_numpy(block.labels).long()).item() > 0.85


def test_labels_are_learnable_from_the_observed_features(synthetic_config):
    """Logistic regression on the dense features alone beats AUC 0.70 on validation."""
    train, val = build_datasets(synthetic_config(num_samples=4096, num_val_samples=2048))
    fit, held_out = next(train.batches(4096)), next(val.batches(2048))
    mean, std = fit.dense.mean(0), fit.dense.std(0)
    torch.manual_seed(0)
    model = torch.nn.Linear(13, 1)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=100)

    def closure():
        optimizer.zero_grad()
        logits = model((fit.dense - mean) / std).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, fit.labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        scores = model((held_out.dense - mean) / std).squeeze(1)
    assert binary_auroc(scores, held_out.labels.long()).item() > 0.70
