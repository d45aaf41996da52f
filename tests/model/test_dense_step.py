"""The dense step every engine shares, and the phase clock it times on."""

from __future__ import annotations

import copy

import pytest
import torch

import ndp.phase_clock as phase_clock
from model.tiny import tiny_config
from ndp.errors import ConfigError
from ndp.model.dense_step import DenseStep, build_dense_optimizer, resolve_device
from ndp.phase_clock import PhaseClock

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCH = 8


def _inputs(cfg, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    dim = cfg.model.tables[0].embedding_dim
    pooled = {f: torch.randn(BATCH, dim, generator=generator) for f in cfg.model.feature_names}
    dense = torch.randn(BATCH, cfg.model.dense_in_features, generator=generator)
    labels = (torch.rand(BATCH, generator=generator) > 0.5).float()
    return dense, pooled, labels


def test_the_pooled_gradients_are_those_of_the_mean_loss_divided_by_loss_divisor():
    cfg = tiny_config(train={"device": "cpu"})
    dense, pooled, labels = _inputs(cfg)
    whole, halved = DenseStep(cfg), DenseStep(cfg)
    whole_leaves, halved_leaves = whole.leaves(pooled), halved.leaves(pooled)
    loss = whole.forward_backward(dense, whole_leaves, labels)
    halved_loss = halved.forward_backward(dense, halved_leaves, labels, loss_divisor=2)
    assert torch.equal(loss, halved_loss)  # the loss itself is not divided
    for feature, leaf in whole_leaves.items():
        torch.testing.assert_close(halved_leaves[feature].grad, leaf.grad / 2)


def test_train_on_returns_the_loss_before_the_update_and_cpu_gradients():
    cfg = tiny_config(train={"device": "cpu"})
    dense, pooled, labels = _inputs(cfg)
    step = DenseStep(cfg)
    before = torch.nn.functional.binary_cross_entropy_with_logits(
        step.predict(dense, pooled), labels
    )
    loss, grads = step.train_on(dense, pooled, labels)
    assert loss == pytest.approx(float(before))
    assert set(grads) == set(pooled) and all(g.device.type == "cpu" for g in grads.values())
    assert set(step.clock.take()) == {"dense_compute_s", "dense_optimizer_s"}
    assert step.dense_half.training  # predict leaves the half in train mode


def test_same_config_gives_the_same_initial_dense_half():
    cfg = tiny_config(train={"device": "cpu"})
    first, second = DenseStep(cfg).dense_half.state_dict(), DenseStep(cfg).dense_half.state_dict()
    assert all(torch.equal(value, second[name]) for name, value in first.items())


def test_cuda_without_cuda_is_a_config_error_naming_train_device():
    if torch.cuda.is_available():
        pytest.skip("this machine has cuda")
    with pytest.raises(ConfigError, match=r"train\.device"):
        resolve_device("cuda")


def test_unknown_dense_optimizer_names_the_field_and_the_choices():
    config = tiny_config().optimizer.dense
    bad = copy.copy(config)
    object.__setattr__(bad, "name", "lamb")  # past the loader, which refuses it first
    with pytest.raises(ConfigError, match=r"optimizer\.dense\.name: 'lamb' .*sgd, adagrad, adam"):
        build_dense_optimizer(bad, [torch.nn.Parameter(torch.zeros(1))])


# ----------------------------------------------------------------- PhaseClock


@pytest.fixture()
def ticks(monkeypatch):
    """perf_counter returns 0, 1, 2, ... so each clock reading is one second later."""
    counter = iter(range(1000))
    monkeypatch.setattr(phase_clock.time, "perf_counter", lambda: float(next(counter)))


def test_a_phase_inside_another_is_not_counted_twice(ticks):
    clock = PhaseClock(torch.device("cpu"))
    with clock.phase("dense_compute_s"):  # t=0
        with clock.phase("gradient_push_s"):  # t=1 .. t=2
            pass
    # t=3: the outer ran 0..1 and 2..3
    assert clock.take() == {"dense_compute_s": 2.0, "gradient_push_s": 1.0}


def test_take_returns_the_seconds_since_the_last_take(ticks):
    clock = PhaseClock(torch.device("cpu"))
    with clock.phase("route_s"):
        pass
    with clock.phase("route_s"):
        pass
    assert clock.take() == {"route_s": 2.0}
    assert clock.take() == {}


def test_medians_give_the_typical_block_of_each_phase_since_the_last_take(ticks):
    """A block held up once (3 s against 1 s) moves the sum, not the median."""
    clock = PhaseClock(torch.device("cpu"))
    for readings_inside in (0, 2, 0):  # each reading inside a block makes it 1 s longer
        with clock.phase("embedding_forward_s"):
            for _ in range(readings_inside):
                phase_clock.time.perf_counter()
    with clock.phase("dense_compute_s"):  # 1 s of its own around a 1 s inner block
        with clock.phase("gradient_push_s"):
            pass
    assert clock.medians() == {
        "embedding_forward_s": 1.0,
        "dense_compute_s": 2.0,
        "gradient_push_s": 1.0,
    }
    assert clock.take()["embedding_forward_s"] == 5.0
    assert clock.medians() == {}


def test_a_phase_that_raises_still_counts_and_closes(ticks):
    clock = PhaseClock(torch.device("cpu"))
    with pytest.raises(ValueError), clock.phase("lookup_wait_s"):
        raise ValueError("refused")
    with clock.phase("push_wait_s"):
        pass
    assert clock.take() == {"lookup_wait_s": 1.0, "push_wait_s": 1.0}
