"""Benchmarks behind `ndp-bench`: storage (lookups over gRPC, cache policies vs Belady).

`report.write_results` writes any benchmark's results dict as results.json/.md/.png.
"""
