"""The way users run gptflow, end to end: `python -m infra.check_deployments` serves Prefect, MLflow, a Ray head and
a worker in a fresh workspace, runs `prefect deploy --all` from the repo root, starts the data deployment through
the API as the UI's Run button does, waits for Completed and finds the run's MLflow run on the MLflow server; the
deployments' schedules and parameter schemas on the server are checked too.

    python -m pytest tests/e2e/test_deployment_run.py -x -q      (~2-4 min on 2 cores)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from infra.env import REPO_ROOT as REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_deployment_run_from_the_api_completes_on_the_worker(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-m", "infra.check_deployments", "--workspace", str(tmp_path / "home"),
                          "--timeout", "600"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout[out.stdout.index("=== deployment check ==="):]
    assert "llm-pipeline/tiny" in summary and "data/data" in summary  # prefect.yaml's deployments, on the server
    # their schedules and parameter schemas as prefect.yaml says, and a mistyped field refused by the server
    assert "2 scheduled): as prefect.yaml says; a mistyped parameter is refused naming the field" in summary, summary
    assert "of data/data: Completed" in summary
    assert "MLflow runs on the server for it: 1 (data:FINISHED)" in summary
    # everything stopped: no state left, and the worker's log shows it picked the run up
    assert not list((tmp_path / "home" / "services").glob("*/state.json"))
