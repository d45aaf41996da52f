"""Which failures recovery restarts a job for: decided by exception type, never by its text.

The exceptions are built directly (no Ray cluster, no processes): what each layer raises when a
component dies is what tests/faults/test_kill_components.py provokes for real.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import ray.exceptions as ray_errors
import torch
import torch.distributed as dist
from model.tiny import tiny_config

import storage_node.errors as node_errors
from ndp.errors import (
    CollectiveError,
    ComponentDiedError,
    ComponentTimeoutError,
    ConfigError,
    DataError,
    NDPError,
    PlanError,
)
from ndp.failure_policy import ComponentFailure, classify_failure
from ndp.recovery import RecoveryError, ResilientEngine
from storage_node.auth import UnauthenticatedError
from storage_node.client import StorageNodeUnavailableError

GLOO_PEER_GONE = (
    "[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
    "[127.0.0.1]:60141. This is typically caused by a remote worker crashing."
)
"""What gloo's all-reduce raises (as a bare RuntimeError) when a peer process died."""


def _task_error(cause: BaseException) -> ray_errors.RayTaskError:
    """What ray.get raises when an actor task raised `cause`."""
    return ray_errors.RayTaskError("train_step", "Traceback ...", cause)


def _component(exc: BaseException) -> str | None:
    failure = classify_failure(exc)
    return None if failure is None else failure.component


# ----------------------------------------------------------------- the project's typed errors


@pytest.mark.parametrize(
    ("error", "component"),
    [
        (
            ComponentTimeoutError("gpu-worker-0 did not answer", component="gpu-worker"),
            "gpu-worker",
        ),
        (
            ComponentTimeoutError("storage-node did not answer", component="storage-node"),
            "storage-node",
        ),
        (ComponentDiedError("storage-node-1 died", component="storage-node"), "storage-node"),
        (ComponentDiedError("gpu-worker-1 died", component="gpu-worker"), "gpu-worker"),
        (CollectiveError("all-reduce failed", component="gpu-worker"), "gpu-worker"),
        (ComponentTimeoutError("actor-0 did not answer"), "actor"),
    ],
    ids=["timeout-worker", "timeout-node", "died-node", "died-worker", "collective", "unnamed"],
)
def test_a_component_failure_is_recovered_and_names_its_component(error, component):
    failure = classify_failure(error)
    assert failure == ComponentFailure(component, error)


def test_an_unreachable_storage_node_is_a_storage_node_failure():
    error = StorageNodeUnavailableError("storage node at unix:/x: UNAVAILABLE: connect failed")
    assert classify_failure(error) == ComponentFailure("storage-node", error)
    assert classify_failure(error).describe() == "a storage node"


@pytest.mark.parametrize(
    "error_type",
    [getattr(node_errors, name) for name in node_errors.__all__] + [UnauthenticatedError],
    ids=lambda cls: cls.__name__,
)
def test_a_storage_node_refusal_is_a_user_error_and_not_recovered(error_type):
    """A bad index, a step out of order, a flash dir or checkpoint the node cannot use, a
    wrong token: a restarted node refuses the same request again."""
    assert classify_failure(error_type("refused")) is None
    assert classify_failure(_task_error(error_type("refused"))) is None


@pytest.mark.parametrize("error_type", [ConfigError, DataError, PlanError, NDPError, RecoveryError])
def test_a_user_error_is_not_recovered(error_type):
    assert classify_failure(error_type("fix the input")) is None


def test_a_component_failure_keeps_its_component_across_pickling():
    """Errors cross actors pickled (a worker's CollectiveError reaches the coordinator)."""
    error = pickle.loads(pickle.dumps(CollectiveError("all-reduce failed", component="gpu-worker")))
    assert type(error) is CollectiveError and error.component == "gpu-worker"
    assert str(error) == "all-reduce failed"


# ----------------------------------------------------------------- Ray's errors


@pytest.mark.parametrize(
    "error",
    [
        ray_errors.RayActorError(),
        ray_errors.ActorDiedError(),
        ray_errors.ActorUnavailableError("connection refused", None),
        ray_errors.GetTimeoutError("get timed out"),
        ray_errors.WorkerCrashedError(),
        ray_errors.NodeDiedError("node 10.0.0.2 died"),
        ray_errors.ObjectLostError("ab" * 20, None, ""),
        ray_errors.OwnerDiedError("ab" * 20, None, ""),
        ConnectionResetError("peer reset"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_dead_or_silent_ray_process_is_recovered_as_an_unnamed_actor(error):
    """ray.get outside the coordinator's `_get` does not know whose task it was."""
    assert classify_failure(error) == ComponentFailure("actor", error)
    assert classify_failure(error).describe() == "an actor"


def test_an_actor_task_error_is_decided_by_its_cause_and_keeps_the_raised_error():
    raised = _task_error(StorageNodeUnavailableError("storage node at x: UNAVAILABLE"))
    assert classify_failure(raised) == ComponentFailure("storage-node", raised)


def test_an_actor_task_error_as_instance_of_its_cause_is_decided_by_the_cause():
    """Ray raises a class derived from both RayTaskError and the cause's class."""
    dead_peer = _task_error(CollectiveError("all-reduce failed", component="gpu-worker"))
    bug = _task_error(ValueError("a bug in a step"))
    assert _component(dead_peer.as_instanceof_cause()) == "gpu-worker"
    assert classify_failure(bug.as_instanceof_cause()) is None


def test_an_actor_task_error_from_a_nested_dead_actor_is_recovered():
    assert _component(_task_error(ray_errors.ActorDiedError())) == "actor"


def test_an_actor_task_error_without_a_cause_is_not_recovered():
    assert classify_failure(_task_error(None)) is None


# ----------------------------------------------------------------- torch.distributed


@pytest.mark.parametrize(
    "error_type", [dist.DistBackendError, dist.DistNetworkError, dist.DistStoreError]
)
def test_a_torch_distributed_error_is_a_gpu_worker_failure(error_type):
    assert _component(error_type("NCCL communicator was aborted")) == "gpu-worker"
    assert _component(_task_error(error_type("store timed out"))) == "gpu-worker"


def test_a_bare_runtime_error_that_mentions_gloo_is_not_recovered():
    """The text decides nothing: the worker names a failed all-reduce (next test)."""
    assert classify_failure(RuntimeError(GLOO_PEER_GONE)) is None
    assert classify_failure(_task_error(RuntimeError(GLOO_PEER_GONE))) is None


def test_the_worker_names_a_failed_all_reduce_a_collective_error(monkeypatch):
    from gpu_worker.worker import DenseWorker
    from ndp.planner import plan_shards

    cfg = tiny_config(train={"device": "cpu"})
    worker = DenseWorker(rank=1, world_size=2, cfg=cfg, plan=plan_shards(cfg), clients=[])
    for param in worker.dense.dense_half.parameters():
        param.grad = torch.ones_like(param)

    def peer_gone(*args, **kwargs):
        raise RuntimeError(GLOO_PEER_GONE)

    monkeypatch.setattr(dist, "all_reduce", peer_gone)
    with pytest.raises(CollectiveError, match="gpu-worker-1: the dense all-reduce") as raised:
        worker._sum_dense_gradients()
    assert _component(raised.value) == "gpu-worker"
    assert _component(_task_error(raised.value)) == "gpu-worker"


# ----------------------------------------------------------------- bugs


@pytest.mark.parametrize(
    "error",
    [ValueError("x"), KeyError("x"), AssertionError("x"), RuntimeError("x"), TimeoutError("x")],
    ids=lambda error: type(error).__name__,
)
def test_a_bug_is_not_recovered(error):
    assert classify_failure(error) is None


# ----------------------------------------------------------------- ResilientEngine uses the policy


class _FailsOnce:
    """A StepEngine whose first train_step raises `error`; counts restarts."""

    def __init__(self, error: BaseException) -> None:
        self.error, self.restarts = error, 0

    def train_step(self, step, batch):
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return 0.5

    def restart(self):
        self.restarts += 1


def _resilient(engine, tmp_path, **checkpoint):
    cfg = tiny_config(checkpoint=checkpoint)
    data = SimpleNamespace(num_samples=64)  # step 0 fails: nothing to replay
    return ResilientEngine(engine, cfg, checkpoint_root=tmp_path, train_data=data, total_steps=1)


def test_resilient_engine_restarts_for_a_component_failure(tmp_path):
    engine = _FailsOnce(_task_error(StorageNodeUnavailableError("storage node at x: gone")))
    assert _resilient(engine, tmp_path).train_step(0, batch=None) == 0.5
    assert engine.restarts == 1


def test_resilient_engine_raises_a_user_error_without_restarting(tmp_path):
    engine = _FailsOnce(node_errors.IndexOutOfRangeError("t0: row 99 outside [0, 50)"))
    with pytest.raises(node_errors.IndexOutOfRangeError):
        _resilient(engine, tmp_path).train_step(0, batch=None)
    assert engine.restarts == 0


def test_out_of_restarts_the_error_names_the_component_the_policy_found(tmp_path):
    engine = _FailsOnce(ComponentDiedError("gpu-worker-1 died", component="gpu-worker"))
    with pytest.raises(RecoveryError, match=r"^a GPU worker failed at step 0 \(ComponentDiedError"):
        _resilient(engine, tmp_path, max_restarts=0).train_step(0, batch=None)


def test_resilient_engine_takes_an_injected_policy(tmp_path):
    engine = _FailsOnce(ValueError("recoverable in this test"))
    resilient = ResilientEngine(
        engine,
        tiny_config(),
        checkpoint_root=tmp_path,
        train_data=SimpleNamespace(num_samples=64),
        total_steps=1,
        failure_policy=lambda exc: ComponentFailure("actor", exc),
    )
    assert resilient.train_step(0, batch=None) == 0.5
    assert engine.restarts == 1
