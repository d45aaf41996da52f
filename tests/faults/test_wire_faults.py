"""Bad things a client can do over the wire, and what the node must still guarantee.

Each test runs a real `StorageNodeCore` behind a real gRPC server on 127.0.0.1 (the fixtures
of `tests/wire/conftest.py`), and checks both the answer the client gets and that the node's
rows and `applied_step` are what a well-behaved run would leave.
"""

from __future__ import annotations

import logging
import secrets

import grpc
import pytest
import torch
from wire.conftest import cfg, make_core, serve_node  # noqa: F401  (fixtures)
from wire.tiny_node import random_bags, random_grads

from storage_node.auth import UnauthenticatedError
from storage_node.client import StorageClient
from storage_node.server import serve


def rows(core) -> tuple[int, torch.Tensor, torch.Tensor]:
    """applied_step and every row of both tables (weights, optimizer state)."""
    w0, s0 = core.read_rows("t0", torch.arange(40))
    w1, s1 = core.read_rows("t1", torch.arange(25))
    return core.applied_step, torch.cat([w0, w1]), torch.cat([s0, s1])


def assert_same_rows(a, b) -> None:
    assert a[0] == b[0]
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=0)


def run_steps(core_or_client, steps: range) -> list[dict[str, torch.Tensor]]:
    """Lookup then push for each step (worker 0, batch 4); the pooled vectors of each step."""
    pooled = []
    for step in steps:
        pooled.append(core_or_client.lookup(step, 0, random_bags(4, seed=step)))
        core_or_client.push_gradients(step, 0, random_grads(4, seed=step))
    return pooled


def test_duplicate_push_of_an_applied_step_is_acknowledged_and_changes_nothing(cfg, serve_node):  # noqa: F811
    node = serve_node(cfg)
    with node.client() as client:
        client.lookup(0, 0, random_bags(4, seed=0))
        assert client.push_gradients(0, 0, random_grads(4, seed=0)) is True
        after_first = rows(node.core)
        # a retry of the same push (e.g. the reply was lost) is acknowledged without effect
        assert client.push_gradients(0, 0, random_grads(4, seed=0)) is True
        assert client.push_gradients(0, 0, random_grads(4, seed=99)) is True
        assert_same_rows(rows(node.core), after_first)
        assert node.core.applied_step == 0
        run_steps(client, range(1, 2))  # the run goes on normally
    assert node.core.applied_step == 1


def test_duplicate_push_before_the_other_workers_arrive_is_counted_once(
    cfg,  # noqa: F811
    serve_node,  # noqa: F811
    make_core,  # noqa: F811
):
    node = serve_node(cfg, num_workers=2)
    reference = make_core(cfg, num_workers=2)
    for worker in (0, 1):
        reference.lookup(0, worker, random_bags(4, seed=worker))
    for worker in (0, 1):
        reference.push_gradients(0, worker, random_grads(4, seed=worker))
    with node.client() as client:
        for worker in (0, 1):
            client.lookup(0, worker, random_bags(4, seed=worker))
        assert client.push_gradients(0, 0, random_grads(4, seed=0)) is False
        assert client.push_gradients(0, 0, random_grads(4, seed=0)) is False  # duplicate
        assert client.push_gradients(0, 0, random_grads(4, seed=5)) is False  # ignored too
        assert client.push_gradients(0, 1, random_grads(4, seed=1)) is True
    assert_same_rows(rows(node.core), rows(reference))


def test_client_gone_while_waiting_on_the_step_barrier_leaves_the_node_healthy_and_exact(
    cfg,  # noqa: F811
    serve_node,  # noqa: F811
    make_core,  # noqa: F811
):
    node = serve_node(cfg)
    # a lookup of step 1 waits at the barrier (step 0 not applied); its client then vanishes
    vanishing = node.client()
    waiting = vanishing.lookup_async(1, 0, random_bags(4, seed=1))
    assert not waiting.done()
    vanishing.close()  # channel closed mid-request: the call is cancelled
    with pytest.raises(Exception):  # noqa: B017, PT011  (cancelled call: grpc or node error)
        waiting.result(timeout=30)
    # another client runs the steps; the node answers and ends where an undisturbed core ends
    with node.client() as client:
        pooled = run_steps(client, range(3))
    assert node.core.applied_step == 2
    reference = make_core(cfg)
    expected = run_steps(reference, range(3))
    for got, want in zip(pooled, expected, strict=True):
        for feature in want:
            torch.testing.assert_close(got[feature], want[feature], rtol=0, atol=0)
    assert_same_rows(rows(node.core), rows(reference))


def test_cancelled_lookup_leaves_the_node_healthy(cfg, serve_node):  # noqa: F811
    node = serve_node(cfg)
    with node.client() as client:
        waiting = client.lookup_async(1, 0, random_bags(4, seed=1))
        waiting._call.cancel()  # the caller gives up (e.g. a worker interrupted)
        with pytest.raises(grpc.FutureCancelledError):
            waiting._call.result()
        run_steps(client, range(2))
    assert node.core.applied_step == 1


def test_token_of_another_job_is_refused_and_changes_nothing(cfg, make_core):  # noqa: F811
    token_a, token_b = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    core_b = make_core(cfg)
    server_b = serve(
        core_b, host="127.0.0.1", token=token_b, max_message_bytes=cfg.storage.max_message_bytes
    )
    try:
        before = rows(core_b)
        with StorageClient(server_b.address, token=token_a, timeout_s=30) as job_a:
            with pytest.raises(UnauthenticatedError, match="ndp-token"):
                job_a.push_gradients(0, 0, random_grads(4, seed=0))
            with pytest.raises(UnauthenticatedError) as refused:
                job_a.lookup(0, 0, random_bags(4, seed=0))
            assert token_a not in str(refused.value) and token_b not in str(refused.value)
        assert_same_rows(rows(core_b), before)
        with StorageClient(server_b.address, token=token_b, timeout_s=30) as job_b:
            run_steps(job_b, range(1))  # the node's own job is served
    finally:
        server_b.stop(grace_s=None)


def test_token_appears_in_no_log_record_or_output_at_debug(cfg, make_core, caplog, capfd):  # noqa: F811
    token = secrets.token_urlsafe(32)
    caplog.set_level(logging.DEBUG)  # every logger, grpc and ndp included
    core = make_core(cfg)
    server = serve(
        core, host="127.0.0.1", token=token, max_message_bytes=cfg.storage.max_message_bytes
    )
    try:
        with StorageClient(server.address, token=token, timeout_s=30) as client:
            run_steps(client, range(2))
            client.lookup(2, 0, random_bags(4, seed=2), train=False)
        with StorageClient(server.address, token=token[::-1], timeout_s=30) as stranger:
            with pytest.raises(UnauthenticatedError):
                stranger.lookup(2, 0, random_bags(4, seed=2), train=False)
    finally:
        server.stop(grace_s=None)
    out, err = capfd.readouterr()
    logged = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert core.applied_step == 1
    for text, where in ((logged, "log records"), (out, "stdout"), (err, "stderr")):
        assert token not in text, f"the token leaked into {where}"
        assert token[::-1] not in text, f"the wrong token leaked into {where}"
