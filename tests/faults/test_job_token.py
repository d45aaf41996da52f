"""The job's token travels to the actors through Ray and is never logged on the way.

`tests/faults/test_wire_faults.py` checks one gRPC server and client at DEBUG; this runs a
whole `NdpEngine` (actors, their servers, the workers' clients) and searches the driver's
log records and output and every file of the Ray session's log directory for the token.
"""

from __future__ import annotations

import logging
import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "checkpoint"))
from jobs import tiny_job  # noqa: E402

from ndp.coordinator import NdpEngine  # noqa: E402
from ndp.data.loader import build_datasets  # noqa: E402
from ndp.train_loop import training_batches  # noqa: E402

pytestmark = [pytest.mark.ray]


def test_the_job_token_reaches_no_log_record_output_or_ray_log_file(
    ray_session, monkeypatch, caplog, capfd
):
    token = f"ndp-test-token-{secrets.token_hex(16)}"
    monkeypatch.setattr(secrets, "token_urlsafe", lambda nbytes=None: token)
    caplog.set_level(logging.DEBUG)
    cfg = tiny_job(enabled=False)
    data = build_datasets(cfg)[0]
    with NdpEngine(cfg) as engine:
        assert engine._token == token  # the job's token is the one searched for below
        for step, batch in training_batches(data, cfg.train.batch_size, 2):
            engine.train_step(step, batch)
        assert all(stats["applied_step"] == 1 for stats in engine.node_stats())
    out, err = capfd.readouterr()
    logged = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    for text, where in ((logged, "log records"), (out, "stdout"), (err, "stderr")):
        assert token not in text, f"the token leaked into {where}"
    session = Path(ray_session._private.worker._global_node.get_session_dir_path())
    log_files = [path for path in (session / "logs").rglob("*") if path.is_file()]
    assert log_files
    leaked = [path.name for path in log_files if token.encode() in path.read_bytes()]
    assert leaked == [], f"the token leaked into Ray log files {leaked}"


def test_every_job_gets_its_own_token_and_another_job_s_token_is_refused(ray_session):
    from storage_node.auth import UnauthenticatedError
    from storage_node.client import connect

    cfg = tiny_job(enabled=False)
    with NdpEngine(cfg) as first:
        first_token = first._token
    with NdpEngine(cfg) as second:
        assert second._token != first_token
        assert len(second._token) >= 32  # secrets.token_urlsafe(32): 256 bits
        stale = connect(second.node_addresses[0], cfg, token=first_token)
        try:
            with pytest.raises(UnauthenticatedError):
                stale.prefetch(0, {})
        finally:
            stale.close()
