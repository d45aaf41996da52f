"""With cluster.tls_* set, a whole ndp job runs over TLS and refuses plaintext."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_equivalence import BATCH, tiny_config
from tls_certs import make_client_cert

from ndp.coordinator import NdpEngine
from ndp.data.loader import build_datasets
from ndp.reference import ReferenceEngine
from storage_node.client import StorageClient, StorageNodeUnavailableError
from storage_node.tls import TlsFiles

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
                plaintext.prefetch(0, {})


def test_a_job_with_mutual_tls_trains_and_its_nodes_refuse_a_client_without_a_certificate(
    ray_session, tls_certs, tmp_path
):
    ca = Path(tls_certs.ca)
    client_cert, client_key = make_client_cert(
        tmp_path, "worker", ca_cert=ca, ca_key=ca.with_suffix(".key")
    )
    base = tiny_config("rowwise_adagrad")
    cfg = dataclasses.replace(
        base,
        cluster=dataclasses.replace(
            base.cluster,
            tls_cert=tls_certs.cert,
            tls_key=tls_certs.key,
            tls_ca=tls_certs.ca,
            tls_client_cert=client_cert,
            tls_client_key=client_key,
        ),
    )
    batches = list(build_datasets(cfg)[0].batches(BATCH))[:2]
    reference = ReferenceEngine(cfg)
    expected = [reference.train_step(step, b) for step, b in enumerate(batches)]

    with NdpEngine(cfg) as engine:  # workers and coordinator present the client certificate
        losses = [engine.train_step(step, b) for step, b in enumerate(batches)]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)

        no_cert = TlsFiles(cert=None, key=None, ca=tls_certs.ca)
        tcp_address = engine.node_addresses[0]["tcp"]
        with StorageClient(tcp_address, token="any", timeout_s=5, tls=no_cert) as client:
            with pytest.raises(StorageNodeUnavailableError):
                client.prefetch(0, {})
