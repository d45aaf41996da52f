"""Wire processes keep large message buffers in the heap (glibc's mallopt thresholds)."""

from __future__ import annotations

import platform

import pytest

from storage_node.process_env import keep_wire_buffers_in_heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_thresholds_are_applied_where_malloc_is_glibc():
    assert keep_wire_buffers_in_heap() is True
