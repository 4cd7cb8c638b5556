"""Faults the pipeline survives: a Ray Train worker killed mid-fit, a checkpoint half-written when its process
died, a full disk under the shard and checkpoint writers, and the MLflow server going away.

The Ray test fits a 2-layer GPT on 2 CPU workers, killed once, then resumes it past a truncated checkpoint.
Run: `.venv/bin/python -m pytest tests/unit/test_faults.py -q` (add `-m "not slow"` for the quick ones).
"""

from __future__ import annotations

import json
import shutil
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
from tasks.refs import ShardsRef

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
def test_a_killed_worker_is_restarted_and_a_truncated_checkpoint_is_skipped(shards, replica, ray_once, tmp_path):
    """One Ray Train worker SIGKILLed after the first checkpoint: Ray Train's failure handling (max_failures)
    restarts the worker group, which restores the latest checkpoint, and the fit ends as an uninterrupted one.
    Then a half-written latest checkpoint: never loaded, the previous one is used."""
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

    # then the latest checkpoint's weights cut short, as by a crash mid-copy, and the stage's exports gone: the rerun
    # skips that checkpoint, resumes from the one before and ends on the same losses (one more short fit)
    latest = tmp_path / "ray" / "pretrain" / f"checkpoint_{CFG.steps:06d}"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    shutil.rmtree(tmp_path / "model")
    (tmp_path / "history.json").unlink()
    result = pretrain_gpt(CFG, ShardsRef(path=str(shards)), tmp_path)
    history = _assert_curve(tmp_path, replica)
    assert history["resumes"][-1] == CFG.steps - CFG.ckpt_every, history["resumes"]
    assert result.metrics["pretrain/final_train_loss"] == pytest.approx(replica[-1], abs=1e-5)


# ---------------------------------------------------------------- a checkpoint half-written when its process died


def _write_checkpoint(d: Path, step: int, world: int = 2) -> Path:
    """A checkpoint folder as `save_checkpoint` writes it (weights, AdamW state, each rank's RNG, the marker last)."""
    import torch

    from models.checkpoint import save_model
    from models.gpt import GPT
    from tasks import train_state

    d.mkdir(parents=True)
    torch.manual_seed(step)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    opt = model.configure_optimizer(1e-3, 0.1)
    model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))[1].backward()
    opt.step()
    save_model(model, d)
    meta = {"step": step, "history": {}, "optimizer": train_state.save_optimizer(opt, d / "optimizer.safetensors")}
    for rank in range(world):
        train_state.save_rng(d / f"rng_rank{rank}.safetensors")
    train_state.write_json(d / train_state.STATE_FILE, {**meta, "files": train_state.file_sizes(d)})
    return d


@pytest.mark.parametrize("damage", ["truncated weights", "no marker", "a rank's RNG missing"])
def test_a_half_written_checkpoint_is_skipped_for_the_previous_one(damage, tmp_path, caplog):
    from tasks.train_state import STATE_FILE, usable_checkpoint

    old, new = _write_checkpoint(tmp_path / "checkpoint_000005", 5), _write_checkpoint(tmp_path / "checkpoint_000010", 10)
    assert not list(tmp_path.rglob(".*.tmp")), "a temporary file was left behind"
    assert usable_checkpoint(new, world=2) == new  # whole: used as it is
    if damage == "truncated weights":  # the process died while the weights were copied
        weights = new / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "no marker":  # died before the marker, which is written last
        (new / STATE_FILE).unlink()
    else:
        (new / "rng_rank1.safetensors").unlink()
    with caplog.at_level("WARNING"):
        assert usable_checkpoint(new, world=2) == old
    assert "checkpoint_000010 is incomplete" in caplog.text and "resuming from checkpoint_000005" in caplog.text
    (old / "optimizer.safetensors").write_bytes(b"")  # and when no earlier one is whole either: a fresh start
    assert usable_checkpoint(new, world=2) is None


# ---------------------------------------------------------------- the disk filling up


_FILL = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # a real kernel limit: writes past it fail (EFBIG)
from infra.env import setup_env
setup_env()
out = Path(sys.argv[2])
if sys.argv[1] == "shards":
    from tasks.refs import CorpusRef
    from tasks.tokenizer import TokenizerConfig, build_tokenizer
    build_tokenizer(TokenizerConfig(vocab_size=512), CorpusRef(path=sys.argv[3]), out)
else:
    from models.checkpoint import save_model
    from models.gpt import GPT, GPTConfig
    save_model(GPT(GPTConfig(vocab_size=1024, block_size=64, n_layer=2, n_head=4, n_embd=64)), out)
"""


@pytest.mark.parametrize("what, victim", [("shards", "shards/train_0000.bin"), ("checkpoint", "model.safetensors")])
def test_a_full_disk_is_one_error_naming_the_file_and_leaves_no_file_looking_whole(what, victim, tmp_path):
    """Token shards (the tokenizer stage) and checkpoint weights written under a file-size limit the writes hit:
    the error names the file and the free space, and neither that file nor the shards' index is left behind."""
    import subprocess
    import sys

    from infra.env import REPO_ROOT

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _FILL, what, str(out), str(CORPUS)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert f"no room to write {out / victim}" in last and "MiB free there" in last, proc.stderr[-2000:]
    assert "DiskFullError" in last
    assert not (out / victim).exists()
    assert not (out / "shards" / "index.json").exists()
    assert not list(out.rglob("*.tmp")), list(out.rglob("*"))


# ---------------------------------------------------------------- the MLflow server going away


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(home: Path, port: int, timeout: float = 120):
    """A real `mlflow server` on 127.0.0.1 with its store in `home`, once its health check answers."""
    import subprocess
    import sys
    import urllib.request

    log = open(home / f"mlflow-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115 (the server's, closed with it)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{home / 'server.db'}",
                             "--artifacts-destination", str(home / "artifacts")],
                            env={**__import__("os").environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (home / log.name).read_text()[-2000:]
            time.sleep(0.5)


def _printed_ref(stdout: str) -> dict:
    """The stage's result the CLI prints as JSON, after MLflow's own "View run" lines."""
    lines = stdout.splitlines()
    return json.loads("\n".join(lines[lines.index("{"):]))
