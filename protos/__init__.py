"""The wire contract (`storage_node.proto`) and its generated Python, checked in.

Regenerate with `make proto` (`python -m protos.generate`); a test fails when the checked-in
files differ from what the pinned grpcio-tools generates.
"""
