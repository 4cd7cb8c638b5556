"""Safety (issue 19, item 6): no code loads a pickle through `torch.load`. (That credentials in the environment
reach no MLflow store, artifact or stage folder is checked on the tiny pipeline's run:
tests/e2e/test_pipeline_secrets.py.)
Run: `.venv/bin/python -m pytest tests/unit/test_secrets.py -q`.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_no_code_loads_a_pickle_through_torch_load():
    """Weights are safetensors; anything read with `torch.load` must say `weights_only=True` (no pickled code)."""
    offenders = []
    for path in REPO.rglob("*.py"):
        if any(part.startswith(".") or part in ("node_modules", "build") for part in path.relative_to(REPO).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): text.find(")", m.end()) + 1]
            if "weights_only=True" not in call and path.name != Path(__file__).name:
                offenders.append(f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}")
    assert offenders == []


def test_the_torch_load_check_sees_an_unsafe_call(tmp_path):
    """The check above can fail: the same pattern finds a bare `torch.load(` and accepts a `weights_only=True` one."""
    bad, good = "state = torch.load(path)\n", "state = torch.load(path, weights_only=True)\n"
    unsafe = [t for t in (bad, good) for m in re.finditer(r"torch\.load\(", t)
              if "weights_only=True" not in t[m.start(): t.find(")", m.end()) + 1]]
    assert unsafe == [bad]
