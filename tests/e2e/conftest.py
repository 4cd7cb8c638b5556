"""What the end-to-end tests share: the tiny pipeline's one run (`first_run`, with fake credentials in its
environment) with a second `gptflow run` started 3 s after it on the same workspace (`two_runs`); for the
registry's tests one PostgreSQL, one MLflow server, one registered model.

`mlflow_server` is `gptflow serve mlflow` (infra.services) on PostgreSQL when Debian's `postgresql` is installed,
else on sqlite; `registered` puts a tiny GPT in its registry once, with aliases and tags, for
tests/e2e/test_mlflow_postgres.py (which reads it back from PostgreSQL) and tests/e2e/test_browser.py (which
reads it in the MLflow UI). Each server start costs ~15-20 s on 2 idle cores: once per session, not per test.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra import services
from infra.env import REPO_ROOT

MODEL = "gpt-e2e-registry"
# Names the tools read credentials from (AWS for s3://, Hugging Face, MLflow's server auth, Weights & Biases, ...).
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "WANDB_API_KEY", "PREFECT_API_KEY")


@pytest.fixture(scope="session")
def fake_secret() -> str:
    """A fake credential, random per session, that the tiny pipeline runs with in every variable of SECRET_VARS
    (and in AWS_ACCESS_KEY_ID): tests/e2e/test_pipeline_secrets.py looks for it in everything the run wrote."""
    return f"fake-secret-{secrets.token_hex(12)}"


@dataclass(frozen=True)
class TwoRuns:
    first: dict  # llm_pipeline_flow's result, in this process
    second: dict | None  # `gptflow run --result-json`'s result, None when that run failed
    second_rc: int
    second_log: str


@pytest.fixture(scope="session")
def two_runs(workspace, fake_secret, tmp_path_factory) -> TwoRuns:
    """The tiny pipeline in this process and, 3 s after it started, `gptflow run --preset tiny` on the same workspace
    (issue 19: two runs at once must both complete). A session fixture: the ~5 min happen once. Either run may be
    the one that computes a stage (the other waits on its lock and reuses it): which one is a race at every stage.
    Fake credentials are in the environment of both runs alone."""
    from flows.pipeline import llm_pipeline_flow

    folder = tmp_path_factory.mktemp("second_run")
    second: dict[str, subprocess.Popen] = {}
    with open(folder / "run.log", "w") as log, pytest.MonkeyPatch.context() as mp:
        for var in SECRET_VARS:
            mp.setenv(var, fake_secret)
        mp.setenv("AWS_ACCESS_KEY_ID", "AKIA" + fake_secret)
        argv = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--result-json", str(folder / "result.json")]
        timer = threading.Timer(3.0, lambda: second.update(  # inherits the fake credentials set above
            proc=subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)))
        timer.start()
        try:
            first = llm_pipeline_flow(preset="tiny")
        finally:
            timer.join()
            proc = second["proc"]
            try:
                proc.wait(timeout=900)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    result = folder / "result.json"
    return TwoRuns(first, json.loads(result.read_text()) if result.exists() else None, proc.returncode,
                   (folder / "run.log").read_text(errors="replace"))


@pytest.fixture(scope="session")
def first_run(two_runs) -> dict:
    """The in-process run of `two_runs`, which tests/e2e/test_pipeline_tiny.py and test_pipeline_secrets.py read."""
    return two_runs.first


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


@dataclass(frozen=True)
class Postgres:
    uri: str  # the `mlflow` database, for --backend-store-uri
    psql: list[str]  # argv of psql connected to it: append ["-c", query]


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on 127.0.0.1:<free port> in a temp folder, with an empty database `mlflow`."""
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
        yield Postgres(f"postgresql://gptflow@127.0.0.1:{port}/mlflow", [*psql, "-d", "mlflow"])
    finally:
        run(as_postgres([tools["pg_ctl"], "-D", str(data), "-m", "immediate", "-w", "stop"]))
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(request, tmp_path_factory):
    """`gptflow serve mlflow` on PostgreSQL when installed, else sqlite. Yields (URL, the Postgres or None).
    Nothing tracks to it unless inside `tracking_to(url)`: the session's other tests keep their own store."""
    try:
        pg = request.getfixturevalue("postgres")
    except pytest.skip.Exception:
        pg = None
    home = tmp_path_factory.mktemp("serve")
    state = services.start("mlflow", port=free_port(), home=home, backend_store_uri=pg.uri if pg else None,
                           artifacts_destination=str(home / "artifacts"), timeout=300)
    try:
        yield state.url, pg
    finally:
        services.stop("mlflow", home)


@contextmanager
def tracking_to(url: str) -> Iterator[None]:
    """This process's MLflow client (and the subprocesses it starts) track to `url` for the block."""
    import mlflow

    before = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before)


@dataclass(frozen=True)
class Registered:
    url: str
    name: str
    version: int
    run_id: str  # the run that logged the model (its source run)


@pytest.fixture(scope="session")
def registered(mlflow_server, tmp_path_factory) -> Registered:
    """A tiny GPT registered as MODEL through tasks.tracking (as the pipeline does): aliases candidate and
    champion, the gate's tags and a description."""
    from models.checkpoint import save_model
    from models.config import GPTConfig
    from models.gpt import GPT
    from tasks import tracking
    from tasks.bpe import train_bpe
    from tasks.refs import ModelRef, TokenizerRef
    from tasks.registry import RegistryConfig
    from tasks.tokenizer import TokenizerConfig

    url, _ = mlflow_server
    folder = tmp_path_factory.mktemp("registered") / "model"
    tok = train_bpe(iter(["a tiny corpus for a tiny tokenizer"] * 20), TokenizerConfig(vocab_size=280))
    save_model(GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=32, n_layer=2, n_head=2, n_embd=32)), folder)
    tok.save(str(folder / "tokenizer.json"))
    with tracking_to(url), tracking.stage_run("registry", None) as run_id:
        reg = tracking.register_model(run_id, ModelRef(path=str(folder)), TokenizerRef(path=str(folder)),
                                      RegistryConfig(model_name=MODEL), {"preset": "tiny"})
        tracking.record_gate(MODEL, reg.version, ["candidate"], "champion", True, {"eval_status": "passed"},
                             "a tiny model for the end-to-end registry tests")
    return Registered(url, MODEL, reg.version, run_id)
