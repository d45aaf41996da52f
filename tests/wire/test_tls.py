"""Optional TLS: certificates from config paths; a TLS client works, a plaintext one fails."""

from __future__ import annotations

import shutil

import pytest
from tls_certs import openssl

from gpu_worker.storage_client import StorageClient, StorageNodeUnavailableError
from ndp.config import config_from_dict
from ndp.errors import ConfigError
from storage_node.server import serve
from storage_node.tls import TlsFiles
from wire.tiny_node import TOKEN, random_bags, random_grads

MODEL = {
    "bottom_mlp": [8, 8],
    "top_mlp": [8, 1],
    "tables": [{"name": "t", "num_rows": 10, "embedding_dim": 8, "features": ["f"]}],
}

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl CLI is needed to make test certificates"
)


@pytest.fixture(scope="module")
def certs(tls_certs) -> TlsFiles:
    """The session's test CA and node certificate (tests/conftest.py)."""
    return tls_certs


@pytest.fixture()
def tls_node(cfg, make_core, certs):
    core = make_core(cfg)
    server = serve(core, host="127.0.0.1", token=TOKEN, max_message_bytes=1 << 24, tls=certs)
    yield core, server
    server.stop(grace_s=None)


def test_tls_client_with_the_ca_runs_steps(tls_node, certs):
    core, server = tls_node
    client_side = TlsFiles(cert=None, key=None, ca=certs.ca)
    with StorageClient(server.address, token=TOKEN, timeout_s=30, tls=client_side) as client:
        client.lookup(0, 0, random_bags(4, seed=0))
        assert client.push_gradients(0, 0, random_grads(4, seed=0)) is True
        assert client.health()["applied_step"] == 0
    assert core.applied_step == 0


def test_plaintext_client_is_refused_by_a_tls_node(tls_node):
    core, server = tls_node
    with StorageClient(server.address, token=TOKEN, timeout_s=5) as plaintext:
        with pytest.raises(StorageNodeUnavailableError):
            plaintext.health()
        with pytest.raises(StorageNodeUnavailableError):
            plaintext.lookup(0, 0, random_bags(4, seed=0))
    assert core.applied_step == -1


def test_client_trusting_another_ca_is_refused(tls_node, tmp_path):
    _, server = tls_node
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=another CA",
        "-keyout",
        "other.key",
        "-out",
        "other.pem",
        cwd=tmp_path,
    )
    wrong_ca = TlsFiles(cert=None, key=None, ca=str(tmp_path / "other.pem"))
    with StorageClient(server.address, token=TOKEN, timeout_s=5, tls=wrong_ca) as client:
        with pytest.raises(StorageNodeUnavailableError):
            client.health()


def test_tls_files_come_from_the_cluster_section(certs):
    cfg = config_from_dict(
        {
            "model": MODEL,
            "data": {"source": "synthetic"},
            "cluster": {"tls_cert": certs.cert, "tls_key": certs.key, "tls_ca": certs.ca},
        }
    )
    assert TlsFiles.from_cluster(cfg.cluster) == certs
    assert (
        TlsFiles.from_cluster(
            config_from_dict({"model": MODEL, "data": {"source": "synthetic"}}).cluster
        )
        is None
    )


def test_partial_tls_settings_name_the_missing_fields(certs):
    with pytest.raises(ConfigError, match="tls_key, tls_ca"):
        config_from_dict(
            {"model": MODEL, "data": {"source": "synthetic"}, "cluster": {"tls_cert": certs.cert}}
        )


def test_missing_certificate_file_says_which_setting_to_fix(cfg, make_core, certs, tmp_path):
    files = TlsFiles(cert=str(tmp_path / "absent.pem"), key=certs.key, ca=certs.ca)
    with pytest.raises(ConfigError, match="cluster.tls_cert"):
        serve(make_core(cfg), host="127.0.0.1", token=TOKEN, max_message_bytes=1 << 20, tls=files)
