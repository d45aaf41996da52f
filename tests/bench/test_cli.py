"""`ndp-bench storage`: writes its three files (`ndp-bench train`: tests/bench/test_bench_train.py)."""

from __future__ import annotations

import json

import pytest

from ndp.bench.lookups import SEED, LookupShape, make_batches, pool_in_process, table_weights
from ndp.bench.storage import LOOKUP_TARGETS
from ndp.cli import EXIT_USER_ERROR
from ndp.cli.bench import main
from storage_node import codec


def lookup_wire_bytes(point: dict) -> tuple[int, int]:
    """Serialised LookupRequest and LookupResponse sizes of a point, built with the codec
    (independently of what the bench counted)."""
    shape = LookupShape(
        num_features=point["num_features"],
        num_rows=point["num_rows"],
        embedding_dim=point["embedding_dim"],
        batch_size=point["batch_size"],
    )
    batch = make_batches(shape, point["pooling_factor"], 1, seed=SEED)[0]
    dtype = codec.wire_dtype(point["wire_dtype"])
    request = codec.lookup_request(0, 0, batch, train=False, dtype=dtype)
    pooled = pool_in_process(table_weights(shape), batch)
    reply = codec.lookup_response_bytes(pooled, dtype)
    return request.ByteSize(), len(reply)


def check_transport_floor(point: dict) -> None:
    """The floor carries the point's exact Lookup bytes and both bounds follow from it."""
    floor = point["transport_floor"]
    assert (floor["request_bytes"], floor["reply_bytes"]) == lookup_wire_bytes(point)
    assert floor["calls"] == point["grpc"]["calls"]
    assert 0 < floor["min_call_s"] <= floor["median_call_s"]
    local = point["in_process"]["median_call_s"]
    node = point["grpc"]["node_lookup_s_per_call"]
    assert point["ratio_bound_transport_only"] == pytest.approx(
        local / floor["median_call_s"], rel=1e-9
    )
    assert point["ratio_bound_transport_and_node"] == pytest.approx(
        local / (floor["median_call_s"] + node), rel=1e-9
    )


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
        check_transport_floor(point)
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
    for column in ("floor ms/call", "bound: transport only", "bound: transport + node"):
        assert column in markdown
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "target >= 0.3x" in printed and "x Belady" in printed
    for check in results["checks"]:
        if check["what"].startswith("lookups") and not check["met"]:
            assert "the node's lookup takes" in check["text"]  # what limits a missed target
            assert "bare gRPC round trip of the same" in check["text"]
