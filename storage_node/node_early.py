"""Early lookups (a part of `StorageNodeCore`): the lookahead's second stage pools a future
step's bags before their turn and keeps them (`early_pools.EarlyPool`); the step's training
lookup is answered from them, corrected by every update applied in between (see
`ndp.pipeline`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ndp.plan import Bags, KeyedJagged
from storage_node.arena import Arena
from storage_node.early_pools import EarlyPool, Request
from storage_node.errors import EarlyPoolMissingError
from storage_node.keyed_bags import KeyedBags


class EarlyLookups:
    """`StorageNodeCore`'s early pools: kept, answered, dropped (under the node's `_lock`)."""

    def _missing_early_pool(self, step: int, worker: int) -> EarlyPoolMissingError:
        return EarlyPoolMissingError(
            f"node {self.node_id!r} keeps no early pool of step {step} for worker "
            f"{worker}; send the lookup with its bags"
        )

    def lookup_early(
        self,
        step: int,
        worker: int,
        *,
        wait_timeout_s: float | None = None,
        previous_push: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The training lookup of (step, worker) answered from its kept early pool, after
        waiting for step - 1's update (up to `wait_timeout_s`, default
        `storage.step_wait_timeout_s`; the worker is checked first).

        Why without bags: the worker sent exactly these bags in its `early_lookup` of this
        step (and checked that they are the step's), so sending, decoding, validating and
        comparing them again is pure overhead on the critical path.

        `previous_push`: as for `lookup`, applied once the kept pool is found.

        Raises:
            EarlyPoolMissingError: no early pool of (step, worker) is kept (never pooled, or
                dropped by `write_rows`/`restore`); send the bags with `lookup` instead.
        """
        with self._lock:
            self._check_open()
            self._check_worker(worker)
            if previous_push is not None:
                if (step, worker) not in self._early:
                    raise self._missing_early_pool(step, worker)
                self._push_previous(step, worker, previous_push, train=True)
            timeout_s = self.storage.step_wait_timeout_s
            self.wait_for_step(step, timeout_s if wait_timeout_s is None else wait_timeout_s)
            early = self._early.pop((step, worker), None)
            if early is None:
                raise self._missing_early_pool(step, worker)
            self.early_counters["early_hits"] += 1
            self.early_counters["early_hits_without_bags"] += 1
            self._record_lookup(step, worker, early.request)
            return early.answer(self._pool)

    def early_lookup(
        self,
        step: int,
        worker: int,
        bags: Mapping[str, Bags] | KeyedJagged,
        *,
        correct: bool = True,
    ) -> bool:
        """Pool the training bags of a future `step` now, to answer its lookup without pooling.

        Does not wait for the step barrier: the rows are read as they are now, and each update
        applied before `step`'s lookup adds its change to the kept vectors (unless `correct`
        is False: stale mode). A later early lookup of the same (step, worker) replaces it.

        Returns:
            True when kept; False when `step` is already applied (nothing to do).
        """
        with self._lock:
            self._check_open()
            self._check_worker(worker)
            request = self._validated_request(bags)
            if step <= self.applied_step:
                return False
            pooled = []
            for arena, keyed in request.groups:
                # the blocks read now stay for `step`'s update (`ArenaFlash.carrying`)
                with arena.flash.carrying(step):
                    pooled.append(self._pool_early(arena, keyed, correct))
            self._early[(step, worker)] = EarlyPool(request, pooled, correct)
            self.early_counters["early_pools"] += 1
            self.early_counters["early_groups_deferred"] += sum(p is None for p in pooled)
            return True

    def _pool_early(self, arena: Arena, keyed: KeyedBags, correct: bool) -> torch.Tensor | None:
        """A group's vectors pooled now, or None (deferred to its lookup) in exact mode when
        every row is resident: reading them later costs nothing, and a correction would
        cost what the pooling saves (`storage_node.early_pools`)."""
        if correct and arena.cache.all_resident(keyed.values.numpy()):
            return None
        return self._pool(arena, keyed)

    def _take_early(self, step: int, worker: int, request: Request) -> EarlyPool | None:
        """The early pool of (step, worker) if its bags are the lookup's; dropped either way."""
        early = self._early.pop((step, worker), None)
        if early is None:
            return None
        same = early.request.same_as(request)
        self.early_counters["early_hits" if same else "early_mismatches"] += 1
        return early if same else None
