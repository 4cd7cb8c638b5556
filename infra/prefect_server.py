"""A Prefect API server for one CLI run, started before the CLI imports anything heavy.

Without `PREFECT_API_URL`, Prefect runs a flow against an ephemeral server: a uvicorn subprocess that it starts
when the flow begins and stops at exit. On 2 cores that costs ~7 s of start-up during which nothing else
happens, plus ~3 s to import the server's code into the client process. `LocalServer` launches the same server
(Prefect's own app factory in ephemeral mode: no UI, no background services, the workspace's database,
127.0.0.1 only) as soon as the CLI has checked its config, so it comes up while the CLI imports the stages,
opens MLflow and warms the stage up; `api_url()` waits for its health check. It stops when the process exits,
after Prefect's own exit handlers have flushed logs and events to it.

FastAPI builds its routers' route tables on the first request that walks them, which Prefect's own ephemeral
server pays on the flow's first API call; a thread pays it as soon as the server answers, while the CLI is still
busy (`infra.startup.warm_up_routes`).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
import time

from infra.startup import warm_up_routes

STARTUP_FAILED = 3  # uvicorn's exit status when it cannot start: its port was taken since we chose it, or else


# uvicorn with the arguments after the parent's PID and a lock file, stopped (SIGTERM: a clean shut-down) once
# that parent is gone. At exit the CLI stops its server itself; this covers a CLI that was killed (SIGKILL, the OOM
# killer), which would otherwise leave its server running for good. Its start-up (creating and migrating the
# workspace's database, registering block types) holds the lock until /health answers: two servers starting at
# once on a fresh workspace (two pipelines) both ran the migrations, and one failed ("duplicate column name").
SERVE_WHILE_PARENT_LIVES = """
import fcntl, http.client, os, signal, sys, threading, time
parent, lock = int(sys.argv[1]), open(sys.argv[2], "a+")
port = int(sys.argv[sys.argv.index("--port") + 1])
fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process exits, killed or not

def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)

def unlock_when_up():
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/health")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        time.sleep(0.2)
    fcntl.flock(lock, fcntl.LOCK_UN)

threading.Thread(target=watch, daemon=True).start()
threading.Thread(target=unlock_when_up, daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[3:]]
from uvicorn.main import main
main()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


class LocalServer:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._launch()
        # Registered before Prefect is imported: exit handlers run last-in first-out, so this one runs after
        # Prefect's, which send the run's last logs and events to this server.
        atexit.register(self.stop)

    def _launch(self) -> None:
        self.port = free_port()
        env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        home = os.environ.get("PREFECT_HOME") or os.path.expanduser("~/.prefect")  # where its sqlite database is
        os.makedirs(home, exist_ok=True)
        cmd = [sys.executable, "-c", SERVE_WHILE_PARENT_LIVES, str(os.getpid()), os.path.join(home, "server.lock"),
               "--factory", "prefect.server.api.server:create_app",
               "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        self.proc = proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        self.warmed = threading.Event()
        args = (f"http://127.0.0.1:{self.port}/api", lambda: proc.poll() is None, self.warmed)
        threading.Thread(target=warm_up_routes, args=args, daemon=True).start()

    def api_url(self, timeout: float | None = None) -> str:
        """The server's API URL once `/health` answers and its route tables are built; RuntimeError if it exits
        or stays silent past `timeout`."""
        timeout = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 90))
        deadline = time.monotonic() + timeout
        while True:
            ready = self.warmed.wait(0.1)  # set by `warm_up_routes` once the tables are built, or when the server exits
            code = self.proc.poll()
            if code == STARTUP_FAILED and port_taken(self.port):
                self._launch()
                continue
            if code is not None:
                raise RuntimeError(f"the local Prefect server exited with status {code} before it answered")
            if ready:
                return f"http://127.0.0.1:{self.port}/api"
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local Prefect server on port {self.port} did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_running: LocalServer | None = None


def local_server() -> LocalServer:
    """This process's server: started on the first call and reused after it, as Prefect reuses its own."""
    global _running
    if _running is None or _running.proc is None or _running.proc.poll() is not None:
        _running = LocalServer()
    return _running
