"""The code version in a stage's key: a change to a module a stage runs reruns that stage and no other; a library
upgrade reruns the stages that call it; the same code gives the same key in any process.

Run: .venv/bin/python -m pytest tests/unit/test_code_version.py -q
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infra.env import REPO_ROOT
from tasks.code_version import PACKAGES, compute_code_version, imported_names, installed_version
from tasks.refs import Ref
from tasks.stage import run_stage, stage_key
from tasks.tokenizer import TokenizerConfig

STAGES = ("tasks.data", "tasks.tokenizer", "tasks.pretrain")


@pytest.fixture
def repo_copy(tmp_path):
    """The gptflow packages copied elsewhere, to edit without touching the repo."""
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def versions(root: Path, version_of=installed_version) -> dict[str, str]:
    return {m: compute_code_version(m, root, version_of)["sha256"] for m in STAGES}


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_a_code_change_reruns_the_stages_that_run_it_and_no_other(repo_copy):
    before = versions(repo_copy)
    assert before == versions(REPO_ROOT)  # no path of the checkout is in it
    append(repo_copy / "models" / "gpt.py", "\n# a comment changes no code\n")
    assert versions(repo_copy) == before
    append(repo_copy / "models" / "gpt.py", "\n\ndef added():\n    return 1\n")
    after = versions(repo_copy)
    assert after["tasks.pretrain"] != before["tasks.pretrain"]
    assert after["tasks.data"] == before["tasks.data"] and after["tasks.tokenizer"] == before["tasks.tokenizer"]
    append(repo_copy / "tasks" / "data" / "blocks.py", "\n\nTHRESHOLD = 2\n")  # imported lazily by plan.py
    last = versions(repo_copy)
    assert last["tasks.data"] != after["tasks.data"] and last["tasks.pretrain"] == after["tasks.pretrain"]


def test_eval_task_definitions_are_code(repo_copy):
    before = compute_code_version("tasks.evaluate", repo_copy)
    assert "eval/tasks/gptflow_arc_easy.yaml" in before["modules"] and "eval/harness.py" in before["modules"]
    append(repo_copy / "eval" / "tasks" / "gptflow_arc_easy.yaml", "\nnum_fewshot: 5\n")
    assert compute_code_version("tasks.evaluate", repo_copy)["sha256"] != before["sha256"]
    assert compute_code_version("tasks.pretrain", repo_copy)["sha256"] == versions(REPO_ROOT)["tasks.pretrain"]


def test_a_library_upgrade_reruns_the_stages_that_call_it():
    before = versions(REPO_ROOT)
    assert "torch" in compute_code_version("tasks.pretrain")["libraries"]
    assert "trafilatura" in compute_code_version("tasks.data")["libraries"]  # called through datatrove
    newer = versions(REPO_ROOT, lambda dist: "99.0" if dist == "torch" else installed_version(dist))
    assert newer["tasks.pretrain"] != before["tasks.pretrain"] and newer["tasks.data"] == before["tasks.data"]


def test_the_same_code_gives_the_same_key_in_fresh_processes(tmp_path):
    script = ("import json; from tasks.stage import stage_key; from tasks.code_version import code_version; "
              "print(json.dumps({m: stage_key('s', {'a': 1}, {'x': 'y'}, code_version(m)['sha256']) "
              f"for m in {STAGES!r}}}))")
    keys = []
    for seed in ("1", "2"):  # another hash seed: any set order that leaked into the key would show
        out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)})
        keys.append(json.loads(out.stdout))
    assert keys[0] == keys[1] == {m: stage_key("s", {"a": 1}, {"x": "y"}, v) for m, v in versions(REPO_ROOT).items()}


def test_the_manifest_says_which_code_computed_the_stage(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("x")
    ref = run_stage("s", TokenizerConfig(), {"src": src}, lambda out: Ref(path=str(src)), tmp_path / "runs")
    code = json.loads(Path(ref.manifest).read_text())["code_version"]
    assert code["sha256"] == compute_code_version("tasks.tokenizer")["sha256"]
    assert {"tasks/tokenizer.py", "tasks/bpe.py", "tasks/stage.py"} <= set(code["modules"])
    assert "tasks/tracking.py" not in code["modules"] and "models/gpt.py" not in code["modules"]
    assert code["libraries"]["tokenizers"] == installed_version("tokenizers")
    assert stage_key("s", {}, {}, "a") != stage_key("s", {}, {}, "b")


def test_imports_are_read_from_the_source_relative_and_lazy_ones_included():
    tree = ast.parse("import a.b\nfrom .c import d\nfrom .. import e\n\ndef f():\n    from x.y import z\n")
    assert imported_names(tree, "pkg.sub.mod", is_package=False) == {
        "a.b", "pkg.sub.c", "pkg.sub.c.d", "pkg", "pkg.e", "x.y", "x.y.z"}
    assert imported_names(ast.parse("from . import g"), "pkg.sub", is_package=True) == {"pkg.sub", "pkg.sub.g"}
