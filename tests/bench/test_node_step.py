"""`python -m ndp.bench.node_step`: a node's step in-process next to FBGEMM's, at tiny size."""

from __future__ import annotations

import json

from ndp.bench.node_step import main


def test_node_step_reports_the_node_and_fbgemm_per_pooling(tmp_path, capsys):
    out = tmp_path / "node_step.json"
    assert (
        main(["--pooling", "1", "3", "--rows-cap", "300", "--steps", "5", "--json", str(out)]) == 0
    )
    results = json.loads(out.read_text())["results"]
    assert [r["pooling"] for r in results] == [1.0, 3.0]
    for result in results:
        assert result["lookup_ms"] >= 0 and result["push_update_ms"] >= 0
        assert result["fbgemm_ms"] >= 0
    assert "node / FBGEMM" in capsys.readouterr().out
