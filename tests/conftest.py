"""Test set-up: every test session gets its own workspace (Prefect home, MLflow sqlite, Ray temp, caches)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports prefect, mlflow or ray: a throwaway workspace, unless the caller chose one.
if "GPTFLOW_HOME" not in os.environ:
    os.environ["GPTFLOW_HOME"] = tempfile.mkdtemp(prefix="gptflow-test-")
# A fresh, empty home folder: the end-to-end test checks that nothing was written into it.
if "GPTFLOW_TEST_HOME" not in os.environ:
    os.environ["GPTFLOW_TEST_HOME"] = tempfile.mkdtemp(prefix="gptflow-home-")
    os.environ["HOME"] = os.environ["GPTFLOW_TEST_HOME"]
for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS", "PREFECT_HOME", "HF_HOME"):
    if var != "MLFLOW_TRACKING_URI" or os.environ.get("GPTFLOW_TEST_KEEP_URIS") != "1":
        os.environ.pop(var, None)

from infra.env import setup_env  # noqa: E402

setup_env()

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def workspace() -> Path:
    return Path(os.environ["GPTFLOW_HOME"])


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked `gpu` need CUDA; without it they are skipped, as datatrove's `require_*` helpers do."""
    if item.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
