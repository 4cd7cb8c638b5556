"""Safety (issue 19, item 6): credentials set in the environment reach no MLflow store, artifact or stage folder;
no code loads a pickle through `torch.load`.

The secret test runs the data stage (the bundled WET sample and a tenth of the C4 demo text, filter run only) and the
tokenizer stage through their Prefect tasks' bodies, under a parent pipeline run, into a fresh sqlite MLflow store,
with fake credentials in the environment, then reads every file those runs wrote as bytes.
Run: `.venv/bin/python -m pytest tests/unit/test_secrets.py -q`.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Names the tools read credentials from (AWS for s3://, Hugging Face, MLflow's server auth, Weights & Biases, ...).
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "WANDB_API_KEY", "PREFECT_API_KEY")


def files_holding(marker: bytes, *folders: Path) -> list[str]:
    found = []
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file() and marker in p.read_bytes():
                found.append(str(p))
            elif p.is_file() and p.suffix == ".gz":  # datatrove's logs, stats and documents are gzipped too
                import gzip

                try:
                    if marker in gzip.decompress(p.read_bytes()):
                        found.append(f"{p} (gzipped)")
                except (OSError, EOFError):
                    pass
    return found


@pytest.mark.slow  # two real stages and a fresh MLflow store: ~25 CPU-s, most of it imports and the tokenizer
def test_fake_credentials_in_the_environment_reach_no_store_artifact_or_run_folder(
        sqlite_mlflow, monkeypatch, tmp_path):
    import mlflow

    from flows.stages import data_task, tokenizer_task
    from tasks import tracking
    from tasks.data import DataConfig
    from tasks.tokenizer import TokenizerConfig

    marker = f"fake-secret-{secrets.token_hex(12)}"
    for var in SECRET_VARS:
        monkeypatch.setenv(var, marker)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA" + marker)
    root = tmp_path / "runs"
    data = DataConfig(inputs=["data/crawl/CC-MAIN-2016-50_sparkwarc-sample.warc.wet.gz"],
                      text_sources={"data/text/c4_demo.jsonl.gz": 0.1}, tasks=1, workers=1, exact_dedup=False, minhash=False, sentence_dedup=False)
    tok = TokenizerConfig(vocab_size=300, shard_tokens=20_000, val_fraction=0.2)
    with tracking.pipeline_run("secrets", {"data": data.model_dump(mode="json")}, {"preset": "test"}) as parent:
        corpus = data_task.fn(data, str(root), parent)
        tokenizer_task.fn(tok, corpus, str(root), parent)

    store = tracking.sqlite_file(sqlite_mlflow)
    artifacts = Path(mlflow.get_experiment_by_name(tracking.EXPERIMENT).artifact_location.removeprefix("file://"))
    assert store is not None and store.is_file() and any(artifacts.rglob("manifest.json"))
    assert corpus.counts["totals"]["docs_out"] > 0
    assert files_holding(marker.encode(), store.parent, artifacts, root) == []


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


@pytest.mark.parametrize("var", ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY"])
def test_the_secret_scan_finds_a_marker_written_anywhere(tmp_path, var):
    """The scan above can fail: a marker in a plain or a gzipped file is found."""
    import gzip

    marker = f"{var}-{secrets.token_hex(8)}".encode()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "params.txt").write_bytes(b"x=" + marker)
    (tmp_path / "b.log.gz").write_bytes(gzip.compress(b"env: " + marker))
    assert len(files_holding(marker, tmp_path)) == 2
