"""The all_gpu run's embedding work, timed on its own: FBGEMM forward + backward/update per step.

Why a loop of its own: the storage-node engine's target compares the nodes' CPU per step with
this figure, a few milliseconds per step. Read from the all_gpu run's phase clock it is a
wall-clock median of one short window, and on the shared 2-core machine it moved 35%
between two runs (2.4 vs 3.4 ms at fits_in_dram) while every other ratio moved under 10%. Here
the same embedding module (the all_gpu engine's, after its timed window) trains the same
timed batches several times over, and each step's process CPU time is taken: CPU, like the
nodes' figure, and the median of many steps, not a sum over one window.
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
    the same in every pass).

    The update changes `embeddings`' tables: call it on a model whose run is over.
    """
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
