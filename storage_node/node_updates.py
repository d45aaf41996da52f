"""Applying a step's update (a part of `StorageNodeCore`): all workers' gradients summed,
duplicates merged, the optimizer applied to each touched row once, per arena.

Two paths, chosen per arena and step:

* FBGEMM's table-batched backward kernel on the cache's slot tensors
  (`storage_node.fused_update`) when every row is cache-resident, the optimizer has a CPU
  kernel (sgd, adagrad, rowwise_adagrad) and the workers' batches are one size: one call
  dedupes, merges and updates in place;
* otherwise the node's own vectorised path: one sort for the dedupe and the merge
  (`keyed_bags.merge_row_gradients`), one optimizer call in place on resident slots
  (`optimizers.apply_update_at`) or on the fetched records, written back through the cache.

Either way kept early pools get each updated row's change (`early_pools.correct_early_pools`).
"""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass, field

import torch

from storage_node.arena import Arena
from storage_node.early_pools import Request, UpdatedRows, correct_early_pools, pooled_early
from storage_node.errors import BadTensorError
from storage_node.fused_update import FUSED_OPTIMIZERS, fused_backward
from storage_node.keyed_bags import PushedGradients, merge_row_gradients
from storage_node.optimizers import apply_update, apply_update_at


@dataclass
class _PendingStep:
    """Lookups and pushes collected for the step that is applied next."""

    lookups: dict[int, Request] = field(default_factory=dict)
    pushed: dict[int, list[tuple[Arena, PushedGradients]]] = field(default_factory=dict)


class Updates:
    """`StorageNodeCore`'s update of a step (under the node's `_lock`)."""

    def _row_gradients(
        self, request: Request, grads: dict[str, torch.Tensor]
    ) -> list[tuple[Arena, PushedGradients]]:
        """Per group: (arena, its gradients as pushed); validates every gradient first."""
        looked_up = {
            feature: keyed.batch_sizes[i]
            for _, keyed in request.groups
            for i, feature in enumerate(keyed.features)
        }
        missing = sorted(set(looked_up) - set(grads))
        if missing:
            raise BadTensorError(f"gradients missing for looked-up features: {missing}")
        for feature, grad in grads.items():
            if feature not in looked_up:
                self._piece_for(feature)  # unknown feature -> UnknownFeatureError
                raise BadTensorError(
                    f"gradient for feature {feature!r}, which this worker did not look up"
                )
            dim = self._piece_of_feature[feature].spec.embedding_dim
            expected = (looked_up[feature], dim)
            if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
                raise BadTensorError(f"gradient for feature {feature!r} must be a float tensor")
            if tuple(grad.shape) != expected:
                raise BadTensorError(
                    f"gradient for feature {feature!r} has shape {tuple(grad.shape)}, "
                    f"expected {expected} (batch, dim)"
                )
        pushed = []
        for arena, keyed in request.groups:
            pushed.append((arena, keyed.pushed_gradients(grads)))  # raises on NaN/Inf/huge
        return pushed

    def _apply_step(self, step: int, pending: _PendingStep) -> None:
        """Sum all workers' gradients, merge duplicates, update each unique row once.

        One update per arena (every table of it at once); arenas update
        `storage.update_threads` at a time, under the caller's lock.
        """
        iteration = self.optimizer_step + 1
        per_arena: dict[int, tuple[Arena, list[PushedGradients]]] = {}
        for worker in sorted(pending.pushed):
            for arena, part in pending.pushed[worker]:
                per_arena.setdefault(id(arena), (arena, []))[1].append(part)
        tasks = list(per_arena.values())
        if len(tasks) > 1 and self._update_threads is not None:
            running = [
                self._update_threads.submit(self._update_arena, *task, iteration) for task in tasks
            ]
            futures.wait(running)
            for future in running:
                future.result()  # the first failure, once every arena is done
        else:
            for task in tasks:
                self._update_arena(*task, iteration)
        self.optimizer_step = iteration
        self.applied_step = step
        del self._pending[step]
        for key in [k for k in self._early if k[0] <= step]:  # never looked up: stale now
            del self._early[key]
        self._release_pins(up_to_step=step)
        for arena in self._arenas:
            arena.cache.on_step()
            # carried from the step's lookups and early lookups (`ArenaFlash.carrying`)
            arena.flash.release_held(up_to_step=step)
        self._step_applied.notify_all()

    def _update_arena(self, arena: Arena, parts: list[PushedGradients], iteration: int) -> None:
        """One arena's share of `_apply_step`: one dedupe, one merge, one optimizer call
        and one write for every table of the arena; touches only this arena's cache and
        files and the early pools' groups of this arena (safe beside other arenas' updates)."""
        pushed = PushedGradients.join(parts)
        if pushed.rows.numel() == 0:
            return
        if self._update_fused(arena, pushed):
            self.update_paths["fbgemm_kernel"] += 1
            return
        self.update_paths["node_kernels"] += 1
        early = pooled_early(self._early.values(), arena)
        updated = UpdatedRows.of(pushed.rows, arena.flash.layout.num_rows)
        merged = merge_row_gradients(pushed, updated.inverse, updated.rows.numel(), updated.order)
        unique_np = updated.rows.numpy()
        dim = arena.dim
        slots = arena.cache.resident_for_update(unique_np)
        if slots is not None:  # every row cached: changed in place in the slot tensor
            weights = torch.from_numpy(arena.cache.weights)
            state = torch.from_numpy(arena.cache.state)
            slots_t = torch.from_numpy(slots)
            old = weights[slots_t] if early else None
            apply_update_at(self.optimizer, weights, state, slots_t, merged, iteration=iteration)
            if old is not None:
                correct_early_pools(early, updated, weights[slots_t] - old)
            return
        with arena.flash.holding_reads():  # rows read here and written straight back
            records = torch.from_numpy(arena.cache.fetch(unique_np))
            old = records[:, :dim].clone() if early else None
            apply_update(
                self.optimizer,
                records[:, :dim],
                records[:, dim:],
                merged,
                iteration=iteration,
            )
            arena.cache.store(unique_np, records.numpy())
        if old is not None:
            correct_early_pools(early, updated, records[:, :dim] - old)

    def _update_fused(self, arena: Arena, pushed: PushedGradients) -> bool:
        """`_update_arena` by FBGEMM's backward kernel on the slot tensors
        (`storage_node.fused_update`) where it applies: an optimizer it has, one batch size,
        every row cache-resident. False: nothing done (the node's own path runs)."""
        if self.optimizer.name not in FUSED_OPTIMIZERS or pushed.keyed is None:
            return False
        resident = arena.cache.resident_values_for_update(pushed.keyed.values.numpy())
        if resident is None:
            return False
        slots_np, distinct_slots = resident
        weights, slots = torch.from_numpy(arena.cache.weights), torch.from_numpy(slots_np)
        updated = old = None
        early = pooled_early(self._early.values(), arena)
        if early:  # groups pooled early take each updated row's change
            # from the distinct slots the residency check found: no sort of every value
            rows = arena.cache.slot_rows[distinct_slots]
            updated, order = UpdatedRows.of_distinct(rows, arena.flash.layout.num_rows)
            updated_slots = torch.from_numpy(distinct_slots[order])
            old = weights[updated_slots]
        state = torch.from_numpy(arena.cache.state)
        fused_backward(self.optimizer, weights, state, slots, pushed.keyed)
        if updated is not None and old is not None:
            delta = weights[updated_slots] - old
            correct_early_pools(early, updated, delta)
        return True
