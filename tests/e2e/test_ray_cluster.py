"""Past one machine: with RAY_ADDRESS set, pretraining joins that Ray cluster instead of starting its own.
The cluster here is a real Ray head started with `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.env import DATA_DIR
from infra.env import REPO_ROOT as REPO
from tasks.refs import CorpusRef
from tasks.tokenizer import TokenizerConfig, build_tokenizer

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.slow]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    temp = tmp_path_factory.mktemp("rayhead")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--port=6391", "--num-cpus=2",
                            "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield "127.0.0.1:6391", temp
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_pretrain_joins_the_cluster_at_ray_address(ray_head, tmp_path):
    address, head_temp = ray_head
    corpus = CorpusRef(path=str(DATA_DIR / "text" / "c4_demo.jsonl.gz"))
    build_tokenizer(TokenizerConfig(vocab_size=512), corpus, tmp_path / "tok")
    home = tmp_path / "client"
    env = {**os.environ, "RAY_ADDRESS": address, "GPTFLOW_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "pretrain", "--input", str(tmp_path / "tok" / "shards"),
         "--set", "steps=4", "--set", "log_every=2", "--set", "eval_every=4", "--set", "ckpt_every=4",
         "--set", "model.block_size=32"],
        env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"steps": 4' in out.stdout
    assert not (home / "ray").exists(), "started a local Ray instead of joining the cluster"
    worker_logs = list(Path(head_temp).glob("session_2*/logs/worker-*"))
    assert any("[pretrain] step 4/4" in p.read_text(errors="ignore") for p in worker_logs), \
        "no training worker of this run logged on the cluster"
