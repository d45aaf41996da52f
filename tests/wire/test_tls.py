"""Optional TLS: certificates from config paths; a TLS client works, a plaintext one fails.
With client certificates configured (mutual TLS), a client without one from the CA fails."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from tls_certs import make_ca, make_client_cert

from ndp.config import config_from_dict
from ndp.errors import ConfigError
from storage_node.client import StorageClient, StorageNodeUnavailableError
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
    assert core.applied_step == 0


def test_plaintext_client_is_refused_by_a_tls_node(tls_node):
    core, server = tls_node
    with StorageClient(server.address, token=TOKEN, timeout_s=5) as plaintext:
        with pytest.raises(StorageNodeUnavailableError):
            plaintext.lookup(0, 0, random_bags(4, seed=0), train=False)
        with pytest.raises(StorageNodeUnavailableError):
            plaintext.lookup(0, 0, random_bags(4, seed=0))
    assert core.applied_step == -1


def test_client_trusting_another_ca_is_refused(tls_node, tmp_path):
    _, server = tls_node
    other_ca, _ = make_ca(tmp_path, "other", subject="another CA")
    wrong_ca = TlsFiles(cert=None, key=None, ca=str(other_ca))
    with StorageClient(server.address, token=TOKEN, timeout_s=5, tls=wrong_ca) as client:
        with pytest.raises(StorageNodeUnavailableError):
            client.lookup(0, 0, random_bags(4, seed=0), train=False)


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


# --------------------------------------------------------------------------- mutual TLS


@pytest.fixture(scope="module")
def client_cert(certs, tmp_path_factory) -> tuple[str, str]:
    """A client certificate signed by the test CA: (cert, key)."""
    ca = Path(certs.ca)
    return make_client_cert(
        tmp_path_factory.mktemp("client"), "client", ca_cert=ca, ca_key=ca.with_suffix(".key")
    )


@pytest.fixture()
def mutual_tls_node(cfg, make_core, certs):
    core = make_core(cfg)
    server = serve(
        core,
        host="127.0.0.1",
        token=TOKEN,
        max_message_bytes=1 << 24,
        tls=dataclasses.replace(certs, require_client_auth=True),
    )
    yield core, server
    server.stop(grace_s=None)


def test_mutual_tls_lets_in_a_client_with_a_certificate_from_the_ca(
    mutual_tls_node, certs, client_cert
):
    core, server = mutual_tls_node
    client_side = TlsFiles(cert=client_cert[0], key=client_cert[1], ca=certs.ca)
    with StorageClient(server.address, token=TOKEN, timeout_s=30, tls=client_side) as client:
        client.lookup(0, 0, random_bags(4, seed=0))
        assert client.push_gradients(0, 0, random_grads(4, seed=0)) is True
    assert core.applied_step == 0


def test_mutual_tls_refuses_a_client_without_a_certificate(mutual_tls_node, certs):
    core, server = mutual_tls_node
    no_cert = TlsFiles(cert=None, key=None, ca=certs.ca)
    with StorageClient(server.address, token=TOKEN, timeout_s=5, tls=no_cert) as client:
        with pytest.raises(StorageNodeUnavailableError):
            client.lookup(0, 0, random_bags(4, seed=0), train=False)
        with pytest.raises(StorageNodeUnavailableError):
            client.lookup(0, 0, random_bags(4, seed=0))
    assert core.applied_step == -1


def test_mutual_tls_refuses_a_client_certificate_from_another_ca(mutual_tls_node, certs, tmp_path):
    core, server = mutual_tls_node
    other_ca, other_key = make_ca(tmp_path, "other", subject="another CA")
    cert, key = make_client_cert(tmp_path, "intruder", ca_cert=other_ca, ca_key=other_key)
    intruder = TlsFiles(cert=cert, key=key, ca=certs.ca)  # trusts the node, not trusted by it
    with StorageClient(server.address, token=TOKEN, timeout_s=5, tls=intruder) as client:
        with pytest.raises(StorageNodeUnavailableError):
            client.lookup(0, 0, random_bags(4, seed=0), train=False)
        with pytest.raises(StorageNodeUnavailableError):
            client.push_gradients(0, 0, random_grads(4, seed=0))
    assert core.applied_step == -1


def test_client_certificates_in_the_cluster_section_make_nodes_require_them(certs, client_cert):
    cluster = config_from_dict(
        {
            "model": MODEL,
            "data": {"source": "synthetic"},
            "cluster": {
                "tls_cert": certs.cert,
                "tls_key": certs.key,
                "tls_ca": certs.ca,
                "tls_client_cert": client_cert[0],
                "tls_client_key": client_cert[1],
            },
        }
    ).cluster
    assert TlsFiles.from_cluster(cluster) == dataclasses.replace(certs, require_client_auth=True)
    assert TlsFiles.client_from_cluster(cluster) == TlsFiles(
        cert=client_cert[0], key=client_cert[1], ca=certs.ca
    )


def test_without_client_certificates_nodes_do_not_require_them_and_clients_send_none(certs):
    cluster = config_from_dict(
        {
            "model": MODEL,
            "data": {"source": "synthetic"},
            "cluster": {"tls_cert": certs.cert, "tls_key": certs.key, "tls_ca": certs.ca},
        }
    ).cluster
    assert TlsFiles.from_cluster(cluster).require_client_auth is False
    assert TlsFiles.client_from_cluster(cluster) == TlsFiles(cert=None, key=None, ca=certs.ca)


def test_a_client_certificate_without_its_key_or_without_server_tls_names_what_is_missing(
    certs, client_cert
):
    def cluster(**fields):
        return config_from_dict(
            {"model": MODEL, "data": {"source": "synthetic"}, "cluster": fields}
        )

    with pytest.raises(ConfigError, match="set tls_client_key"):
        cluster(
            tls_cert=certs.cert, tls_key=certs.key, tls_ca=certs.ca, tls_client_cert=client_cert[0]
        )
    with pytest.raises(ConfigError, match="set tls_cert, tls_key, tls_ca"):
        cluster(tls_client_cert=client_cert[0], tls_client_key=client_cert[1])


def test_partial_tls_settings_name_the_missing_fields(certs):
    with pytest.raises(ConfigError, match="tls_key, tls_ca"):
        config_from_dict(
            {"model": MODEL, "data": {"source": "synthetic"}, "cluster": {"tls_cert": certs.cert}}
        )


def test_missing_certificate_file_says_which_setting_to_fix(cfg, make_core, certs, tmp_path):
    files = TlsFiles(cert=str(tmp_path / "absent.pem"), key=certs.key, ca=certs.ca)
    with pytest.raises(ConfigError, match="cluster.tls_cert"):
        serve(make_core(cfg), host="127.0.0.1", token=TOKEN, max_message_bytes=1 << 20, tls=files)
