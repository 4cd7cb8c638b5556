"""Faults of the whole pipeline process, and determinism: the `tiny` preset's data, tokenizer and pretrain stages
(pretraining cut to 10 steps, a checkpoint every 5) run as a pipeline does (`flows.stages` tasks, MLflow sqlite,
local Ray, datatrove), in a subprocess, into two separate roots:

- root A, once, uninterrupted: the reference;
- root B, the same config, killed twice: SIGKILLed (with every process it started) once a datatrove task of the
  data stage's first run has completed, then rerun and SIGKILLed again once Ray has recorded pretraining's first
  checkpoint, then rerun to the end.

The tests read what both roots hold: the rerun of the data stage ran only the datatrove tasks that had not completed;
the last rerun reused the data and tokenizer stages and resumed pretraining from its checkpoint to the final loss of
the uninterrupted run; and A and B made the same corpus, tokenizer, shards and loss curves (determinism).
One module fixture pays for all three (about 2 data stages and 2 short fits).

Then the tracking and orchestration servers going away mid-stage, each a real server stopped while the tokenizer
stage's core runs under `gptflow tokenizer`: one line naming the server, the stage folder sealed all the same, and
the rerun (server back) reuses it.

Run: `.venv/bin/python -m pytest tests/unit/test_faults_pipeline.py -q`
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from killing import kill_tree, registered_step

from infra.env import REPO_ROOT

# slow: the pipeline tests share two data stages and two fits in subprocesses (~3 min); the server tests start
# real MLflow and Prefect servers twice each and run a stage through the CLI three times (~1 min each)
pytestmark = pytest.mark.slow

# The tiny preset with pretraining cut short; one datatrove worker, so the data stage's tasks run one after the
# other and the kill can come between them.
OVERRIDES = {"data.workers": 1, "pretrain.steps": 10, "pretrain.ckpt_every": 5, "pretrain.log_every": 5,
             "pretrain.eval_every": 10, "pretrain.warmup_steps": 2}

# `root overrides`: the data, tokenizer and pretrain tasks of the pipeline, in order, as `flows.pipeline` runs them
# (their bodies, without a Prefect server), then one JSON line: each stage's folder and whether it was reused.
PIPELINE = """
import json, sys
from infra.env import setup_env
setup_env()
if __name__ == "__main__":
    from flows.presets import resolve
    from flows.stages import data_task, pretrain_task, tokenizer_task
    from infra.ray_cluster import ray_session
    root, cfg = sys.argv[1], resolve("tiny", json.loads(sys.argv[2]))
    corpus = data_task.fn(cfg.data, root)
    tok = tokenizer_task.fn(cfg.tokenizer, corpus, root)
    with ray_session():
        model = pretrain_task.fn(cfg.pretrain, tok.shards, root)
    refs = {"data": corpus, "tokenizer": tok, "pretrain": model}
    print("RESULT " + json.dumps({s: {"dir": str(r.dir), "cached": r.cached} for s, r in refs.items()}))
"""


def start(root: Path, home: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-c", PIPELINE, str(root), json.dumps(OVERRIDES)], cwd=REPO_ROOT,
                                env={**os.environ, "GPTFLOW_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)},
                                stdout=fh, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> dict:
    assert proc.wait(timeout) == 0, log.read_text()[-4000:]
    line = [x for x in log.read_text().splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


def kill_when(proc: subprocess.Popen, log: Path, ready, timeout: float = 600) -> None:
    """SIGKILL `proc` and everything it started once `ready()` holds, as when the machine dies."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before the kill:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"never ready for the kill:\n{log.read_text()[-4000:]}"
            time.sleep(0.02)
    finally:
        kill_tree(proc)


def completions(root: Path, run: str = "filter") -> dict[str, int]:
    """The datatrove tasks of a data run that have completed: {rank file: its marker's mtime in ns}."""
    return {p.name: p.stat().st_mtime_ns for p in root.glob(f"data/*/logs/{run}/completions/*")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict]:
    # short workspace folders: Ray's socket paths must stay under 108 bytes
    home_a, home_b = (Path(tempfile.mkdtemp(prefix=f"gptflow-{x}-")) for x in "ab")
    root_a, root_b = tmp_path_factory.mktemp("root_a"), tmp_path_factory.mktemp("root_b")
    logs = tmp_path_factory.mktemp("logs")
    found: dict = {"root_a": root_a, "root_b": root_b}

    # B, first attempt: killed once the data stage's first run has completed one of its two tasks
    log = logs / "b.log"
    kill_when(start(root_b, home_b, log), log, lambda: len(completions(root_b)) >= 1)
    found["done_before"] = completions(root_b)
    assert not list(root_b.glob("data/*/_SUCCESS"))
    # B, second attempt: the data stage finishes, then killed once pretraining's first checkpoint is recorded
    kill_when(start(root_b, home_b, log), log,
              lambda: max([registered_step(d) for d in root_b.glob("pretrain/*/ray/pretrain")] or [0]) >= 5)
    found["done_after"] = completions(root_b)
    found["killed_at"] = max(registered_step(d) for d in root_b.glob("pretrain/*/ray/pretrain"))
    # B, third attempt: to the end
    found["b"] = finish(start(root_b, home_b, log), log)
    # A: one uninterrupted run, its own root and workspace
    found["a"] = finish(start(root_a, home_a, logs / "a.log"), logs / "a.log")
    yield found
    for home in (home_a, home_b):
        shutil.rmtree(home, ignore_errors=True)


def history(stage_dir: str) -> dict:
    return json.loads((Path(stage_dir) / "history.json").read_text())


@pytest.mark.ray
def test_a_killed_datatrove_task_is_the_only_one_the_rerun_runs(runs):
    """Killed after one of the filter run's two tasks completed: the rerun ran the other task only (its completion
    marker is new, the first one's untouched), and the corpus is the uninterrupted run's."""
    before, after = runs["done_before"], runs["done_after"]
    assert len(before) == 1 and len(after) == 2, (before, after)
    (done,) = before
    assert after[done] == before[done], "the task that had completed ran again"
    # datatrove writes a task's stats just before its marker: a task run again would leave them newer
    stats = Path(runs["b"]["data"]["dir"]) / "logs" / "filter" / "stats" / f"{done}.json"
    assert stats.stat().st_mtime_ns <= before[done], "the completed task's stats were rewritten by the rerun"
    assert corpus_text(runs["b"]) == corpus_text(runs["a"])


@pytest.mark.ray
def test_the_pipeline_killed_mid_pretraining_resumes_from_its_checkpoint(runs):
    """Killed after pretraining's first checkpoint: the rerun reuses the data and tokenizer folders, resumes
    pretraining from that checkpoint in the same stage folder (not from step 0) and ends on the uninterrupted
    run's final loss."""
    b, a = runs["b"], runs["a"]
    assert b["data"]["cached"] and b["tokenizer"]["cached"] and not b["pretrain"]["cached"], b
    assert 5 <= runs["killed_at"] < OVERRIDES["pretrain.steps"], runs["killed_at"]
    resumed = history(b["pretrain"]["dir"])
    assert resumed["resumes"] == [runs["killed_at"]], resumed["resumes"]
    assert [s for s, _ in resumed["train"]] == list(range(1, OVERRIDES["pretrain.steps"] + 1))
    assert resumed["train"][-1][1] == pytest.approx(history(a["pretrain"]["dir"])["train"][-1][1], abs=1e-5)


def corpus_text(run: dict) -> dict[str, bytes]:
    """The corpus files, decompressed (a gzip header holds its write time)."""
    docs = Path(run["data"]["dir"]) / "documents"
    return {p.name: gzip.decompress(p.read_bytes()) for p in sorted(docs.glob("*.jsonl.gz"))}


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.ray
def test_two_runs_with_one_seed_make_the_same_corpus_tokenizer_shards_and_curves(runs):
    """Two roots, nothing shared: byte-equal corpus (decompressed), tokenizer and token shards; loss curves equal
    to 1e-6 (B's was resumed after a kill, so this also holds across a resume)."""
    a, b = runs["a"], runs["b"]
    assert Path(a["data"]["dir"]).name == Path(b["data"]["dir"]).name  # one config, one code: one stage key
    text = corpus_text(a)
    assert text and sum(len(t) for t in text.values()) > 10_000
    assert corpus_text(b) == text
    tok_a, tok_b = Path(a["tokenizer"]["dir"]), Path(b["tokenizer"]["dir"])
    tokenizer = files(tok_a / "tokenizer")
    assert "tokenizer.json" in tokenizer and files(tok_b / "tokenizer") == tokenizer
    shards = files(tok_a / "shards")
    assert any(name.endswith(".bin") for name in shards) and files(tok_b / "shards") == shards
    ha, hb = history(a["pretrain"]["dir"]), history(b["pretrain"]["dir"])
    for curve in ("train", "val"):
        assert len(ha[curve]) == len(hb[curve]) > 0, curve
        np.testing.assert_allclose(np.array(hb[curve]), np.array(ha[curve]), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- a server going away mid-stage


SERVER_START_S = 300  # a server's start-up on a busy 2-core machine (test_faults's 120 s was too short)


def stage_cli(env: dict[str, str]) -> subprocess.Popen:
    """`gptflow tokenizer` on the bundled C4 sample, a small vocabulary."""
    corpus = REPO_ROOT / "data" / "text" / "c4_demo.jsonl.gz"
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "tokenizer", "--input", str(corpus), "--set",
                             "vocab_size=300"], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def lose_server_mid_stage(env: dict[str, str], stop) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the stage; `stop()` the server once the stage's core has started (its folder exists, no `_SUCCESS`
    yet); returns the finished run and the stage folder."""
    runs = Path(env["GPTFLOW_HOME"]) / "runs" / "tokenizer"
    proc = stage_cli(env)
    deadline = time.monotonic() + 300
    while not [d for d in runs.glob("*") if d.is_dir()]:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the stage never started"
        time.sleep(0.02)
    (folder,) = [d for d in runs.glob("*") if d.is_dir()]
    assert not (folder / "_SUCCESS").exists(), "the stage ended before the server was stopped"
    stop()
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), folder


def assert_one_line_naming(run: subprocess.CompletedProcess, what: str, url: str) -> None:
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gptflow: error: the {what} server at {url} stopped answering mid-run"), run.stderr[-3000:]
    assert "finished stages are kept and reused" in last


def test_the_mlflow_server_dying_mid_stage_is_one_error_and_the_rerun_reuses_the_stage(tmp_path):
    """A real MLflow server killed while the tokenizer stage computes: the stage folder is sealed, its logging
    fails after MLflow's bounded retries (infra.env) as one line naming the server; a run started while the server
    is still gone stops at its start with one line naming it; with the server back the rerun reuses the folder."""
    from test_faults import _free_port, _mlflow_server, _printed_ref

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "GPTFLOW_HOME": str(tmp_path / "home"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(SERVER_START_S)}
    env.pop("PREFECT_API_URL", None)
    server = _mlflow_server(tmp_path, port, SERVER_START_S)
    try:
        gone, folder = lose_server_mid_stage(env, lambda: kill_tree(server))
    finally:
        kill_tree(server)
    assert_one_line_naming(gone, "MLflow", url)
    assert (folder / "_SUCCESS").exists(), "the stage's finished work was not kept"
    early = stage_cli(env)  # the server still gone: the health check before any stage names it
    _, err = early.communicate(timeout=300)
    assert early.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"gptflow: error: the MLflow server at {url} does not answer"), \
        err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    server = _mlflow_server(tmp_path, port, SERVER_START_S)
    try:
        again = stage_cli(env)
        out, err = again.communicate(timeout=300)
    finally:
        kill_tree(server)
    assert again.returncode == 0, err[-3000:]
    reused = _printed_ref(out)
    assert reused["cached"] and reused["dir"] == str(folder)


def test_the_prefect_server_going_away_mid_stage_is_one_error_and_the_rerun_reuses_the_stage(tmp_path):
    """A real Prefect server (`gptflow serve prefect`) stopped while the tokenizer stage computes: one line naming
    the server after Prefect's bounded retries (infra.env), the stage folder kept, and with the server back the
    rerun reuses it."""
    from test_faults import _free_port, _printed_ref

    from infra import services

    home = tmp_path / "home"
    port = _free_port()
    state = services.start("prefect", port=port, home=home, timeout=SERVER_START_S, echo=lambda *_: None)
    api = state.export.split("=", 1)[1]
    env = {**os.environ, "PREFECT_API_URL": api, "GPTFLOW_HOME": str(home)}
    try:
        gone, folder = lose_server_mid_stage(env, lambda: services.stop("prefect", home, echo=lambda *_: None))
    finally:
        services.stop("prefect", home, echo=lambda *_: None)
    assert_one_line_naming(gone, "Prefect", api)
    assert (folder / "_SUCCESS").exists(), "the stage's finished work was not kept"
    services.start("prefect", port=port, home=home, timeout=SERVER_START_S, echo=lambda *_: None)
    try:
        again = stage_cli(env)
        out, err = again.communicate(timeout=300)
    finally:
        services.stop("prefect", home, echo=lambda *_: None)
    assert again.returncode == 0, err[-3000:]
    reused = _printed_ref(out)
    assert reused["cached"] and reused["dir"] == str(folder)
