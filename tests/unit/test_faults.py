"""Faults the pipeline survives: a Ray Train worker killed mid-fit, a checkpoint half-written when its process
died, a full disk under the shard and checkpoint writers, and the MLflow server going away.

The two Ray tests share one local Ray and fit a 2-layer GPT on 2 CPU workers (about a minute each on 2 cores).
Run: `.venv/bin/python -m pytest tests/unit/test_faults.py -q` (add `-m "not slow"` for the quick ones).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from killing import registered_step
from test_pretrain import _one_process_replica

from infra.env import DATA_DIR
from models.gpt import GPTConfig
from tasks.pretrain import PretrainConfig, pretrain_gpt
from tasks.refs import CorpusRef, ShardsRef
from tasks.tokenizer import TokenizerConfig, build_tokenizer

CORPUS = DATA_DIR / "text" / "c4_demo.jsonl.gz"

# As test_pretrain's CFG (2 workers x 16 x 64 tokens, 30 steps, a checkpoint every 5), without dropout and with the
# plain loss, so the one-process replica computes the very same losses: any step skipped, repeated or fed other
# windows after a restart shows up in the curve.
CFG = PretrainConfig(
    model=GPTConfig(arch="llama", vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0,
                    loss_chunk=0),
    steps=30, batch_size=16, lr=3e-3, warmup_steps=3, num_workers=2,
    log_every=5, eval_every=15, eval_batches=2, ckpt_every=5, keep_checkpoints=3, max_failures=2,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(TokenizerConfig(vocab_size=512), CorpusRef(path=str(CORPUS)), out)
    return out / "shards"


@pytest.fixture(scope="module")
def replica(shards) -> list[float]:
    """The losses every run of CFG must produce, computed in one process without Ray."""
    return _one_process_replica(CFG, shards)[0]


def _train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes of this test process's local Ray."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def _kill_a_worker_after(run_dir: Path, step: int, killed: dict, timeout: float = 300) -> None:
    """SIGKILL one Ray Train worker once Ray has recorded a checkpoint at `step` or later (a watcher thread)."""
    deadline = time.monotonic() + timeout
    while registered_step(run_dir) < step and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = _train_workers()
    killed["step"], killed["workers"] = registered_step(run_dir), len(workers)
    if workers:
        workers[-1].kill()


def _assert_curve(out: Path, replica: list[float]) -> dict:
    history = json.loads((out / "history.json").read_text())
    steps, losses = np.array(history["train"]).T
    assert list(steps) == list(range(1, CFG.steps + 1))  # no step lost or repeated
    np.testing.assert_allclose(losses, replica, rtol=0, atol=1e-5)  # the same data, in the same order
    return history


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_is_restarted_from_the_last_checkpoint(shards, replica, ray_once, tmp_path):
    """One Ray Train worker SIGKILLed after the first checkpoint: Ray Train's failure handling (max_failures)
    restarts the worker group, which restores the latest checkpoint, and the fit ends as an uninterrupted one."""
    killed: dict = {}
    watcher = threading.Thread(target=_kill_a_worker_after, args=(tmp_path / "ray" / "pretrain", CFG.ckpt_every,
                                                                   killed), daemon=True)
    watcher.start()
    result = pretrain_gpt(CFG, ShardsRef(path=str(shards)), tmp_path)
    watcher.join(timeout=5)
    assert killed["workers"] == CFG.num_workers, killed
    assert CFG.ckpt_every <= killed["step"] < CFG.steps, f"the kill came too late to test a restart: {killed}"
    history = _assert_curve(tmp_path, replica)
    assert len(history["resumes"]) == 1 and history["resumes"][0] >= CFG.ckpt_every, history["resumes"]
    assert result.metrics["pretrain/final_train_loss"] == pytest.approx(replica[-1], abs=1e-5)
