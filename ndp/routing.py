"""Routing of a batch's sparse features to the storage nodes that own the rows, and back.

Pure tensor code (no Ray, no gRPC), driven by a `ShardingPlan`. For one feature of a table
cut into pieces [0, a) -> node 0, [a, N) -> node 1, a batch of B bags becomes one request per
piece, each with all B bags (a bag with no rows in the piece is empty there) and indices
re-based to the piece:

    global bags   bag0 = [3, a+1]   bag1 = [a+5]     bag2 = []
    node 0        bag0 = [3]        bag1 = []        bag2 = []      (local = global)
    node 1        bag0 = [1]        bag1 = [5]       bag2 = []      (local = global - a)

Every piece of every feature in the batch gets a request, even an all-empty one, so a node
always sees the same request shape (B bags per feature it serves) and its pooled answer
[B, D] adds up with the other pieces' answers. Summing the pieces' partial pools gives the
pooled vector of the whole bag; for mean pooling over several pieces each piece divides its
partial sum by the whole bag's length (`Bags.mean_divisor`), which makes the sum the mean.
In the backward pass every piece gets the feature's full pooled gradient [B, D]: the rows a
piece holds are the only ones it scatters it to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ndp.config import TableConfig
from ndp.errors import DataError, PlanError
from ndp.plan import Bags, Placement, ShardingPlan
from ndp.rows import distinct_below


def route_lookup(
    sparse: KeyedJaggedTensor, plan: ShardingPlan, tables: Sequence[TableConfig]
) -> dict[int, dict[str, Bags]]:
    """Split every feature's bags by the pieces of its table.

    Args:
        sparse: the batch's sparse features (keys = feature names; B bags each; optional
            per-sample weights); values are global row indices of the feature's table.
        plan: where the rows live.
        tables: the model's effective tables (pooling mode, row count).

    Returns:
        {node: {feature: Bags}} with Bags.indices local to the piece on that node and
        Bags.offsets [B + 1]; `mean_divisor` [B] is set only for mean-pooled tables with more
        than one piece.

    Raises:
        DataError: an index outside [0, num_rows) of its table (names feature, table, value).
        PlanError: a feature the plan does not know.
    """
    by_name = {t.name: t for t in tables}
    batch_size = sparse.stride()
    requests: dict[int, dict[str, Bags]] = {}
    for feature, values, lengths, weights in _features(sparse):
        table = _table_for(feature, plan, by_name)
        _check_range(feature, table, values)
        pieces = plan.pieces_of(table.name)
        mean_divisor = None
        if table.pooling == "mean" and len(pieces) > 1:
            mean_divisor = lengths.clamp(min=1).to(torch.float32)
        if len(pieces) == 1:  # the whole table: the bags go through unchanged
            bags = Bags(
                indices=values,
                offsets=_offsets(lengths),
                per_sample_weights=weights,
                mean_divisor=None,
            )
            requests.setdefault(pieces[0].node, {})[feature] = bags
            continue
        # group the values by piece with one stable sort (keeps each bag's order), then
        # count each piece's share of each bag: lengths [pieces, B]
        piece_of_value = _piece_of(values, pieces)
        narrow = piece_of_value.to(torch.int16) if len(pieces) < 2**15 else piece_of_value
        order = torch.sort(narrow, stable=True).indices  # small keys sort ~3x faster
        bag_of_value = torch.repeat_interleave(torch.arange(batch_size), lengths)
        local_lengths = torch.bincount(
            piece_of_value * batch_size + bag_of_value, minlength=len(pieces) * batch_size
        ).reshape(len(pieces), batch_size)
        bounds = _offsets(local_lengths.sum(dim=1)).tolist()
        for i, piece in enumerate(pieces):
            take = order[bounds[i] : bounds[i + 1]]
            requests.setdefault(piece.node, {})[feature] = Bags(
                indices=values[take] - piece.row_start,
                offsets=_offsets(local_lengths[i]),
                per_sample_weights=None if weights is None else weights[take],
                mean_divisor=mean_divisor,
            )
    return requests


def reassemble(
    partials: Mapping[int, Mapping[str, torch.Tensor]], plan: ShardingPlan
) -> dict[str, torch.Tensor]:
    """Add up the partial pooled vectors of each feature's pieces.

    Args:
        partials: {node: {feature: pooled [B, D]}} as answered by the storage nodes for the
            requests of `route_lookup` (column views of each node's one [B, sum of dims]
            reply: a feature held whole by one node is passed on as that view, no copy).
        plan: the plan the requests were routed with.

    Returns:
        {feature: pooled [B, D]} in model order, for every feature present in `partials`.

    Raises:
        ValueError: a piece's partial is missing (a node did not answer for a feature it
            was asked about), which is a bug in the caller, not user input.
    """
    present = {feature for answer in partials.values() for feature in answer}
    pooled: dict[str, torch.Tensor] = {}
    for feature in plan.feature_names:
        if feature not in present:
            continue
        parts = []
        for piece in plan.pieces_of(plan.table_of(feature)):
            answer = partials.get(piece.node, {})
            if feature not in answer:
                raise ValueError(
                    f"reassemble: no partial for feature {feature!r} from node {piece.node} "
                    f"(rows [{piece.row_start}, {piece.row_end}) of {piece.table_name!r})"
                )
            parts.append(answer[feature])
        pooled[feature] = parts[0] if len(parts) == 1 else torch.stack(parts).sum(dim=0)
    return pooled


def route_gradients(
    grads: Mapping[str, torch.Tensor], plan: ShardingPlan
) -> dict[int, dict[str, torch.Tensor]]:
    """Send each piece of a feature's table the feature's whole pooled gradient.

    Args:
        grads: {feature: d(loss)/d(pooled) [B, D]}.

    Returns:
        {node: {feature: [B, D]}} (the same tensor objects, not copies); each node scatters
        it to the rows of its piece that the feature's bags touched in the lookup.
    """
    routed: dict[int, dict[str, torch.Tensor]] = {}
    for feature, grad in grads.items():
        for piece in plan.pieces_of(plan.table_of(feature)):
            routed.setdefault(piece.node, {})[feature] = grad
    return routed


def distinct_rows(
    routed: Mapping[int, Mapping[str, Bags]], plan: ShardingPlan
) -> dict[int, dict[str, torch.Tensor]]:
    """The sorted distinct local rows of routed bags: what `Prefetch` stages on each node.

    Why from the routed bags and not from the batch: a batch read ahead is routed once (by
    the GPU worker that trains it), and the same bags then serve its prefetch, its early
    lookup and its lookup; routing the batch again only to find its rows would repeat that.

    Args:
        routed: {node: {feature: Bags}} from `route_lookup` (indices local to the piece on
            that node, so already checked against the table's range).

    Returns:
        {node: {feature: int64 [n_unique]}}, one entry per (node, feature) of `routed`.
    """
    out: dict[int, dict[str, torch.Tensor]] = {}
    for node, bags_by_feature in routed.items():
        for feature, bags in bags_by_feature.items():
            (piece,) = [p for p in plan.pieces_of(plan.table_of(feature)) if p.node == node]
            # sorted; a mask over the piece's rows, not torch.unique's sort: a multi-hot batch
            # of 26 x 20k values took 15.6 ms to route, serially before every step
            rows = distinct_below(bags.indices.numpy(), piece.num_rows)
            out.setdefault(node, {})[feature] = torch.from_numpy(rows)
    return out


# --------------------------------------------------------------------------- helpers


def _features(
    sparse: KeyedJaggedTensor,
) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(feature, values int64 [nnz], lengths int64 [B], weights f32 [nnz] | None) per key."""
    _check_one_batch_size(sparse)
    keys = sparse.keys()
    batch_size = sparse.stride()
    values = sparse.values().to(torch.int64)
    lengths = sparse.lengths().to(torch.int64)
    weights = sparse.weights_or_none()
    key_bounds = sparse.offset_per_key()
    out = []
    for k, feature in enumerate(keys):
        start, end = int(key_bounds[k]), int(key_bounds[k + 1])
        out.append(
            (
                feature,
                values[start:end],
                lengths[k * batch_size : (k + 1) * batch_size],
                None if weights is None else weights[start:end].to(torch.float32),
            )
        )
    return out


def check_indices(
    sparse: KeyedJaggedTensor, plan: ShardingPlan, tables: Sequence[TableConfig]
) -> None:
    """Refuse a batch with an index outside its table, every feature in one vectorised pass.

    Why before splitting: the coordinator hands each worker a share, and a worker refuses a
    bad index of its own share only; the others would train their shares and wait in the
    dense all-reduce for a peer that never comes. Checked whole, the batch is refused before
    any worker starts, and the engine can take the next step.

    Raises:
        DataError: as `route_lookup` (names feature, table, value and the fix).
        PlanError: a feature the plan does not know.
    """
    _check_one_batch_size(sparse)
    keys = sparse.keys()
    values = sparse.values()
    if not keys or values.numel() == 0:
        return
    by_name = {t.name: t for t in tables}
    limits = np.array([_table_for(f, plan, by_name).num_rows for f in keys], dtype=np.int64)
    per_key = np.array(sparse.length_per_key(), dtype=np.int64)
    flat = values.numpy()
    # numpy, not torch: torch's repeat_interleave runs an OpenMP region, and in the driver
    # (no OMP_WAIT_POLICY=PASSIVE there) its threads then spun ~9 CPU-ms per step
    bad = (flat < 0) | (flat >= np.repeat(limits, per_key))
    if not bad.any():
        return
    first = int(np.argmax(bad))
    key = int(np.searchsorted(np.cumsum(per_key), first, side="right"))
    start = int(per_key[:key].sum())
    feature = keys[key]
    table = _table_for(feature, plan, by_name)
    _check_range(feature, table, values[start : start + int(per_key[key])].to(torch.int64))


def _check_one_batch_size(sparse: KeyedJaggedTensor) -> None:
    if sparse.variable_stride_per_key():
        raise DataError("sparse features with a different batch size per feature are not supported")


def _table_for(feature: str, plan: ShardingPlan, by_name: Mapping[str, TableConfig]) -> TableConfig:
    name = plan.table_of(feature)
    if name not in by_name:
        raise PlanError(
            f"the sharding plan maps feature {feature!r} to table {name!r}, which the model "
            "does not have; re-plan for this config"
        )
    return by_name[name]


def _check_range(feature: str, table: TableConfig, values: torch.Tensor) -> None:
    if values.numel() == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= table.num_rows:
        raise _out_of_range(feature, table.name, low if low < 0 else high, table.num_rows)


def _out_of_range(feature: str, table_name: str, value: int, num_rows: int) -> DataError:
    return DataError(
        f"feature {feature!r}: index {value} outside [0, {num_rows}) of table {table_name!r}; "
        "hash or clamp indices into the table (data.index_policy) or check model.max_rows_per_table"
    )


def _piece_of(values: torch.Tensor, pieces: Sequence[Placement]) -> torch.Tensor:
    """Index of the piece (in row order) holding each value: int64 [nnz]."""
    starts = torch.tensor([p.row_start for p in pieces[1:]], dtype=torch.int64)
    return torch.bucketize(values, starts, right=True)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """int64 [B + 1] offsets of bags with these lengths."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, dim=0, out=offsets[1:])
    return offsets
