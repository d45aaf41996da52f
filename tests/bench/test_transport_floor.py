"""The storage bench's transport floor: the echo server and how a missed target names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ndp.bench.lookups import EchoProcess, ratio_bounds
from ndp.bench.storage import lookup_limits_text


def test_echo_server_answers_the_reply_size_asked_on_both_transports():
    with EchoProcess() as echo:
        assert echo.addresses["tcp"].startswith("127.0.0.1:")
        for transport in ("unix", "tcp"):
            for request_bytes, reply_bytes in ((10, 4_321), (5_000, 1), (0, 123_456)):
                call = echo.caller(transport, request_bytes=request_bytes, reply_bytes=reply_bytes)
                assert len(call()) == reply_bytes
                assert len(call()) == reply_bytes  # the same prebuilt reply, again


def test_echo_server_close_removes_its_socket():
    echo = EchoProcess()
    socket_path = Path(echo.addresses["unix"].removeprefix("unix:"))
    assert socket_path.exists()
    echo.close()
    assert not socket_path.exists()


def test_ratio_bounds_divide_in_process_time_by_floor_and_floor_plus_node():
    bounds = ratio_bounds(in_process_s=1.0, floor_s=4.0, node_s=1.0)
    assert bounds == {
        "ratio_bound_transport_only": pytest.approx(0.25),
        "ratio_bound_transport_and_node": pytest.approx(0.2),
    }


def _point(**extra: object) -> dict:
    return {
        "grpc": {"median_call_s": 0.010, "node_lookup_s_per_call": 0.002},
        "in_process": {"median_call_s": 0.0002},
        **extra,
    }


def test_missed_target_text_names_the_floor_its_bytes_and_both_bounds():
    point = _point(
        transport_floor={
            "median_call_s": 0.0024,
            "min_call_s": 0.002,
            "calls": 15,
            "request_bytes": 200_000,
            "reply_bytes": 4_000_000,
        },
        **ratio_bounds(in_process_s=0.0002, floor_s=0.0024, node_s=0.002),
    )
    text = lookup_limits_text(point)
    assert "the node's lookup takes 2.00 ms" in text
    assert "bare gRPC round trip of the same 4.2 MB (200.0 kB request, 4.0 MB reply)" in text
    assert "2.40 ms, so even a node with no work reaches at most 0.083x" in text
    assert "this node's lookup time at most 0.045x" in text  # 0.2 / (2.4 + 2.0)


def test_missed_target_text_without_a_floor_keeps_the_node_split_only():
    text = lookup_limits_text(_point())
    assert "the node's lookup takes 2.00 ms" in text
    assert "bare gRPC" not in text
