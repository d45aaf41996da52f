"""`ndp-bench storage`: writes its three files (`ndp-bench train`: tests/bench/test_bench_train.py)."""

from __future__ import annotations

import json

from ndp.bench.storage import LOOKUP_TARGETS
from ndp.cli import EXIT_USER_ERROR
from ndp.cli.bench import main


def test_scale_out_of_range_is_a_user_error(tmp_path, capsys):
    assert main(["storage", "--scale", "2", "--output-dir", str(tmp_path)]) == EXIT_USER_ERROR
    assert "--scale" in capsys.readouterr().err


def test_tiny_storage_run_writes_json_markdown_and_png_with_raw_figures(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["storage", "--quick", "--scale", "0.005", "--output-dir", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "results.png"}
    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("ndp-bench storage --quick")
    assert {"cpu_count", "platform", "torch"} <= set(results["machine"])
    lookups = results["lookups"]
    assert {p["pooling_factor"] for p in lookups} == set(LOOKUP_TARGETS)
    assert {(p["transport"], p["wire_dtype"]) for p in lookups} == {
        ("unix", "fp32"), ("unix", "fp16"), ("tcp", "fp32"), ("tcp", "fp16"),
    }  # fmt: skip
    for point in lookups:
        for side in ("grpc", "in_process"):
            assert point[side]["lookups"] > 0 and point[side]["elapsed_s"] > 0
        assert (
            point["ratio"] == point["grpc"]["lookups_per_s"] / point["in_process"]["lookups_per_s"]
        )
        tolerance = 0.0 if point["wire_dtype"] == "fp32" else 1e-2
        assert point["max_abs_error"] <= tolerance  # the node pools the same rows
        # the node's own share of a call, timed inside the node: part of the call, not all
        node = point["grpc"]["node_lookup_s_per_call"]
        assert 0 < node < point["grpc"]["elapsed_s"] / point["grpc"]["calls"]
    fractions = {p["cache_fraction"] for p in results["hit_rates"]}
    assert fractions == {0.01, 0.05, 0.2}
    for point in results["hit_rates"]:
        for name in ("belady", "lru", "lfu", "hot+lfu"):
            assert 0 <= point[name]["hits"] <= point[name]["accesses"] == point["unique_accesses"]
            assert point[name]["hits"] <= point["belady"]["hits"]
    assert any(p["trace"].startswith("criteo:") for p in results["hit_rates"])
    assert any(p["trace"].startswith("zipf:") for p in results["hit_rates"])
    markdown = (out / "results.md").read_text()
    assert "Pooled lookups/s" in markdown and "Belady" in markdown
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "target >= 0.3x" in printed and "x Belady" in printed
    for check in results["checks"]:
        if check["what"].startswith("lookups") and not check["met"]:
            assert "the node's lookup takes" in check["text"]  # what limits a missed target
