"""One request's bags of every feature of an arena, flat: what one pooling call reads.

The wire gives a node one KeyedJaggedTensor (`ndp.plan.KeyedJagged`: one lengths and one
values tensor for every feature); an in-process caller may give one `Bags` per feature.
Before any row is touched they become, per arena (`storage_node.arena`), the flat form below,
with each feature's local rows moved to arena rows. Flat bags whose features share one arena
are taken as they came (`KeyedBags.from_jagged`: no split, no join); per-feature bags are
joined (`KeyedBags.build`):

    features:  f0            f1                 f2
    values:    [r r r | r r r r r r | r r]          int64 [nnz], arena rows
    offsets:   [0 1 2 3 | 5 6 8 9 | 10 12]         int64 [sum B + 1], one bag after another
    bag_start: [0, B0, B0 + B1, ...]               where each feature's bags begin

so that pooling is one `embedding_bag` over the arena's slot tensor, a gradient push is one
gather over `[sum B, D]`, and an early pool's correction is one `index_add_`. Validation runs
on the flat tensors too (one range check for every feature, no host sync per feature); the
error still names the feature, table and value.

Besides shapes and row ranges, the floats a request brings are checked, because one bad value
makes every row it touches non-finite for good (the optimizer writes it back): per-sample
weights (`MAX_ABS_WEIGHT`), mean divisors (finite, >= 1 for a bag with values) and gradients
(`MAX_ABS_GRADIENT`); NaN fails every bound.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from ndp.plan import Bags, KeyedJagged, ShardSpec
from ndp.rows import stable_order
from storage_node.errors import BadTensorError, IndexOutOfRangeError
from storage_node.fused_update import KeyedGradients, join_scales, keyed_grad_output

MAX_ABS_WEIGHT = 1e6
"""Largest |per-sample weight| accepted. Why this bound: a pooled value is a sum of
weight x row value over at most 2**31 values (int32 offsets), so with |w| <= 1e6 it stays
finite in float32 (max 3.4e38) for every row whose values are below 1e23; a pushed gradient
reaches a row multiplied by its weight (see `MAX_ABS_GRADIENT`). Weights in use (counts,
scores, [0, 1] probabilities) are orders of magnitude smaller; 3e38 is an encoding bug."""

MAX_ABS_GRADIENT = 1e9
"""Largest |d(loss)/d(pooled)| element accepted. Why a bound beyond `isfinite`: Adagrad and
Adam add the square of a row's summed gradient to their state, and a state that overflows
to inf freezes the row for good (its step becomes g / sqrt(inf) = 0). One value adds at most
MAX_ABS_WEIGHT x MAX_ABS_GRADIENT = 1e15 to its row's gradient, whose square 1e30 leaves a
factor of 3e8 below float32's max: ~18,000 such extreme values of one row in one step. A
gradient of 1e9 on a pooled vector means training diverged already (and an fp16 wire carries
at most 65504)."""


@dataclass(frozen=True)
class FeaturePlace:
    """Where a feature's rows live: its piece's spec and the piece's first arena row."""

    spec: ShardSpec
    base: int

    @property
    def num_rows(self) -> int:
        return self.spec.row_end - self.spec.row_start


def int_vector(tensor: object, what: str) -> torch.Tensor:
    """`tensor` as int64 if it is a 1-D integer tensor; BadTensorError naming `what` if not."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1:
        raise BadTensorError(f"{what} must be a 1-D integer tensor")
    if tensor.dtype not in (torch.int64, torch.int32):
        raise BadTensorError(f"{what} has dtype {tensor.dtype}; use int64 (or int32)")
    return tensor.to(torch.int64)


def _optional_float(tensor: object, size: int, what: str) -> torch.Tensor | None:
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (size,):
        raise BadTensorError(f"{what} must be a float tensor [{size}]")
    return tensor.to(torch.float32)


def normalised_bags(feature: str, bags: Bags) -> Bags:
    """`bags` with int64 indices/offsets and float32 weights/divisor; shapes checked.

    Only what needs no look at the values (dtypes, ranks, lengths): the value checks (offsets
    from 0 to nnz, non-decreasing, rows in range) run on the flat tensors of every feature
    at once in `KeyedBags.build`.
    """
    indices = int_vector(bags.indices, f"feature {feature!r}: indices")
    offsets = int_vector(bags.offsets, f"feature {feature!r}: offsets")
    if offsets.numel() < 1:
        raise BadTensorError(
            f"feature {feature!r}: offsets must have B + 1 entries from 0 to "
            f"len(indices)={indices.numel()}"
        )
    nnz, batch = indices.numel(), offsets.numel() - 1
    weights = _optional_float(
        bags.per_sample_weights, nnz, f"feature {feature!r}: per_sample_weights"
    )
    divisor = _optional_float(bags.mean_divisor, batch, f"feature {feature!r}: mean_divisor")
    return Bags(indices, offsets, weights, divisor)


@dataclass
class KeyedBags:
    """The bags of several features of one arena, flat (see the module docstring)."""

    features: list[str]
    batch_sizes: list[int]
    values: torch.Tensor
    """int64 [nnz]: arena rows."""
    offsets: torch.Tensor
    """int64 [sum B + 1]."""
    weights: torch.Tensor | None
    """float32 [nnz] per-sample weights (1 where a feature has none); None: all 1."""
    inv_divisor: torch.Tensor | None
    """float32 [sum B]: 1 / bag divisor of mean-pooled features (1 for sum); None: all sum."""
    _bag_of_value: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def build(cls, features: list[str], places: list[FeaturePlace], bags: list[Bags]) -> KeyedBags:
        """Join normalised per-feature `bags` into arena form; checks every value first.

        Raises:
            BadTensorError: offsets that do not run from 0 to len(indices) or decrease; a
                per-sample weight or mean divisor out of bounds (names feature and value).
            IndexOutOfRangeError: a row outside its piece (names feature, table, value).
        """
        nnz = [b.indices.numel() for b in bags]
        batch_sizes = [b.offsets.numel() - 1 for b in bags]
        # every rule on every feature, one host sync: offsets run from 0 to nnz without
        # decreasing, rows lie in [0, piece rows), weights and divisors in bounds;
        # per-feature extremes, not per-value bounds
        bag_lengths = [b.offsets[1:] - b.offsets[:-1] for b in bags]
        lengths = torch.cat(bag_lengths)
        ends = torch.stack([torch.stack([b.offsets[0], b.offsets[-1]]) for b in bags])
        extremes = torch.stack(
            [
                torch.stack(torch.aminmax(b.indices)) if n else torch.zeros(2, dtype=torch.int64)
                for b, n in zip(bags, nnz, strict=True)
            ]
        )
        limits = torch.tensor([[0, n, p.num_rows] for n, p in zip(nnz, places, strict=True)])
        bad = (
            (ends[:, 0] != 0)
            | (ends[:, 1] != limits[:, 1])
            | (extremes[:, 0] < 0)
            | (extremes[:, 1] >= limits[:, 2])
        )
        refused = bad.any() | (lengths < 0).any()
        weights = _flat_weights(bags)
        if weights is not None:
            refused |= _beyond(weights, MAX_ABS_WEIGHT)
        if any(b.mean_divisor is not None for b in bags):
            refused |= _divisors_refused(bags, lengths, bag_lengths)
        if bool(refused):
            _raise_first_error(features, places, bags)
        values = torch.cat([b.indices for b in bags])
        start = 0
        for n, place in zip(nnz, places, strict=True):  # to arena rows: a slice add each
            if place.base:
                values[start : start + n] += place.base
            start += n
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
        inv_divisor = None
        if any(p.spec.pooling == "mean" for p in places):
            parts = []
            for place, bag, batch in zip(places, bags, batch_sizes, strict=True):
                if place.spec.pooling != "mean":
                    parts.append(torch.ones(batch))
                    continue
                divisor = bag.mean_divisor
                if divisor is None:
                    divisor = (bag.offsets[1:] - bag.offsets[:-1]).to(torch.float32)
                parts.append(1.0 / divisor.clamp(min=1.0))
            inv_divisor = torch.cat(parts)
        return cls(features, batch_sizes, values, offsets, weights, inv_divisor)

    @classmethod
    def from_jagged(cls, places: list[FeaturePlace], jagged: KeyedJagged) -> KeyedBags:
        """`build`'s result for the wire's flat bags of one arena's features, without
        splitting them per feature: every check and the move to arena rows are one tensor
        operation over all values (the piece of each value found by `repeat_interleave`).

        Raises: as `build` (the same messages).
        """
        num_keys, batch = jagged.lengths.shape
        lengths = jagged.lengths.reshape(-1)
        nnz_per_key = jagged.lengths.sum(dim=1)
        local = jagged.values
        refused = torch.tensor(False)
        if local.numel():  # rows in [0, piece rows): min >= 0 and max(row - piece rows) < 0
            piece_rows = torch.tensor([p.num_rows for p in places], dtype=torch.int64)
            beyond = (local - torch.repeat_interleave(piece_rows, nnz_per_key)).max()
            refused = (local.min() < 0) | (beyond >= 0)
        if jagged.weights is not None:
            refused |= _beyond(jagged.weights, MAX_ABS_WEIGHT)
        if jagged.mean_divisor is not None and lengths.numel():
            low, high = torch.aminmax(jagged.mean_divisor.reshape(-1) - _divisor_floor(lengths))
            refused |= ~((low >= 0) & (high < float("inf")))
        if bool(refused):
            bags = jagged.to_bags()
            _raise_first_error(jagged.keys, places, [bags[k] for k in jagged.keys])
        bases = [p.base for p in places]
        values = local
        if any(bases):  # to arena rows
            values = local + torch.repeat_interleave(torch.tensor(bases), nnz_per_key)
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        inv_divisor = None
        mean = torch.tensor([p.spec.pooling == "mean" for p in places])
        if bool(mean.any()):
            divisor = jagged.mean_divisor
            if divisor is None:
                divisor = jagged.lengths.to(torch.float32)
            inv = 1.0 / divisor.clamp(min=1.0)
            inv[~mean] = 1.0
            inv_divisor = inv.reshape(-1)
        return cls(
            list(jagged.keys), [batch] * num_keys, values, offsets, jagged.weights, inv_divisor
        )

    @property
    def total_bags(self) -> int:
        return self.offsets.numel() - 1

    def bag_of_value(self) -> torch.Tensor:
        """int64 [nnz]: the flat bag of each value (computed once: the push and every
        correction of an early pool need it)."""
        if self._bag_of_value is None:
            lengths = self.offsets[1:] - self.offsets[:-1]
            self._bag_of_value = torch.repeat_interleave(torch.arange(self.total_bags), lengths)
        return self._bag_of_value

    def scale(self, bag_of_value: torch.Tensor) -> torch.Tensor | None:
        """float32 [nnz] per-value factor of the pooling (weights x 1/divisor); None = 1."""
        if self.inv_divisor is None:
            return self.weights
        inv = self.inv_divisor[bag_of_value]
        return inv if self.weights is None else self.weights * inv

    def pool(self, records: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
        """float32 [sum B, dim]: every bag pooled in one `embedding_bag` over `records`.

        Args:
            records: float32 [n, row_floats] (the slot tensor, or the fetched rows).
            rows: int64 [nnz]: each value's row of `records`.
        """
        pooled = F.embedding_bag(
            rows,
            records,
            self.offsets,
            mode="sum",
            per_sample_weights=self.weights,
            include_last_offset=True,
        )
        if pooled.shape[1] != dim:
            pooled = pooled[:, :dim].contiguous()
        if self.inv_divisor is not None:
            pooled.mul_(self.inv_divisor[:, None])
        return pooled

    def split(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """{feature: [B, D]} row views of the flat `pooled` (no copy)."""
        return dict(zip(self.features, torch.split(pooled, self.batch_sizes), strict=True))

    def pushed_gradients(self, grads: dict[str, torch.Tensor]) -> PushedGradients:
        """This request's part of a push: d(loss)/d(pooled) of every bag beside the rows,
        bags and scales of the values.

        With one batch size B for every feature (a KeyedJaggedTensor's) the gradients are
        kept as FBGEMM's [B, features x D] (`fused_update.KeyedGradients`; the wire's
        KeyedTensor read in place when it holds exactly these features), whose rows of D
        floats hold bag (f, b) at row b x features + f; otherwise joined as [sum B, D].

        Raises:
            BadTensorError: a gradient element NaN or beyond +-`MAX_ABS_GRADIENT` (names the
                feature, the element and its value); one host sync for every feature.
        """
        per_feature = [grads[f] for f in self.features]
        scale = self.scale(self.bag_of_value())
        if len(set(self.batch_sizes)) == 1:
            batch, width = self.batch_sizes[0], len(self.features)
            grad_output = keyed_grad_output(per_feature)
            if bool(_beyond(grad_output, MAX_ABS_GRADIENT)):
                _raise_bad_gradient(self.features, grads)
            keyed = KeyedGradients(self.values, self.offsets, scale, grad_output, batch)

            def bag_in_keyed_rows() -> torch.Tensor:
                bag = self.bag_of_value()
                return (bag % batch) * width + bag // batch

            rows = grad_output.view(-1, grad_output.shape[1] // max(width, 1))
            return PushedGradients(self.values, bag_in_keyed_rows, scale, rows, keyed)
        flat = torch.cat(per_feature).to(torch.float32)
        if bool(_beyond(flat, MAX_ABS_GRADIENT)):
            _raise_bad_gradient(self.features, grads)
        return PushedGradients(self.values, self.bag_of_value(), scale, flat)

    def same_as(self, other: KeyedBags) -> bool:
        """The same features with equal bags (an early pool answers only its own bags): the
        same rows, bags, weights and divisors, compared flat."""

        def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
            if x is None or y is None:
                return x is None and y is None
            return x.shape == y.shape and bool(torch.equal(x, y))

        return (
            self.features == other.features
            and self.batch_sizes == other.batch_sizes
            and same(self.values, other.values)
            and same(self.offsets, other.offsets)
            and same(self.weights, other.weights)
            and same(self.inv_divisor, other.inv_divisor)
        )


@dataclass(frozen=True)
class PushedGradients:
    """One lookup's gradients, not yet spread over its values: the gradient of value v is
    `scale[v] * bag_grads[bag[v]]`, which `merge_row_gradients` sums per row without ever
    writing one [nnz, D] row per value."""

    rows: torch.Tensor
    """int64 [nnz] arena rows."""
    bag_of_value: torch.Tensor | Callable[[], torch.Tensor]
    """int64 [nnz] the bag of each value, into `bag_grads`, or how to compute it (only the
    node's own update path reads it, FBGEMM's kernel does not): see `bag`."""
    scale: torch.Tensor | None
    """float32 [nnz] (weights x 1/divisor), None = 1."""
    bag_grads: torch.Tensor
    """float32 [sum B, D]."""
    keyed: KeyedGradients | None = None
    """The same gradients in FBGEMM's table-batched layout (`storage_node.fused_update`);
    None where the features' batch sizes differ."""

    @cached_property
    def bag(self) -> torch.Tensor:
        """int64 [nnz] the bag of each value, into `bag_grads`."""
        given = self.bag_of_value
        return given if isinstance(given, torch.Tensor) else given()

    @staticmethod
    def join(parts: list[PushedGradients]) -> PushedGradients:
        """Every worker's parts as one (bags renumbered after the parts before them)."""
        if len(parts) == 1:
            return parts[0]
        shifts = np.cumsum([0] + [p.bag_grads.shape[0] for p in parts[:-1]])
        scale = join_scales([p.scale for p in parts], [p.rows.numel() for p in parts])
        return PushedGradients(
            torch.cat([p.rows for p in parts]),
            torch.cat([p.bag + int(shift) for p, shift in zip(parts, shifts, strict=True)]),
            scale,
            torch.cat([p.bag_grads for p in parts]),
            KeyedGradients.join([p.keyed for p in parts]),
        )


def merge_row_gradients(
    pushed: PushedGradients,
    inverse: torch.Tensor,
    num_unique: int,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 [u, D]: the summed gradient of each distinct row, as one sparse product.

    Row u's gradient is the sum over its values v of `scale[v] * bag_grads[bag[v]]`: the
    product of a [u, sum B] CSR matrix (one entry per value, in value order within a row)
    with `bag_grads`. Why: gathering [nnz, D] per-value rows and `index_add_`-ing them wrote
    and read nnz x D floats twice (~30 ms for a multi-hot step of 13 tables); the product
    reads `bag_grads` in place (~11 ms), with the same additions in the same order.

    Args:
        inverse: int64 [nnz] each value's distinct row in [0, num_unique).
        order: the stable sort order of `inverse` if the caller has it (`UpdatedRows`),
            else sorted here.
    """
    num_bags = pushed.bag_grads.shape[0]
    # 32-bit keys and column ids where they fit: the sort and the gathers move half the bytes
    small = max(num_unique, num_bags, inverse.numel()) < 2**31
    index_dtype = torch.int32 if small else torch.int64
    if order is None:
        order = torch.from_numpy(stable_order(inverse.numpy(), num_unique))
    crow = torch.zeros(num_unique + 1, dtype=index_dtype)
    torch.cumsum(torch.bincount(inverse, minlength=num_unique), 0, out=crow[1:])
    scale = pushed.scale[order] if pushed.scale is not None else torch.ones(order.numel())
    columns = pushed.bag.to(index_dtype)[order]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        matrix = torch.sparse_csr_tensor(crow, columns, scale, (num_unique, num_bags))
    return matrix @ pushed.bag_grads


def _beyond(values: torch.Tensor, bound: float) -> torch.Tensor:
    """0-dim bool tensor (no host sync): some value is NaN or outside [-bound, bound].

    One `aminmax` pass; NaN propagates into both extremes and fails both comparisons.
    """
    if values.numel() == 0:
        return torch.tensor(False)
    low, high = torch.aminmax(values)
    return ~((low >= -bound) & (high <= bound))


def _flat_weights(bags: list[Bags]) -> torch.Tensor | None:
    """float32 [nnz]: every feature's per-sample weights (1 where it has none); None: all 1."""
    if all(b.per_sample_weights is None for b in bags):
        return None
    return torch.cat(
        [
            b.per_sample_weights
            if b.per_sample_weights is not None
            else torch.ones(b.indices.numel())
            for b in bags
        ]
    )


def _divisor_floor(lengths: torch.Tensor) -> torch.Tensor:
    """int64 [B]: the least mean divisor of each bag: 1 for a bag with values (the whole
    bag holds at least them), 0 for an empty one (the encoder sends its local length, 0)."""
    return lengths.clamp(max=1)


def _divisors_refused(
    bags: list[Bags], lengths: torch.Tensor, bag_lengths: list[torch.Tensor]
) -> torch.Tensor:
    """0-dim bool tensor (no host sync): a given mean divisor (some feature has them) is NaN,
    infinite or below its floor (`_divisor_floor`).

    Why refused, not clamped: a NaN divisor pools NaN and the push then writes NaN into every
    row of the bag, an infinite one silently pools zeros; one below 1 for a bag with values
    is no bag length, and the clamp to 1 would silently pool a sum for a mean.

    Args:
        lengths: int64 [sum B] every feature's bag lengths; `bag_lengths` the same per feature.
    """
    given = [b.mean_divisor is not None for b in bags]
    if not all(given):  # the wire sends all or none; a core caller may mix
        lengths = torch.cat([n for n, g in zip(bag_lengths, given, strict=True) if g])
    if lengths.numel() == 0:
        return torch.tensor(False)
    divisors = torch.cat([b.mean_divisor for b in bags if b.mean_divisor is not None])
    # one pass: divisor - floor >= 0 and < inf; NaN fails both
    low, high = torch.aminmax(divisors - _divisor_floor(lengths))
    return ~((low >= 0) & (high < float("inf")))


def _raise_first_error(features: list[str], places: list[FeaturePlace], bags: list[Bags]) -> None:
    """The clear error of the first feature whose bags are wrong (only on the error path)."""
    for feature, place, bag in zip(features, places, bags, strict=True):
        nnz = bag.indices.numel()
        if int(bag.offsets[0]) != 0 or int(bag.offsets[-1]) != nnz:
            raise BadTensorError(
                f"feature {feature!r}: offsets must have B + 1 entries from 0 to len(indices)={nnz}"
            )
        if bool((bag.offsets[1:] < bag.offsets[:-1]).any()):
            raise BadTensorError(f"feature {feature!r}: offsets must be non-decreasing")
        check_range(place, feature, bag.indices)
        _check_weights(feature, bag.per_sample_weights)
        _check_divisor(feature, bag)
    raise AssertionError("a flat check failed but no feature's did")


def _first_refused(ok: torch.Tensor) -> int | None:
    """Position of the first False in `ok`, or None (error path only)."""
    refused = (~ok).nonzero()
    return int(refused[0]) if refused.numel() else None


def _check_weights(feature: str, weights: torch.Tensor | None) -> None:
    if weights is None:
        return
    at = _first_refused(weights.abs() <= MAX_ABS_WEIGHT)
    if at is not None:
        raise BadTensorError(
            f"feature {feature!r}: per_sample_weights[{at}] is {float(weights[at]):g}; weights "
            f"must be finite with |w| <= {MAX_ABS_WEIGHT:g} (larger ones overflow float32 once "
            "pooled, and in the optimizer's squared gradients)"
        )


def _check_divisor(feature: str, bag: Bags) -> None:
    if bag.mean_divisor is None:
        return
    lengths = bag.offsets[1:] - bag.offsets[:-1]
    divisor = bag.mean_divisor
    at = _first_refused((divisor >= _divisor_floor(lengths)) & (divisor < float("inf")))
    if at is not None:
        raise BadTensorError(
            f"feature {feature!r}: mean_divisor[{at}] is {float(divisor[at]):g} for a bag of "
            f"{int(lengths[at])} values; send the whole bag's length: finite, >= 1 (0 only for "
            "an empty bag)"
        )


def _raise_bad_gradient(features: list[str], grads: dict[str, torch.Tensor]) -> None:
    """BadTensorError naming the first refused gradient element (error path only)."""
    for feature in features:
        grad = grads[feature].to(torch.float32)
        at = _first_refused((grad.abs() <= MAX_ABS_GRADIENT).reshape(-1))
        if at is not None:
            bag, column = divmod(at, grad.shape[1])
            raise BadTensorError(
                f"gradient for feature {feature!r}: element [{bag}, {column}] is "
                f"{float(grad[bag, column]):g}; gradients must be finite with |g| <= "
                f"{MAX_ABS_GRADIENT:g} (beyond, the optimizer's squared gradients overflow "
                "float32 and freeze the rows)"
            )
    # the rows view also spans columns of other arenas' features: theirs to name


def check_range(place: FeaturePlace, feature: str, indices: torch.Tensor) -> None:
    """IndexOutOfRangeError naming the feature, table and value of the first local row
    outside the piece."""
    if indices.numel() == 0:
        return
    bad = (indices < 0) | (indices >= place.num_rows)
    if bool(bad.any()):
        value = int(indices[bad][0])
        spec = place.spec
        raise IndexOutOfRangeError(
            f"table {spec.table_name!r}, feature {feature!r}: index {value} is outside "
            f"[0, {place.num_rows}), the local rows of this piece (global rows "
            f"[{spec.row_start}, {spec.row_end}) of {spec.table_num_rows}); the value "
            f"as a global row would be {value + spec.row_start}"
        )
