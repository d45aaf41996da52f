"""The storage-node engine target's denominator: all_gpu's FBGEMM step, timed in a loop of
its own (`ndp.bench.embedding_probe`), and the target line that divides by it."""

from __future__ import annotations

import torch
from model.tiny import tiny_config

from ndp.bench.embedding_probe import embedding_step_cpu_s
from ndp.bench.train import embedding_step_s, engine_target_lines
from ndp.data.loader import build_datasets
from ndp.reference import ReferenceEngine


def test_the_probe_trains_the_all_gpu_module_on_the_timed_batches_and_times_each_step():
    cfg = tiny_config(data={"synthetic": {"num_samples": 64, "num_val_samples": 8, "seed": 1}})
    batches = list(build_datasets(cfg)[0].batches(16))
    engine = ReferenceEngine(cfg)
    before = engine.embeddings.table_weights("t0").clone()
    threads = torch.get_num_threads()
    probe = embedding_step_cpu_s(engine.embeddings, batches, passes=2)
    assert torch.get_num_threads() == threads  # timed on one thread, the setting restored
    assert probe["steps"] == 2 * len(batches)  # the warm-up pass is not counted
    assert probe["wall_s_median"] > 0 and probe["cpu_s_median"] >= 0
    # forward, backward and the fused update ran: the table moved
    assert not torch.equal(engine.embeddings.table_weights("t0"), before)


def test_the_node_cpu_target_divides_by_the_probe_where_it_ran():
    nodes = {"per_process_s": {"storage-node-0": 0.006, "storage-node-1": 0.006}}
    run = {"samples_per_s": 1.0, "cpu_per_step": nodes, "machine_cpu_us_per_sample": 10.0}
    phases = {"embedding_forward_s": 0.001, "embedding_backward_update_s": 0.002}
    all_gpu = {"samples_per_s": 2.0, "machine_cpu_us_per_sample": 10.0, "per_step_median": phases}
    systems = {"ndp": {"fits_in_dram": run}, "all_gpu": {"fits_in_dram": all_gpu}}
    systems["ndp_lookahead"] = {}
    assert embedding_step_s(all_gpu) == (0.003, "median step of the run")
    assert "= 4.0x (target <= 4x) met" in engine_target_lines(systems)[0]
    all_gpu["embedding_probe"] = {"wall_s_median": 0.002, "cpu_s_median": 0.004, "steps": 126}
    line = engine_target_lines(systems)[0]
    assert "(median of 126 probe steps) 2.0 ms = 6.0x (target <= 4x) MISSED (1.5x over)" in line
