"""The dense half of ndp: the GPU worker and its Ray actor (storage nodes are reached with
`storage_node.client`)."""
