"""Errors a storage node raises for requests a person (or the coordinator) can fix.

All derive from `ndp.errors.StorageNodeError`, take only a message (they pickle across Ray
actors and map one-to-one onto gRPC status codes in the wire layer):

- `IndexOutOfRangeError`, `UnknownFeatureError`, `BadTensorError` -> INVALID_ARGUMENT
- `StepOrderError` (and `EarlyPoolMissingError`) -> FAILED_PRECONDITION
- `ShardFileError` -> FAILED_PRECONDITION (a shard file or checkpoint does not fit this node)
"""

from __future__ import annotations

from ndp.errors import StorageNodeError


class IndexOutOfRangeError(StorageNodeError):
    """A row index outside the piece; names table, feature, value and the valid range."""


class UnknownFeatureError(StorageNodeError):
    """A feature (or table) that this node does not serve."""


class BadTensorError(StorageNodeError):
    """A tensor with the wrong dtype, shape or content (offsets, gradients, weights)."""


class StepOrderError(StorageNodeError):
    """A lookup or push that does not fit the node's step order."""


class EarlyPoolMissingError(StepOrderError):
    """A bag-less lookup of a step whose early pool the node does not keep."""


class ShardFileError(StorageNodeError):
    """A shard file or checkpoint whose header/manifest does not match the node's shards."""


__all__ = [
    "BadTensorError",
    "EarlyPoolMissingError",
    "IndexOutOfRangeError",
    "ShardFileError",
    "StepOrderError",
    "StorageNodeError",
    "UnknownFeatureError",
]
