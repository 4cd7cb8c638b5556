"""Safety (issue 19, item 6): credentials set in the environment reach no MLflow store, artifact or stage folder.

The tiny pipeline's one run (`first_run`, tests/e2e/conftest.py) has a fake credential in every variable the tools
read credentials from; every file of its MLflow store, its artifacts and its stage folders (all twelve stages)
is read as bytes, gzipped ones unpacked. The scan itself is shown to find a marker (the fast test below).
Run: `.venv/bin/python -m pytest tests/e2e/test_pipeline_secrets.py -q` (the tiny pipeline's run: ~5 min).
"""

from __future__ import annotations

import gzip
import secrets
from pathlib import Path

import pytest


def files_holding(marker: bytes, *places: Path) -> list[str]:
    """Every file of `places` (files, or folders read recursively) whose bytes, or gunzipped bytes, hold `marker`."""
    found = []
    for place in places:
        for p in [place] if place.is_file() else place.rglob("*"):
            if p.is_file() and marker in p.read_bytes():
                found.append(str(p))
            elif p.is_file() and p.suffix == ".gz":  # datatrove's logs, stats and documents are gzipped too
                try:
                    if marker in gzip.decompress(p.read_bytes()):
                        found.append(f"{p} (gzipped)")
                except (OSError, EOFError):
                    pass
    return found


@pytest.mark.e2e
@pytest.mark.ray
@pytest.mark.slow
def test_fake_credentials_in_the_environment_reach_no_store_artifact_or_stage_folder(first_run, fake_secret):
    import mlflow

    from tasks import tracking

    store = tracking.sqlite_file(mlflow.get_tracking_uri())
    artifacts = Path(mlflow.get_experiment_by_name(tracking.EXPERIMENT).artifact_location.removeprefix("file://"))
    stages = [Path(d) for d in first_run["stage_dirs"].values()]
    assert store is not None and store.is_file() and any(artifacts.rglob("manifest.json"))
    assert {"data", "tokenizer", "pretrain", "sft", "dpo", "reward", "ppo", "decontam"} <= set(first_run["stage_dirs"])
    assert all((d / "manifest.json").is_file() for d in stages), first_run["stage_dirs"]
    store_files = [store, *store.parent.glob(f"{store.name}-*")]  # with sqlite's -wal and -journal files
    assert files_holding(fake_secret.encode(), *store_files, artifacts, *stages) == []


@pytest.mark.parametrize("var", ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY"])
def test_the_secret_scan_finds_a_marker_written_anywhere(tmp_path, var):
    """The scan above can fail: a marker in a plain or a gzipped file is found."""
    marker = f"{var}-{secrets.token_hex(8)}".encode()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "params.txt").write_bytes(b"x=" + marker)
    (tmp_path / "b.log.gz").write_bytes(gzip.compress(b"env: " + marker))
    (tmp_path / "c.db").write_bytes(b"\0" + marker)
    assert len(files_holding(marker, tmp_path / "a", tmp_path / "b.log.gz", tmp_path / "c.db")) == 3
    assert len(files_holding(marker, tmp_path)) == 3
