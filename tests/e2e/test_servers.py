"""Past one machine: with PREFECT_API_URL and MLFLOW_TRACKING_URI set, a stage runs against a real Prefect
server and a real MLflow server (started here by `gptflow serve` on 127.0.0.1), not the embedded defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from infra.env import REPO_ROOT as REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    home = tmp_path_factory.mktemp("servers")
    env = {**os.environ, "GPTFLOW_HOME": str(home)}
    serve = [sys.executable, "-m", "flows.cli", "serve"]
    try:
        for name, port in (("prefect", "4317"), ("mlflow", "5317")):
            started = subprocess.run([*serve, name, "--port", port], env=env, capture_output=True, text=True,
                                     timeout=180, cwd=REPO)
            assert started.returncode == 0, started.stdout + started.stderr
        yield home, {"PREFECT_API_URL": "http://127.0.0.1:4317/api", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5317"}
    finally:
        subprocess.run([*serve, "stop"], env=env, timeout=120, cwd=REPO)


def test_a_stage_runs_against_real_servers(servers, tmp_path):
    home, urls = servers
    corpus = REPO / "data" / "text" / "c4_demo.jsonl.gz"
    env = {**os.environ, **urls, "GPTFLOW_HOME": str(tmp_path / "client")}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "tokenizer", "--input", str(corpus), "--set",
                          "vocab_size=512"], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    # the run is in the MLflow server's store, not in a local sqlite file
    assert not (tmp_path / "client" / "mlflow.db").exists()
    req = urllib.request.Request(f"{urls['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/runs/search", method="POST",
                                 data=json.dumps({"experiment_ids": ["1"]}).encode(),
                                 headers={"Content-Type": "application/json"})
    runs = json.loads(urllib.request.urlopen(req, timeout=30).read())["runs"]
    assert any(r["info"]["run_name"] == "tokenizer" for r in runs)
    # and the flow run is on the Prefect server
    req = urllib.request.Request(f"{urls['PREFECT_API_URL']}/flow_runs/filter", method="POST", data=b"{}",
                                 headers={"Content-Type": "application/json"})
    flow_runs = json.loads(urllib.request.urlopen(req, timeout=30).read())
    assert any(fr["state_type"] == "COMPLETED" for fr in flow_runs)
