"""`gptflow serve`'s pieces that need no server: state files, a taken port, status and stop, the CLI's errors.

    python -m pytest tests/unit/test_services.py -x -q

A "service" here is a real detached process (`sleep`, or one that ignores SIGTERM) recorded as a server would be.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main
from infra import services
from infra.services import ServiceError, State


def detached(code: str = "import time; time.sleep(60)") -> subprocess.Popen:
    """A process in its own session, as `services.launch` starts servers."""
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdin=subprocess.DEVNULL)


def record(proc: subprocess.Popen, home, name: str = "mlflow", port: int = 5000) -> State:
    state = State(name=name, pid=proc.pid, host="127.0.0.1", port=port, url=f"http://127.0.0.1:{port}",
                  export=f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}")
    services.write_state(state, home)
    return state


@pytest.fixture
def listening():
    """A port some other program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_state_of_a_live_process_reads_back_and_a_dead_one_is_stale(tmp_path):
    proc = detached()
    state = record(proc, tmp_path)
    assert (tmp_path / "services" / "mlflow" / "state.json").exists()
    assert services.read_state("mlflow", tmp_path) == state
    proc.kill()
    proc.wait()
    assert services.read_state("mlflow", tmp_path) is None  # the pid is gone: not running
    (tmp_path / "services" / "mlflow" / "state.json").write_text("{\"pid\": ")  # half a file
    assert services.read_state("mlflow", tmp_path) is None


def test_an_unreaped_child_counts_as_stopped():
    proc = detached("pass")
    deadline = time.monotonic() + 30
    while services.alive(proc.pid) and time.monotonic() < deadline:  # exits at once, stays a zombie until wait()
        time.sleep(0.05)
    assert not services.alive(proc.pid) and proc.returncode is None
    proc.wait()


def test_a_taken_port_is_one_line_naming_it_before_anything_starts(tmp_path, listening):
    with pytest.raises(ServiceError, match=f"port {listening} on 127.0.0.1 is taken .*--port"):
        services.check_port("127.0.0.1", listening, "mlflow")
    with pytest.raises(ServiceError, match=f"port {listening}"):
        services.start("mlflow", port=listening, home=tmp_path, echo=lambda _: None)
    assert not (tmp_path / "services" / "mlflow").exists()  # no state, no log: nothing was launched


def test_status_of_nothing_and_stop_of_nothing(tmp_path):
    assert services.status(tmp_path) == [f"{name:8} stopped" for name in services.SERVICES]
    said = []
    assert services.stop("prefect", tmp_path, echo=said.append) is False
    assert said == ["prefect: not running"]


def test_stop_terminates_the_process_group_and_removes_the_state(tmp_path):
    proc = detached("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    record(proc, tmp_path)
    assert services.status(tmp_path)[1].startswith(f"mlflow   running  pid {proc.pid}")
    assert services.stop("mlflow", tmp_path, echo=lambda _: None) is True
    assert proc.wait(timeout=10) == -15  # SIGTERM
    assert not (tmp_path / "services" / "mlflow" / "state.json").exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # its child went with it


def test_a_process_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                             "print(1, flush=True); time.sleep(60)"], start_new_session=True, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"1"  # its handler is in place
    record(proc, tmp_path)
    started = time.monotonic()
    services.stop("mlflow", tmp_path, timeout=1, echo=lambda _: None)
    assert proc.wait(timeout=10) == -9 and time.monotonic() - started >= 1


def test_a_running_service_is_reported_not_started_twice(tmp_path):
    proc = detached()
    try:
        state = record(proc, tmp_path, port=5999)
        said = []
        assert services.start("mlflow", home=tmp_path, echo=said.append) == state
        assert said == [f"mlflow: already running (pid {proc.pid}) at http://127.0.0.1:5999"]
    finally:
        proc.kill()
        proc.wait()


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, listening):
    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path))
    assert main(["serve", "status"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{name:8} stopped" for name in services.SERVICES]
    assert main(["serve", "prefect", "--port", str(listening)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"gptflow: error: port {listening} on 127.0.0.1 is taken")
    assert main(["serve", "worker"]) == 2
    assert "run `gptflow serve prefect` first" in capsys.readouterr().err
    assert main(["serve", "stop"]) == 0  # nothing running is not an error
    assert capsys.readouterr().out.splitlines() == [f"{n}: not running" for n in reversed(services.SERVICES)]


def test_the_worker_runs_flows_against_the_workspace_servers(tmp_path):
    proc = detached()
    try:
        services.write_state(State(name="prefect", pid=proc.pid, host="127.0.0.1", port=4311,
                                   url="http://127.0.0.1:4311", export="PREFECT_API_URL=http://127.0.0.1:4311/api"), tmp_path)
        record(proc, tmp_path, port=5311)
        env = services.service_env("worker", tmp_path)
        assert env["PREFECT_API_URL"] == "http://127.0.0.1:4311/api"
        assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5311"
        assert "RAY_ADDRESS" not in env or env["RAY_ADDRESS"] == os.environ.get("RAY_ADDRESS")  # no head recorded
        assert env["GPTFLOW_HOME"] == str(tmp_path) and os.path.isdir(env["GPTFLOW_REPO"])
    finally:
        proc.kill()
        proc.wait()


def test_ray_temp_dir_fits_ray_socket_paths(tmp_path):
    short, deep = Path("/w/h"), tmp_path / ("x" * 60) / "home"
    assert services.ray_temp_dir(short) == short / "services" / "ray" / "tmp"  # short enough: in the workspace
    far = services.ray_temp_dir(deep)
    sockets = far / "session_2026-11-30_08-30-10_253155_28395" / "sockets" / "plasma_store"  # what Ray appends
    assert len(str(sockets)) <= 107
    assert (deep / "services" / "ray" / "tmp").resolve() == far.resolve()  # reachable from the workspace
    assert services.ray_temp_dir(deep) == far  # the same folder every time
    shutil.rmtree(far)


def test_stopping_ray_removes_its_short_temp_folder(tmp_path):
    home = tmp_path / ("x" * 60)
    far = services.ray_temp_dir(home)
    proc = detached()
    record(proc, home, name="ray", port=6399)
    services.stop("ray", home, echo=lambda _: None)
    assert proc.wait(timeout=10) == -15
    assert not far.exists() and not (home / "services" / "ray" / "tmp").is_symlink()
