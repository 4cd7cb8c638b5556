"""One machine, no PREFECT_API_URL: `gptflow` starts its own Prefect server first thing (infra/prefect_server.py),
runs its flow on it, and stops it at exit; the flow and task runs are in the workspace's Prefect database."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest

from infra import prefect_server
from infra.env import REPO_ROOT as REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _servers_of(home: str) -> list[psutil.Process]:
    """Prefect server processes still running for the workspace `home`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "prefect.server.api.server:create_app" in " ".join(proc.info["cmdline"] or []) and \
                    proc.environ().get("GPTFLOW_HOME") == home:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_the_cli_runs_its_flow_on_its_own_server_and_stops_it(tmp_path):
    """`gptflow data` on the bundled crawl alone: the server starts, the stage warms up meanwhile (forkserver,
    dry-run plan), the flow and its task complete in the workspace's Prefect database, and the server is gone."""
    home = str(tmp_path / "home")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI")}
    env["GPTFLOW_HOME"] = home
    out = subprocess.run([sys.executable, "-m", "flows.cli", "data", "--set", "text_sources={}",
                          "--workdir", str(tmp_path / "runs")],
                         env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()  # the stage's result, printed last as indented JSON
    result = json.loads("\n".join(lines[lines.index("{"):]))
    assert result["counts"]["totals"]["docs_out"] > 0 and not result["cached"]
    db = sqlite3.connect(tmp_path / "home" / "prefect" / "prefect.db")
    flow_runs = db.execute("select flow.name, flow_run.state_type from flow_run join flow on flow.id = flow_run.flow_id").fetchall()
    task_runs = db.execute("select task_key, state_type from task_run").fetchall()
    assert flow_runs == [("data", "COMPLETED")]
    assert [state for _, state in task_runs] == ["COMPLETED"] and task_runs[0][0].startswith("data")
    events = {name for (name,) in db.execute("select event from events")}
    assert "prefect.flow-run.Completed" in events
    assert "prefect.flow-run.heartbeat" not in events  # off on the CLI's own server (no services to read them)
    assert _servers_of(home) == []  # stopped with the CLI, not left behind


def test_a_port_taken_before_the_server_binds_it_gets_another(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        first, real = iter([port]), prefect_server.free_port
        monkeypatch.setattr(prefect_server, "free_port", lambda: next(first, None) or real())  # the taken port, once
        server = prefect_server.LocalServer()
        try:
            url = server.api_url(timeout=120)
            assert server.port != port and url == f"http://127.0.0.1:{server.port}/api"
            assert server.warmed.is_set()  # the route tables were built before the URL was handed out
        finally:
            server.stop()
    assert server.proc.poll() is not None
    server.stop()  # a second stop is a no-op



def test_a_server_that_cannot_start_is_an_error_not_a_retry(monkeypatch, tmp_path):
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{tmp_path}/not_a_folder/prefect.db")
    server = prefect_server.LocalServer()
    try:
        with pytest.raises(RuntimeError, match="exited with status"):
            server.api_url(timeout=120)
    finally:
        server.stop()


def test_a_killed_cli_does_not_leave_its_server_running(tmp_path):
    """SIGKILL (or the OOM killer) skips the CLI's exit handlers; its server notices its parent is gone and stops."""
    code = ("import time; from infra.env import setup_env; setup_env(); from infra.prefect_server import LocalServer;"
            "s = LocalServer(); s.api_url(timeout=120); print(s.proc.pid, flush=True); time.sleep(600)")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env["GPTFLOW_HOME"] = str(tmp_path / "home")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        server = psutil.Process(int(parent.stdout.readline()))
        assert server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if server.status() == psutil.STATUS_ZOMBIE:  # exited; waiting for whoever adopted it to reap it
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    else:
        server.kill()
        pytest.fail("the server outlived its killed parent by 30 s")
