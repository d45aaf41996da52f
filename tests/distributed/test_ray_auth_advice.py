"""What ndp says when joining a Ray cluster fails on Ray's token authentication.

The refusals that need a running cluster (RAY_AUTH_MODE unset, a wrong token) are in
`test_cluster_cli.py`; a missing token in token mode fails before Ray connects, so it runs
here against no cluster at all, in a subprocess (never `ray.init` in the test process).
"""

from __future__ import annotations

import os
import subprocess
import sys

from ndp.ray_local import auth_advice

JOIN = "from ndp.ray_local import init_local_ray; init_local_ray(address='127.0.0.1:9')"


def test_token_mode_without_a_token_is_refused_with_where_to_put_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="token")  # a home without ~/.ray/auth_token
    done = subprocess.run(
        [sys.executable, "-c", JOIN], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ndp.errors.ConfigError: cluster.address 127.0.0.1:9: ")
    assert "no Ray token (~/.ray/auth_token is missing)" in last
    assert not (tmp_path / ".ray").exists()  # joining never makes a token up


def test_advice_without_token_mode_says_to_set_it(tmp_path):
    for environ, shown in (({}, "unset"), ({"RAY_AUTH_MODE": "disabled"}, "disabled")):
        advice = auth_advice("10.0.0.1:6379", environ, tmp_path)
        assert advice.startswith("cluster.address 10.0.0.1:6379: ")
        assert f"RAY_AUTH_MODE is {shown} here: set RAY_AUTH_MODE=token" in advice
        assert "~/.ray/auth_token" in advice and "RAY_AUTH_TOKEN" in advice


def test_advice_in_token_mode_names_where_the_token_was_read(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("abc")
    by_path = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert f"refused the token in {token_file}," in auth_advice("h:1", by_path, tmp_path)
    missing = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "nowhere")}
    assert "/nowhere is missing" in auth_advice("h:1", missing, tmp_path)
    by_value = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "abc", "RAY_AUTH_TOKEN_PATH": "x"}
    assert "refused the token in RAY_AUTH_TOKEN," in auth_advice("h:1", by_value, tmp_path)
