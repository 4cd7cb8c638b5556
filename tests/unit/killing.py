"""What every kill-and-resume test shares: a driver run until Ray Train has recorded a checkpoint and then
SIGKILLed with every process it started, and a check that the killed run's log did not repeat itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

from infra.env import REPO_ROOT


def registered_step(run_dir: Path) -> int:
    """The step of the latest checkpoint Ray has recorded in its run snapshot (what a rerun restores), or 0."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):  # not there yet, or caught mid-write
        return 0


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (its own Ray included), each by its pid, as when the
    machine dies; then wait until they are gone."""
    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, alive


def alive(pid: int) -> bool:
    """Whether process `pid` still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def eventually(check: Callable[[], bool], patience_s: float = 30) -> bool:
    """Whether `check()` holds within `patience_s`, asked every 0.2 s."""
    deadline = time.monotonic() + patience_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.2)
    return check()


def gone(pids: list[int], patience_s: float = 30) -> bool:
    """Whether every process of `pids` has ended, waiting up to `patience_s` for them."""
    return eventually(lambda: not any(map(alive, pids)), patience_s)


def assert_no_line_repeats(text: str, most: int = 3) -> None:
    """The terminal stays readable: no line (its Ray pid prefix aside) printed more than `most` times. Ray
    Train's placement-group cleaner printed "State API may be temporarily unavailable" once a second."""
    lines = Counter(re.sub(r"pid=\d+", "pid", line).strip() for line in text.splitlines() if line.strip())
    repeated = {line: n for line, n in lines.items() if n > most}
    assert not repeated, repeated


def kill_after_checkpoint(driver: str, args: list[str], run_dir: Path, step: int, log: Path,
                          timeout: float = 300) -> int:
    """Run `python -c driver *args` in a fresh workspace until Ray has recorded a checkpoint at `step` or later in
    `run_dir`, then SIGKILL it and everything it started, as when the machine dies; returns the recorded step.
    The workspace is a short folder: Ray's socket paths must stay under 108 bytes."""
    home = tempfile.mkdtemp(prefix="gptflow-killed-")
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", driver, *args], cwd=REPO_ROOT,
                                env={**os.environ, "GPTFLOW_HOME": home}, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while registered_step(run_dir) < step:
            assert proc.poll() is None, f"the first attempt ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint at step {step} after {timeout} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.02)
    finally:
        kill_tree(proc)
        shutil.rmtree(home, ignore_errors=True)
    return registered_step(run_dir)


def assert_same_curves(out: Path, reference: Path, atol: float = 1e-5) -> dict:
    """The run in `out` logged the reference run's train and val losses at the same steps (to `atol`); returns
    its history."""
    history = json.loads((out / "history.json").read_text())
    expected = json.loads((reference / "history.json").read_text())
    for split in ("train", "val"):
        steps, losses = np.array(history[split]).T
        ref_steps, ref_losses = np.array(expected[split]).T
        assert np.array_equal(steps, ref_steps)
        np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=atol)
    return history
