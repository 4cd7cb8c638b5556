"""Past one machine: MLflow's tracking server on a real PostgreSQL server holds a stage's runs and the registry.

A throwaway PostgreSQL (Debian's `postgresql`: `initdb`, `pg_ctl`) is started in a temp folder on a free port of
127.0.0.1; `gptflow serve mlflow --backend-store-uri postgresql://...` (infra.services) runs against it; the
tokenizer stage runs and a tiny model is registered with two aliases; the test reads them back through the MLflow
client and straight from PostgreSQL with `psql`.

    .venv/bin/python -m pytest tests/e2e/test_mlflow_postgres.py -x -q     # ~30 s; skipped without PostgreSQL
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from infra import services
from infra.env import DATA_DIR

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # slow: two servers start (~20 s on 2 cores)
MODEL = "gpt-pg-test"


def pg_bin(tool: str) -> str | None:
    """Debian puts the server tools in /usr/lib/postgresql/<major>/bin, not on PATH."""
    found = shutil.which(tool) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run the server tools as Debian's `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1:<free port> with an empty database `mlflow`; yields (uri, psql argv)."""
    tools = {t: pg_bin(t) for t in ("initdb", "pg_ctl", "psql")}
    if None in tools.values():
        pytest.skip(f"PostgreSQL not installed (missing {[t for t, p in tools.items() if p is None]}): "
                    "apt-get install -y postgresql")
    # Not pytest's tmp_path: its parents are root-only, and the server runs as `postgres` when we are root.
    folder = Path(tempfile.mkdtemp(prefix="gptflow-pg-"))
    data, port = folder / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    run = lambda cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # noqa: E731
    init = run(as_postgres([tools["initdb"], "-D", str(data), "-U", "gptflow", "--auth=trust", "--no-sync",
                            "-E", "UTF8", "--no-locale"]))
    assert init.returncode == 0, init.stderr
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
    up = run(as_postgres([tools["pg_ctl"], "-D", str(data), "-l", str(folder / "server.log"), "-o", opts, "-w",
                          "start"]))
    assert up.returncode == 0, up.stdout + up.stderr + (folder / "server.log").read_text(errors="replace")
    psql = [tools["psql"], "-h", "127.0.0.1", "-p", str(port), "-U", "gptflow", "-v", "ON_ERROR_STOP=1", "-At"]
    try:
        made = run([*psql, "-d", "postgres", "-c", "CREATE DATABASE mlflow"])
        assert made.returncode == 0, made.stderr
        yield f"postgresql://gptflow@127.0.0.1:{port}/mlflow", [*psql, "-d", "mlflow"]
    finally:
        run(as_postgres([tools["pg_ctl"], "-D", str(data), "-m", "immediate", "-w", "stop"]))
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_on_postgres(postgres, tmp_path_factory):
    """`gptflow serve mlflow` with PostgreSQL as its backend store; this process tracks to it for the module."""
    import mlflow

    uri, psql = postgres
    home = tmp_path_factory.mktemp("serve")
    state = services.start("mlflow", port=free_port(), home=home, backend_store_uri=uri,
                           artifacts_destination=str(home / "artifacts"), timeout=120)
    before = mlflow.get_tracking_uri()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", state.url)
            mlflow.set_tracking_uri(state.url)
            yield state.url, psql
    finally:
        mlflow.set_tracking_uri(before)
        services.stop("mlflow", home)


def test_runs_and_registry_live_in_postgres(mlflow_on_postgres, tmp_path):
    from mlflow import MlflowClient

    from flows.stages import tokenizer_task
    from models.checkpoint import save_model
    from models.config import GPTConfig
    from models.gpt import GPT
    from tasks import tracking
    from tasks.refs import CorpusRef, ModelRef
    from tasks.registry import RegistryConfig
    from tasks.tokenizer import TokenizerConfig

    url, psql = mlflow_on_postgres
    corpus = CorpusRef(path=str(DATA_DIR / "text" / "c4_demo.jsonl.gz"))
    tok = tokenizer_task.fn(TokenizerConfig(vocab_size=512), corpus, str(tmp_path / "stages"))
    assert tracking.tracking_uri() == url
    model_dir = save_model(GPT(GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32)),
                           tmp_path / "model")
    with tracking.stage_run("registry", None) as run_id:
        reg = tracking.register_model(run_id, ModelRef(path=str(model_dir)), tok,
                                      RegistryConfig(model_name=MODEL, aliases=["candidate"]), {"tokenizer": tok.sha256})
        tracking.record_gate(MODEL, reg.version, ["candidate"], "champion", True, {"eval_status": "passed"}, "tiny")

    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("llm-pipeline").experiment_id])
    assert {"tokenizer", "registry"} <= {r.info.run_name for r in runs}
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.version == str(reg.version) and version.run_id == run_id
    assert set(version.aliases) == {"candidate", "champion"} and version.tags["eval_status"] == "passed"

    # The same rows, read from PostgreSQL itself: nothing went to a sqlite file or a local store.
    def sql(query: str) -> list[str]:
        out = subprocess.run([*psql, "-c", query], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert {"tokenizer", "registry"} <= set(sql("SELECT name FROM runs"))
    assert sorted(sql(f"SELECT alias || '=' || version FROM registered_model_aliases WHERE name = '{MODEL}'")) == \
        [f"candidate={reg.version}", f"champion={reg.version}"]
    assert sql(f"SELECT run_id FROM model_versions WHERE name = '{MODEL}'") == [run_id]
