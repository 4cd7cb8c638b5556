"""Two runs of one stage at once (two pipelines on one workspace): the core runs once, the second run waits for the
first and reuses its folder; a killed holder releases the lock and the next run redoes the unfinished work; stages
of different keys do not wait for each other. Real processes, real `flock`.

Run: .venv/bin/python -m pytest tests/unit/test_stage_lock.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.env import REPO_ROOT

# One run of a slow stage in its own process: `root vocab seconds [meet]`. The core notes that it started and that
# it ran, then sleeps (or, with `meet`, waits until every vocab named there has started), then writes its result.
RUN = """
import json, logging, os, sys, time
from pathlib import Path
from tasks.refs import Ref
from tasks.stage import run_stage
from tasks.tokenizer import TokenizerConfig

logging.basicConfig(level=logging.INFO, format="%(message)s")
root, vocab, seconds = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
meet = sys.argv[4].split(",") if len(sys.argv) > 4 else []

def core(out):
    with open(root / "calls.txt", "a") as f:
        f.write(f"{vocab} {os.getpid()} {sorted(p.name for p in out.iterdir())}\\n")
    (root / f"started-{vocab}").write_text(str(os.getpid()))
    (out / "partial").write_text("work so far")
    deadline = time.time() + seconds
    while time.time() < deadline and not all((root / f"started-{v}").exists() for v in meet or ["never"]):
        time.sleep(0.05)
    if meet and time.time() >= deadline:
        raise TimeoutError(f"vocab {vocab}: the other stage never started")
    (out / "result.txt").write_text(f"vocab {vocab}")
    return Ref(path=str(out / "result.txt"))

ref = run_stage("slow", TokenizerConfig(vocab_size=vocab), {}, core, root)
print(json.dumps({"key": ref.key, "sha256": ref.sha256, "cached": ref.cached}))
"""


def start(root: Path, vocab: int, seconds: float, meet: str = "") -> subprocess.Popen:
    args = [sys.executable, "-c", RUN, str(root), str(vocab), str(seconds)] + ([meet] if meet else [])
    return subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:  # only the processes this test started
        if p.poll() is None:
            p.kill()
            p.wait()


def test_second_run_of_the_same_key_waits_then_reuses(tmp_path, procs):
    procs.append(first := start(tmp_path, 300, 3))
    wait_for(tmp_path / "started-300")  # the first holds the lock and is in its core
    procs.append(second := start(tmp_path, 300, 3))
    a, _ = finish(first)
    b, err = finish(second)
    assert a["key"] == b["key"] and a["sha256"] == b["sha256"]
    assert not a["cached"] and b["cached"]
    assert f"waiting for pid {first.pid} on " in err and err.count("waiting for") == 1
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 1  # the core ran once


def test_a_killed_holder_releases_the_lock_and_the_work_is_redone(tmp_path, procs):
    procs.append(holder := start(tmp_path, 300, 600))
    wait_for(tmp_path / "started-300")
    (tmp_path / "started-300").unlink()
    procs.append(waiter := start(tmp_path, 300, 0))
    deadline = time.time() + 60
    while "waiting for" not in (err := waiter.stderr.readline()):  # it is blocked on the holder's lock
        assert time.time() < deadline and waiter.poll() is None, err
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    ref, _ = finish(waiter)
    assert not ref["cached"]
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 2 and "'partial'" in calls[1]  # the rerun found the killed run's unfinished folder
    assert (tmp_path / "slow" / ref["key"] / "_SUCCESS").exists()


def test_different_keys_run_at_the_same_time(tmp_path, procs):
    # each core waits (up to 30 s) until the other's has started: had one waited for the other's lock, it would fail
    procs.append(a := start(tmp_path, 300, 30, meet="300,301"))
    procs.append(b := start(tmp_path, 301, 30, meet="300,301"))
    ra, err_a = finish(a)
    rb, err_b = finish(b)
    assert ra["key"] != rb["key"] and not ra["cached"] and not rb["cached"]
    assert "waiting for" not in err_a + err_b


OPEN_STORE = """
from tasks import tracking
tracking.set_experiment()
print(tracking.mlflow.get_experiment_by_name(tracking.EXPERIMENT).experiment_id)
"""


@pytest.mark.slow  # three processes import mlflow and create its tables: ~20 s on 2 cores
def test_pipelines_starting_at_once_on_a_fresh_workspace_share_one_mlflow_store(tmp_path):
    # Unlocked, two of three processes failed creating the tables ("duplicate column name: step").
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GPTFLOW_HOME": str(tmp_path),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    runs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.communicate(timeout=120), p.returncode) for p in runs]
    assert all(rc == 0 for _, rc in results), [err[-500:] for (_, err), rc in results if rc]
    assert len({out.strip() for (out, _), _ in results}) == 1  # one experiment, not one each


START_SERVER = """
from infra.env import setup_env
setup_env()
from infra.prefect_server import local_server
print(local_server().api_url())
"""


@pytest.mark.slow  # three Prefect servers start on 2 cores: ~35 s
def test_pipelines_starting_at_once_on_a_fresh_workspace_share_one_prefect_database(tmp_path):
    # Unlocked, one of three servers failed migrating the database ("duplicate column name: block_type_name").
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env |= {"PYTHONPATH": str(REPO_ROOT), "GPTFLOW_HOME": str(tmp_path)}
    runs = [subprocess.Popen([sys.executable, "-c", START_SERVER], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.communicate(timeout=300), p.returncode) for p in runs]
    assert all(rc == 0 for _, rc in results), [err[-500:] for (_, err), rc in results if rc]
    assert len({out.strip() for (out, _), _ in results}) == 3  # three servers on one database


DATA_STAGE = """
import json, logging, sys
from pathlib import Path

if __name__ == "__main__":
    from infra.env import setup_env

    setup_env()
    from tasks.data import DataConfig, build_corpus, crawl_inputs
    from tasks.stage import run_stage

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = DataConfig(inputs=[sys.argv[2]], text_sources={}, tasks=1, workers=1, extract_timeout_s=10.0)
    inputs = crawl_inputs(cfg)
    ref = run_stage("data", cfg, inputs, lambda out: build_corpus(cfg, inputs, out), Path(sys.argv[1]))
    print(json.dumps({"key": ref.key, "sha256": ref.sha256, "cached": ref.cached, "counts": ref.counts}))
"""


@pytest.mark.slow  # two data stages (read, filters, exact and MinHash dedup, span dedup, PII) at once: ~20 s
def test_two_data_stages_at_once_on_one_workspace_both_finish_with_one_corpus(tmp_path):
    # Unlocked, two `gptflow run --preset tiny` 3 s apart failed in the MinHash steps (a KeyError, "Hash order
    # error"): both wrote the same stage folder.
    script = tmp_path / "data_stage.py"
    script.write_text(DATA_STAGE)
    wet = str(REPO_ROOT / "data" / "crawl" / "CC-MAIN-2016-50_sparkwarc-sample.warc.wet.gz")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    runs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "runs"), wet], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.communicate(timeout=600), p.returncode) for p in runs]
    assert all(rc == 0 for _, rc in results), [err[-1000:] for (_, err), rc in results if rc]
    a, b = (json.loads(out.strip().splitlines()[-1]) for (out, _), _ in results)
    assert a["key"] == b["key"] and a["sha256"] == b["sha256"] and a["counts"] == b["counts"]
    assert sorted([a["cached"], b["cached"]]) == [False, True] and a["counts"]["totals"]["docs_out"] > 0
