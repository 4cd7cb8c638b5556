"""The import boundaries of docs/architecture.md are ruff rules: code that crosses one fails `make lint`.

Each case pipes one import through `ruff check --stdin-filename <file>`, so ruff applies the configuration of the
folder that file would live in (pyproject.toml, or the folder's own ruff.toml). Run:
`.venv/bin/python -m pytest tests/unit/test_lint.py -q`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUFF = Path(sys.executable).parent / "ruff"


def banned(filename: str, source: str) -> bool:
    out = subprocess.run([str(RUFF), "check", "--select", "TID251", "--output-format", "concise", "--stdin-filename",
                          filename, "-"], input=source, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode in (0, 1), out.stderr
    return "TID251" in out.stdout


@pytest.mark.parametrize("filename, source", [
    ("models/gpt.py", "import mlflow\n"),
    ("models/gpt.py", "import ray.train\n"),
    ("models/gpt.py", "from prefect import flow\n"),
    ("models/gpt.py", "from tasks.refs import Ref\n"),
    ("models/gpt.py", "from eval.lm import GPTFlowLM\n"),
    ("eval/lm.py", "from mlflow.tracking import MlflowClient\n"),
    ("eval/lm.py", "import ray\n"),
    ("eval/lm.py", "from flows.stages import eval_task\n"),
    ("infra/env.py", "from tasks.stage import run_stage\n"),
    ("infra/env.py", "import mlflow\n"),
    ("tasks/sft.py", "import mlflow\n"),
    ("tasks/sft.py", "from prefect import task\n"),
    ("tasks/pretrain.py", "from flows.presets import tiny\n"),
    ("flows/stages.py", "import mlflow\n"),
])
def test_a_crossed_boundary_fails_the_lint(filename, source):
    assert banned(filename, source)


@pytest.mark.parametrize("filename, source", [
    ("tasks/tracking.py", "import mlflow\nfrom prefect.runtime import flow_run\n"),
    ("tasks/pyfunc_model.py", "import mlflow.pyfunc\n"),
    ("tasks/pyfunc_classifier.py", "import mlflow.pyfunc\n"),
    ("flows/stages.py", "from prefect import flow\nfrom flows.presets import tiny\n"),
    ("tasks/pretrain.py", "import ray.train\nfrom models.gpt import GPT\nfrom eval.lm import GPTFlowLM\n"),
    ("eval/lm.py", "from models.gpt import GPT\n"),
    ("infra/ray_cluster.py", "import ray\n"),
    ("tests/unit/test_x.py", "import mlflow\nfrom flows.pipeline import llm_pipeline_flow\n"),
])
def test_an_allowed_import_passes(filename, source):
    assert not banned(filename, source)
