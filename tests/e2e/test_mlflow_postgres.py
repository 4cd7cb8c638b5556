"""Past one machine: MLflow's tracking server on a real PostgreSQL server holds a stage's runs and the registry.

A throwaway PostgreSQL (Debian's `postgresql`: `initdb`, `pg_ctl`) runs in a temp folder on a free port of
127.0.0.1, and `gptflow serve mlflow --backend-store-uri postgresql://...` (infra.services) against it
(tests/e2e/conftest.py, shared with the browser test). The tokenizer stage runs against the server; a tiny model
is registered with aliases `candidate` and `champion`; the test reads both back through the MLflow client and
straight from PostgreSQL with `psql`.

    .venv/bin/python -m pytest tests/e2e/test_mlflow_postgres.py -x -q     # ~40 s; skipped without PostgreSQL
"""

from __future__ import annotations

import subprocess

import pytest

from infra.env import DATA_DIR
from tests.e2e.conftest import tracking_to

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # slow: PostgreSQL and an MLflow server start (~20 s idle)


def test_runs_and_registry_live_in_postgres(postgres, mlflow_server, registered, tmp_path):
    from mlflow import MlflowClient

    from flows.stages import tokenizer_task
    from tasks import tracking
    from tasks.refs import CorpusRef
    from tasks.tokenizer import TokenizerConfig

    url, pg = mlflow_server
    assert pg == postgres  # the server's store is this PostgreSQL, not the sqlite fallback
    corpus = CorpusRef(path=str(DATA_DIR / "text" / "c4_demo.jsonl.gz"))
    with tracking_to(url):
        assert tracking.tracking_uri() == url
        tok = tokenizer_task.fn(TokenizerConfig(vocab_size=512), corpus, str(tmp_path / "stages"))

    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("llm-pipeline").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert {"tokenizer", "registry"} <= by_name.keys()
    assert by_name["tokenizer"].data.params["vocab_size"] == "512" and tok.run_id == by_name["tokenizer"].info.run_id
    version = client.get_model_version_by_alias(registered.name, "champion")
    assert version.version == str(registered.version) and version.run_id == registered.run_id
    assert set(version.aliases) == {"candidate", "champion"} and version.tags["eval_status"] == "passed"

    # The same rows, read from PostgreSQL itself: nothing went to a sqlite file or a local store.
    def sql(query: str) -> list[str]:
        out = subprocess.run([*postgres.psql, "-c", query], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert {"tokenizer", "registry"} <= set(sql("SELECT name FROM runs"))
    assert CorpusRef.dataset_name in sql("SELECT name FROM datasets")  # the corpus, the tokenizer's input (lineage)
    assert sql(f"SELECT value FROM params WHERE run_uuid = '{tok.run_id}' AND key = 'vocab_size'") == ["512"]
    assert sorted(sql(f"SELECT alias || '=' || version FROM registered_model_aliases WHERE name = '{registered.name}'")) \
        == [f"candidate={registered.version}", f"champion={registered.version}"]
    assert sql(f"SELECT run_id FROM model_versions WHERE name = '{registered.name}'") == [registered.run_id]
