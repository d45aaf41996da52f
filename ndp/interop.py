"""Models in and out of ndp as torchrec `DLRM` state dicts.

Why: a model trained by ndp should serve wherever torchrec models serve, and a torchrec
model should be able to continue training on storage nodes. The two share one layout: the
dense half (`ndp.model.dense.DenseHalf`) is built from torchrec's own `DenseArch`,
`InteractionArch` and `OverArch` under the same attribute names as
`torchrec.models.dlrm.DLRM`, so its state dict keys ARE the DLRM's dense keys; each
embedding table is one `EmbeddingBagCollection` bag named after the table, holding the
whole table (`sparse_arch.embedding_bag_collection.embedding_bags.<table>.weight`). Export
therefore gathers every table from wherever it lives and renames nothing else.

Sources: an `NdpEngine` (tables gathered from the storage nodes with `table_rows`, dense
half from rank 0), a `ReferenceEngine` (FBGEMM tables in process), or a saved ndp checkpoint
(`export_checkpoint_state_dict`: read from its files, no actors). Import produces an
`ImportedModel` (per-table float32 arrays + the dense state dict) that `load_into_engine`
writes into either engine: into the FBGEMM tables, or into the storage nodes through
`StorageNodeActor.write_rows` and every GPU worker through `load_dense_state`.
Optimizer state is not part of a DLRM state dict: loading keeps each engine's own state
(zero on a fresh engine), which is what "continue training from these weights" means.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from ndp.checkpoint import Checkpoint, resolve_checkpoint
from ndp.config import Config
from ndp.errors import NDPError

TABLE_KEY = "sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"
"""Key of a table's weights in a `torchrec.models.dlrm.DLRM` state dict."""

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


class InteropError(NDPError):
    """A state dict or model that cannot be converted (names the key or setting to change)."""


@dataclass
class ImportedModel:
    """Weights read from a torchrec DLRM state dict, ready for `load_into_engine`.

    Attributes:
        tables: table name -> float32 [num_rows, D] (effective row counts of the config).
        dense: `DenseHalf` state dict (CPU tensors).
    """

    tables: dict[str, np.ndarray]
    dense: dict[str, torch.Tensor]


def _check_exportable(cfg: Config) -> None:
    if len(cfg.model.top_mlp) < 2:
        raise InteropError(
            f"model.top_mlp: {cfg.model.top_mlp} has one layer; torchrec's DLRM needs an over "
            "arch of at least two layers (e.g. [16, 1])"
        )


def build_torchrec_dlrm(cfg: Config, device: torch.device | str = "cpu") -> DLRM:
    """An (untrained) `torchrec.models.dlrm.DLRM` with the shapes of `cfg.model`.

    Tables use the effective row counts (`max_rows_per_table` applied), one bag per table
    in config order, so the sparse features come out in `cfg.model.feature_names` order,
    the order `DenseHalf` stacks them in.
    """
    _check_exportable(cfg)
    model = cfg.model
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=t.name,
                embedding_dim=t.embedding_dim,
                num_embeddings=t.num_rows,
                feature_names=list(t.features),
                pooling=_POOLING[t.pooling],
            )
            for t in model.effective_tables()
        ],
        device=torch.device(device),
    )
    return DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=model.dense_in_features,
        dense_arch_layer_sizes=list(model.bottom_mlp),
        over_arch_layer_sizes=list(model.top_mlp),
        dense_device=torch.device(device),
    )


def _is_ndp_engine(engine: Any) -> bool:
    return hasattr(engine, "table_rows") and hasattr(engine, "dense_state_dict")


def export_dense_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The dense half as a plain PyTorch state dict (loads into `build_dense_half(...)`)."""
    if _is_ndp_engine(engine):
        state = engine.dense_state_dict()
    elif hasattr(engine, "dense_half"):
        state = engine.dense_half.state_dict()
    else:
        raise InteropError(
            f"cannot export from {type(engine).__name__}: expected an NdpEngine or a ReferenceEngine"
        )
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def export_table_weights(cfg: Config, engine: Any) -> dict[str, torch.Tensor]:
    """Every table's weights, float32 [num_rows, D] on CPU, gathered from where they live."""
    out: dict[str, torch.Tensor] = {}
    for table in cfg.model.effective_tables():
        if _is_ndp_engine(engine):
            weights, _ = engine.table_rows(table.name)
        elif hasattr(engine, "embeddings"):
            weights = engine.embeddings.table_weights(table.name)
        else:
            raise InteropError(
                f"cannot export from {type(engine).__name__}: expected an NdpEngine or a "
                "ReferenceEngine"
            )
        out[table.name] = weights.detach().float().cpu().clone()
    return out


def export_torchrec_state_dict(cfg: Config, engine: Any) -> dict[str, torch.Tensor]:
    """A `torchrec.models.dlrm.DLRM` state dict of the engine's current model.

    Load it with `build_torchrec_dlrm(cfg).load_state_dict(...)`; that DLRM then computes the
    engine's `predict` logits (as [B, 1]).
    """
    _check_exportable(cfg)
    state = {TABLE_KEY.format(name): w for name, w in export_table_weights(cfg, engine).items()}
    state.update(export_dense_state_dict(engine))
    return state


def export_checkpoint_state_dict(
    cfg: Config, checkpoint: Checkpoint | str | Path
) -> dict[str, torch.Tensor]:
    """A `torchrec.models.dlrm.DLRM` state dict of a saved ndp checkpoint, read from its files.

    Args:
        cfg: the config the checkpoint was trained with (its `config.yaml`).
        checkpoint: a `Checkpoint`, a `step-<n>/` directory, or the directory holding them
            (the newest is taken).

    Each table's weights are the first `embedding_dim` columns of its records; the rest is
    optimizer state, which a DLRM state dict does not carry.
    """
    _check_exportable(cfg)
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = resolve_checkpoint(checkpoint)
    checkpoint.check_fits(cfg)
    state: dict[str, torch.Tensor] = {}
    for table in cfg.model.effective_tables():
        records = checkpoint.table_records(table.name, 0, table.num_rows)
        weights = np.ascontiguousarray(records[:, : table.embedding_dim])
        state[TABLE_KEY.format(table.name)] = torch.from_numpy(weights)
    state.update({k: v.detach().cpu().clone() for k, v in checkpoint.dense_model().items()})
    return state


def import_torchrec_state_dict(cfg: Config, state_dict: Mapping[str, Any]) -> ImportedModel:
    """Read a torchrec DLRM state dict with the shapes of `cfg.model` into an `ImportedModel`.

    Raises:
        InteropError: a table or dense key is missing, unexpected, or has the wrong shape
            (naming the key and the config field that sets it).
    """
    _check_exportable(cfg)
    expected = build_torchrec_dlrm(cfg, device="meta").state_dict()
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise InteropError(
            f"state dict lacks {missing[0]!r} ({len(missing)} keys missing); it was not saved "
            "from a DLRM with this config's model section"
        )
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise InteropError(
            f"state dict has {unexpected[0]!r}, which this config's model does not; check "
            "model.tables names and model.bottom_mlp/top_mlp"
        )
    for key, ref in expected.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(ref.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            hint = (
                "model.tables[].num_rows / embedding_dim (and model.max_rows_per_table)"
                if key.startswith("sparse_arch.")
                else "model.bottom_mlp / model.top_mlp / model.dense_in_features"
            )
            raise InteropError(
                f"{key}: shape {shape}, this config needs {tuple(ref.shape)}; {hint}"
            )
    tables = {
        t.name: state_dict[TABLE_KEY.format(t.name)].detach().float().cpu().numpy().copy()
        for t in cfg.model.effective_tables()
    }
    dense = {
        k: state_dict[k].detach().cpu().clone()
        for k in expected
        if not k.startswith("sparse_arch.")
    }
    return ImportedModel(tables=tables, dense=dense)


def load_into_engine(engine: Any, imported: ImportedModel) -> None:
    """Write imported weights into a ReferenceEngine or an NdpEngine (between steps).

    NdpEngine: each table piece goes to its storage node (`write_rows`, the actor named
    `ndp-storage-node-<node>`), the dense state to every GPU worker
    (`ndp-gpu-worker-<rank>.load_dense_state`), so all replicas stay identical.
    Optimizer state is kept (zero on a fresh engine).
    """
    if _is_ndp_engine(engine):
        _load_into_ndp(engine, imported)
    elif hasattr(engine, "embeddings") and hasattr(engine, "dense_half"):
        _load_into_reference(engine, imported)
    else:
        raise InteropError(
            f"cannot load into {type(engine).__name__}: expected an NdpEngine or a ReferenceEngine"
        )


def _load_into_reference(engine: Any, imported: ImportedModel) -> None:
    with torch.no_grad():
        for name, weights in imported.tables.items():
            target = engine.embeddings.table_weights(name)
            target.copy_(torch.from_numpy(weights).to(target.device, target.dtype))
        engine.dense_half.load_state_dict(imported.dense)


def _load_into_ndp(engine: Any, imported: ImportedModel) -> None:
    import ray

    from ndp.coordinator import _get

    writes = []
    for name, weights in imported.tables.items():
        for piece in engine.plan.pieces_of(name):
            node = ray.get_actor(f"ndp-storage-node-{piece.node}")
            rows = torch.arange(piece.row_start, piece.row_end, dtype=torch.int64)
            block = torch.from_numpy(weights[piece.row_start : piece.row_end])
            writes.append(node.write_rows.remote(name, rows, block))
    _get(writes)
    dense = {k: v.clone() for k, v in imported.dense.items()}
    workers = [ray.get_actor(f"ndp-gpu-worker-{r}") for r in range(engine.num_workers)]
    _get([w.load_dense_state.remote(dense, None) for w in workers])
