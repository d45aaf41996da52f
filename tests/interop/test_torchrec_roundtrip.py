"""Export to and import from torchrec's DLRM: same predictions, training continues."""

from __future__ import annotations

import pytest
import torch

from ndp.checkpoint import write_checkpoint
from ndp.config import Config, config_from_dict
from ndp.coordinator import NdpEngine
from ndp.data.loader import build_datasets
from ndp.interop import (
    TABLE_KEY,
    InteropError,
    build_torchrec_dlrm,
    export_checkpoint_state_dict,
    export_dense_state_dict,
    export_torchrec_state_dict,
    import_torchrec_state_dict,
    load_into_engine,
)
from ndp.model.dense import build_dense_half
from ndp.reference import ReferenceEngine

BATCH = 16
STEPS = 4


def small_config(**cluster) -> Config:
    """Two tables (one mean-pooled and split row-wise over two nodes), multi-hot bags."""
    return config_from_dict(
        {
            "model": {
                "bottom_mlp": [16, 8],
                "top_mlp": [16, 1],
                "tables": [
                    {
                        "name": "big",
                        "num_rows": 200,
                        "embedding_dim": 8,
                        "pooling": "mean",
                        "features": ["f_big"],
                    },
                    {
                        "name": "small",
                        "num_rows": 40,
                        "embedding_dim": 8,
                        "features": ["f_a", "f_b"],
                    },
                ],
            },
            "data": {
                "source": "synthetic",
                "synthetic": {
                    "num_samples": (STEPS + 2) * BATCH,
                    "num_val_samples": 32,
                    "pooling_factor": [3.0, 2.0, 1.0],
                    "pooling_distribution": "poisson",
                    "seed": 11,
                },
            },
            "optimizer": {
                "dense": {"name": "adagrad", "lr": 0.05},
                "sparse": {"name": "rowwise_adagrad", "lr": 0.05},
            },
            "train": {"steps": STEPS, "batch_size": BATCH, "seed": 5, "device": "cpu"},
            "cluster": {
                "num_storage_nodes": 2,
                "num_gpu_workers": 1,
                "constraints": {"big": {"sharding_type": "row_wise"}},
                **cluster,
            },
            "storage": {"cache_bytes": 4096},
            "logging": {"progress_bar": False},
        }
    )


@pytest.fixture(scope="module")
def cfg() -> Config:
    return small_config()


@pytest.fixture(scope="module")
def batches(cfg):
    train, _ = build_datasets(cfg)
    return list(train.batches(BATCH))[: STEPS + 2]


def torchrec_logits(cfg: Config, state: dict, batch) -> torch.Tensor:
    model = build_torchrec_dlrm(cfg)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(batch.dense, batch.sparse).squeeze(-1)


@pytest.fixture(scope="module")
def trained_reference(cfg, batches):
    engine = ReferenceEngine(cfg)
    for step, batch in enumerate(batches[:STEPS]):
        engine.train_step(step, batch)
    return engine


def test_reference_export_predicts_like_the_engine_in_torchrec(cfg, batches, trained_reference):
    state = export_torchrec_state_dict(cfg, trained_reference)
    probe = batches[STEPS]
    expected = trained_reference.predict(STEPS, probe)
    torch.testing.assert_close(torchrec_logits(cfg, state, probe), expected, rtol=1e-5, atol=1e-5)
    # the export holds the trained weights, not a fresh init
    fresh = ReferenceEngine(cfg)
    assert not torch.allclose(fresh.predict(STEPS, probe), expected, atol=1e-4)


def test_dense_export_loads_into_a_plain_dense_half(cfg, batches, trained_reference):
    dense_half = build_dense_half(cfg.model, seed=999)
    dense_half.load_state_dict(export_dense_state_dict(trained_reference))
    probe = batches[STEPS]
    pooled = trained_reference.embeddings(probe.sparse)
    with torch.no_grad():
        torch.testing.assert_close(
            dense_half.eval()(probe.dense, pooled),
            trained_reference.predict(STEPS, probe),
            rtol=1e-5,
            atol=1e-5,
        )


def test_import_into_a_fresh_reference_continues_training_identically(
    cfg, batches, trained_reference
):
    imported = import_torchrec_state_dict(cfg, export_torchrec_state_dict(cfg, trained_reference))
    assert set(imported.tables) == {"big", "small"}
    assert imported.tables["big"].shape == (200, 8)
    a, b = ReferenceEngine(cfg), ReferenceEngine(cfg)
    load_into_engine(a, imported)
    load_into_engine(b, imported)
    probe = batches[STEPS + 1]
    torch.testing.assert_close(a.predict(0, probe), trained_reference.predict(STEPS, probe))
    loss_a = a.train_step(0, batches[STEPS])
    loss_b = b.train_step(0, batches[STEPS])
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    torch.testing.assert_close(a.predict(1, probe), b.predict(1, probe))
    assert not torch.allclose(a.predict(1, probe), trained_reference.predict(STEPS, probe))


@pytest.mark.ray
@pytest.mark.slow
def test_ndp_export_and_import_match_the_reference(ray_session, cfg, batches, trained_reference):
    """NdpEngine -> torchrec DLRM gives the engine's predictions; a torchrec state dict
    imported into a fresh NdpEngine (row-wise pieces on two nodes) predicts and trains on
    exactly like the same import into a ReferenceEngine."""
    probe = batches[STEPS + 1]
    with NdpEngine(cfg) as engine:
        for step, batch in enumerate(batches[:STEPS]):
            engine.train_step(step, batch)
        state = export_torchrec_state_dict(cfg, engine)
        torch.testing.assert_close(
            torchrec_logits(cfg, state, probe), engine.predict(STEPS, probe), rtol=1e-5, atol=1e-5
        )

    source = export_torchrec_state_dict(cfg, trained_reference)
    imported = import_torchrec_state_dict(cfg, source)
    reference = ReferenceEngine(cfg)
    load_into_engine(reference, imported)
    with NdpEngine(cfg) as engine:
        assert len({p.node for p in engine.plan.pieces_of("big")}) == 2
        load_into_engine(engine, imported)
        torch.testing.assert_close(
            engine.predict(0, probe), torchrec_logits(cfg, source, probe), rtol=1e-5, atol=1e-5
        )
        ndp_loss = engine.train_step(0, batches[STEPS])
        ref_loss = reference.train_step(0, batches[STEPS])
        assert ndp_loss == pytest.approx(ref_loss, rel=1e-5)
        for table in ("big", "small"):
            weights, _ = engine.table_rows(table)
            torch.testing.assert_close(
                weights, reference.embeddings.table_weights(table), rtol=1e-5, atol=1e-5
            )


@pytest.mark.ray
@pytest.mark.slow
def test_ndp_checkpoint_exports_to_a_torchrec_dlrm_that_predicts_like_the_engine(
    ray_session, cfg, batches, tmp_path
):
    probe = batches[STEPS + 1]
    with NdpEngine(cfg) as engine:
        for step, batch in enumerate(batches[:STEPS]):
            engine.train_step(step, batch)
        write_checkpoint(tmp_path, engine.export_state(), next_step=STEPS, cfg=cfg)
        expected = engine.predict(STEPS, probe)

    state = export_checkpoint_state_dict(cfg, tmp_path)  # the newest checkpoint in the dir

    torch.testing.assert_close(torchrec_logits(cfg, state, probe), expected, rtol=1e-5, atol=1e-5)


def test_import_names_the_key_and_field_to_fix(cfg, trained_reference):
    state = export_torchrec_state_dict(cfg, trained_reference)
    wrong = dict(state)
    wrong[TABLE_KEY.format("big")] = torch.zeros(100, 8)
    with pytest.raises(
        InteropError, match=r"embedding_bags\.big\.weight: shape \(100, 8\).*num_rows"
    ):
        import_torchrec_state_dict(cfg, wrong)
    missing = {k: v for k, v in state.items() if "small" not in k}
    with pytest.raises(InteropError, match="small"):
        import_torchrec_state_dict(cfg, missing)
    extra = {**state, TABLE_KEY.format("other"): torch.zeros(3, 8)}
    with pytest.raises(InteropError, match="other"):
        import_torchrec_state_dict(cfg, extra)


def test_single_layer_top_mlp_is_refused_with_the_field():
    raw_cfg = small_config()
    from dataclasses import replace

    one_layer = replace(raw_cfg, model=replace(raw_cfg.model, top_mlp=[1]))
    with pytest.raises(InteropError, match="model.top_mlp"):
        build_torchrec_dlrm(one_layer)
