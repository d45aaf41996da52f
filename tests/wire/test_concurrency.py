"""Several GPU workers talk to one node at once; the step barrier sums their gradients."""

from __future__ import annotations

import threading

import torch

from wire.tiny_node import random_bags, random_grads

NUM_WORKERS = 4
NUM_STEPS = 3


def test_four_concurrent_workers_pushing_the_same_steps_are_summed(cfg, serve_node, make_core):
    node = serve_node(cfg, num_workers=NUM_WORKERS)
    pooled: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    failures: list[BaseException] = []
    start = threading.Barrier(NUM_WORKERS)

    def worker(rank: int) -> None:
        try:
            with node.client() as client:
                start.wait()
                for step in range(NUM_STEPS):
                    seed = 100 * step + rank
                    # blocks until every worker's push of step - 1 is applied
                    pooled[step, rank] = client.lookup(step, rank, random_bags(4, seed))
                    client.push_gradients(step, rank, random_grads(4, seed))
        except BaseException as error:  # surfaced below
            failures.append(error)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(NUM_WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    assert node.core.applied_step == NUM_STEPS - 1

    # The same workers, one after another, on a core called directly.
    direct = make_core(cfg, num_workers=NUM_WORKERS)
    for step in range(NUM_STEPS):
        for rank in range(NUM_WORKERS):
            expected = direct.lookup(step, rank, random_bags(4, 100 * step + rank))
            for feature, values in expected.items():
                torch.testing.assert_close(pooled[step, rank][feature], values)
        for rank in range(NUM_WORKERS):
            applied = direct.push_gradients(step, rank, random_grads(4, 100 * step + rank))
            assert applied is (rank == NUM_WORKERS - 1)
    for table, rows in (("t0", 40), ("t1", 25)):
        served = node.core.read_rows(table, torch.arange(rows))
        reference = direct.read_rows(table, torch.arange(rows))
        torch.testing.assert_close(served[0], reference[0])
        torch.testing.assert_close(served[1], reference[1])
