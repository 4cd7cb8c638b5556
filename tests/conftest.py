"""Test set-up: every test session gets its own workspace (Prefect home, MLflow sqlite, Ray temp, caches)."""

from __future__ import annotations

import os
import sys
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


@pytest.fixture(scope="module")
def ray_once() -> None:
    """The session's one local Ray, started by the first module that asks for it and left running to the session's
    end (each stage's `ray_session` joins it, as in the pipeline): a start costs ~10 s idle, ~40 s on a busy
    machine, and timed out now and then. Modules that use it run last (`pytest_collection_modifyitems`)."""
    from infra.ray_cluster import ray_init

    ray_init()


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules that use the session's Ray (`ray_once`) run after all others, those with a `forks` test first: a
    local Ray's gRPC threads do not survive a fork of this process (datatrove's local executor forks its Manager),
    so the forking tests and the Ray tests must not interleave. Order inside a module is kept."""
    on_ray = {item.path for item in items if "ray_once" in getattr(item, "fixturenames", ())}
    forking = {item.path for item in items if item.get_closest_marker("forks")}
    items.sort(key=lambda item: (item.path in on_ray, item.path not in forking))  # stable: file order otherwise


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked `gpu` need CUDA; without it they are skipped, as datatrove's `require_*` helpers do. A test
    marked `forks` stops the session's Ray first: the next module's `ray_once` starts it again (fits in between
    start and stop their own, as outside the tests)."""
    if item.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
    if item.get_closest_marker("forks") and _ray_up():
        sys.modules["ray"].shutdown()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _ray_up():
        sys.modules["ray"].shutdown()
