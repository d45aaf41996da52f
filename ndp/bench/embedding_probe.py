"""The all_gpu run's embedding work, timed on its own: FBGEMM forward + backward/update per step.

Why a loop of its own: the storage-node engine's target compares the nodes' CPU per step with
this figure, a few milliseconds per step. Read from the all_gpu run's phase clock it is a
wall-clock median of one short window, and on the shared 2-core machine it moved 35%
between two runs (2.4 vs 3.4 ms at fits_in_dram) while every other ratio moved under 10%. Here
the same embedding module (the all_gpu engine's, after its timed window) trains the same
timed batches several times over, and each step's process CPU time is taken: CPU, like the
nodes' figure, and the median of many steps, not a sum over one window.

Why on one intra-op thread: FBGEMM's CPU table-batched kernel does this step's work on one
thread (standalone, 13 tables x 1024 bags: 1.70 ms on one thread, 1.71-1.74 ms of wall on two,
whose second thread only spins: 28 ms of CPU for a 15 ms multihot step), and with a spinning
partner the median followed whatever else ran on the shared cores: 2.0 and 2.4 ms at
fits_in_dram, 21.1 and 15.1 ms at multihot, in two bench runs 18 minutes apart. One thread
times the kernel's work, which is what the nodes' CPU is compared with.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ndp.model.embedding import ReferenceEmbeddings

PASSES = 3
"""Times the timed batches are trained again (the first pass is a warm-up, not counted)."""


def embedding_step_cpu_s(
    embeddings: ReferenceEmbeddings, batches: list[Any], *, passes: int = PASSES
) -> dict[str, float]:
    """Median process CPU and wall seconds of one FBGEMM forward + backward/update step over
    `passes` passes of `batches` after one warm-up pass (upstream gradients random, seeded,
    the same in every pass), on one intra-op thread (restored after).

    The update changes `embeddings`' tables: call it on a model whose run is over.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timed_steps(embeddings, batches, passes)
    finally:
        torch.set_num_threads(threads)


def _timed_steps(embeddings: ReferenceEmbeddings, batches: list[Any], passes: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    grads: list[list[torch.Tensor]] = []
    for batch in batches:  # the warm-up pass, which also draws each batch's gradients
        outputs = embeddings.pooled_by_group(batch.sparse)
        grads.append([torch.randn(o.shape, generator=generator) for o in outputs])
        torch.autograd.backward(outputs, grads[-1])
    cpu, wall = [], []
    for _ in range(passes):
        for batch, batch_grads in zip(batches, grads, strict=True):
            started_cpu, started_wall = time.process_time(), time.perf_counter()
            torch.autograd.backward(embeddings.pooled_by_group(batch.sparse), batch_grads)
            cpu.append(time.process_time() - started_cpu)
            wall.append(time.perf_counter() - started_wall)
    return {
        "cpu_s_median": statistics.median(cpu),
        "wall_s_median": statistics.median(wall),
        "steps": len(cpu),
    }
