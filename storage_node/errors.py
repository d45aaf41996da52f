"""Errors a storage node raises for requests a person (or the coordinator) can fix.

All derive from `ndp.errors.StorageNodeError`, take only a message (they pickle across Ray
actors and map one-to-one onto gRPC status codes in the wire layer):

- `IndexOutOfRangeError`, `UnknownFeatureError`, `BadTensorError`, `BadRequestError`
  -> INVALID_ARGUMENT
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


class BadRequestError(StorageNodeError):
    """A request that is no message of its RPC (bytes that do not parse) or lacks a field
    it cannot do without; names the message type and what to send."""


__all__ = [
    "BadRequestError",
    "BadTensorError",
    "EarlyPoolMissingError",
    "IndexOutOfRangeError",
    "ShardFileError",
    "StepOrderError",
    "StorageNodeError",
    "UnknownFeatureError",
]


class FlashDirError(ShardFileError):
    """`storage.flash_dir` cannot hold the node's shard files: too little free space, a
    read-only or unwritable directory, or another OSError while they are created. One line
    naming the directory or file and the errno, so that it reaches the user (exit 2) as what
    to change, not as a traceback; FAILED_PRECONDITION over the wire, like `ShardFileError`."""


__all__ += ["FlashDirError"]
