"""The dense half of ndp: the GPU worker, its gRPC client to storage nodes, its Ray actor."""
