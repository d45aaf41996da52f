"""With cluster.tls_* set, a whole ndp job runs over TLS and refuses plaintext."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_equivalence import BATCH, tiny_config

from gpu_worker.storage_client import StorageClient, StorageNodeUnavailableError
from ndp.coordinator import NdpEngine
from ndp.data.loader import build_datasets
from ndp.reference import ReferenceEngine

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_job_with_tls_trains_like_the_reference_and_its_nodes_refuse_plaintext(
    ray_session, tls_certs
):
    base = tiny_config("rowwise_adagrad")
    cfg = dataclasses.replace(
        base,
        cluster=dataclasses.replace(
            base.cluster, tls_cert=tls_certs.cert, tls_key=tls_certs.key, tls_ca=tls_certs.ca
        ),
    )
    batches = list(build_datasets(cfg)[0].batches(BATCH))[:3]
    reference = ReferenceEngine(cfg)
    expected = [reference.train_step(step, b) for step, b in enumerate(batches)]

    with NdpEngine(cfg) as engine:
        losses = [engine.train_step(step, b) for step, b in enumerate(batches)]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)

        tcp_address = engine.node_addresses[0]["tcp"]
        with StorageClient(tcp_address, token="any", timeout_s=5) as plaintext:
            with pytest.raises(StorageNodeUnavailableError):
                plaintext.health()
