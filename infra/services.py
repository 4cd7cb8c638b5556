"""`gptflow serve`: the long-lived servers a team runs gptflow against, one command each.

    gptflow serve prefect|mlflow|ray|worker|all [--host H] [--port N]
    gptflow serve status
    gptflow serve stop [prefect|mlflow|ray|worker|all]

Each server is a detached process (its own session, so it outlives the command and a terminal's Ctrl-C), bound
to 127.0.0.1 unless `--host` says otherwise, with its state in `$GPTFLOW_HOME/services/<name>/`: `state.json`
(pid, URL, the variable to export), `server.log` and, for the servers, their database or temp files. The command
returns once the server answers its health check and prints the URL to open and the line to export.

The worker runs flow runs of the `gptflow` work pool (created if missing) against the Prefect server in the
workspace, with the MLflow server and Ray head in the workspace as its tracking URI and Ray address.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from infra.env import REPO_ROOT, workspace

SERVICES = ("prefect", "mlflow", "ray", "worker")  # the start order of `serve all`; stopped in reverse
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "ray": 6379, "worker": 0}
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServiceError(Exception):
    """A one-line error the user can act on (a port taken, a server that did not come up)."""


@dataclass(frozen=True)
class State:
    name: str
    pid: int
    host: str
    port: int
    url: str  # what to open in a browser (Ray's address for ray, the Prefect UI's work pool for the worker)
    export: str  # `NAME=value` for clients; empty for the worker


# ---------------------------------------------------------------------------------------------- state files


def service_dir(name: str, home: Path | None = None) -> Path:
    return (home or workspace()) / "services" / name


def read_state(name: str, home: Path | None = None) -> State | None:
    """The recorded state of `name`, or None when nothing was started or the process is gone (a stale file)."""
    path = service_dir(name, home) / "state.json"
    if not path.exists():
        return None
    try:
        state = State(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None  # a half-written or foreign file: treat as not running
    return state if alive(state.pid) else None


def write_state(state: State, home: Path | None = None) -> Path:
    path = service_dir(state.name, home) / "state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(path)  # readers never see half a file
    return path


def remove_state(name: str, home: Path | None = None) -> None:
    (service_dir(name, home) / "state.json").unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, and not ours to signal
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): os.kill said it exists


# ---------------------------------------------------------------------------------------------- ports, URLs


def check_port(host: str, port: int, name: str) -> None:
    """ServiceError naming the port when something else listens on it, before anything is started."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to a server
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ServiceError(f"port {port} on {host} is taken by another program, so {name} cannot start there "
                               f"({e.strerror}); choose another with --port") from None


def urls(name: str, host: str, port: int, pool: str = "gptflow", prefect_url: str = "") -> tuple[str, str]:
    """(the URL to open, the `VAR=value` clients export) for a service."""
    if name == "prefect":
        return f"http://{host}:{port}", f"PREFECT_API_URL=http://{host}:{port}/api"
    if name == "mlflow":
        return f"http://{host}:{port}", f"MLFLOW_TRACKING_URI=http://{host}:{port}"
    if name == "ray":
        return f"{host}:{port}", f"RAY_ADDRESS={host}:{port}"  # no dashboard: it needs ray[default]
    return f"{prefect_url}/work-pools/work-pool/{pool}", ""


# ---------------------------------------------------------------------------------------------- commands


def _bin(tool: str) -> str:
    """The console script next to this Python (the project's venv), else the one on PATH."""
    path = Path(sys.executable).parent / tool
    return str(path) if path.exists() else tool


def worker_name(pool: str) -> str:
    return f"gptflow-worker-{pool}"


def ray_temp_dir(home: Path) -> Path:
    """The Ray head's temp folder: `services/ray/tmp` in the workspace, or, when that path is too long for Ray's
    Unix sockets (107 bytes with the ~64 Ray appends), a short folder in the system temp dir named after the
    workspace, linked from `services/ray/tmp`."""
    inside = service_dir("ray", home) / "tmp"
    if len(str(inside)) <= 40:
        return inside
    short = Path(tempfile.gettempdir()) / f"gptflow-ray-{hashlib.sha256(str(home).encode()).hexdigest()[:8]}"
    short.mkdir(parents=True, exist_ok=True)
    if not inside.is_symlink():
        inside.parent.mkdir(parents=True, exist_ok=True)
        inside.symlink_to(short, target_is_directory=True)
    return short


def command(name: str, host: str, port: int, home: Path, backend_store_uri: str | None = None,
            artifacts_destination: str | None = None, pool: str = "gptflow") -> list[str]:
    """The foreground command line of a service (detached by `start`)."""
    state = service_dir(name, home)
    if name == "prefect":
        return [_bin("prefect"), "server", "start", "--host", host, "--port", str(port)]
    if name == "mlflow":
        return [_bin("mlflow"), "server", "--host", host, "--port", str(port), "--workers", "1",
                "--backend-store-uri", backend_store_uri or f"sqlite:///{state / 'mlflow.db'}",
                "--artifacts-destination", artifacts_destination or str(state / "artifacts")]
    if name == "ray":
        # --block keeps this process as the head's parent: its pid is the service's, and SIGTERM stops the node.
        # Ray itself swaps 127.0.0.1 for the machine's address (`resolve_ip_for_localhost`) and its GCS listens on
        # every interface: unlike the other servers, a Ray head is reachable from the network (README).
        return [_bin("ray"), "start", "--head", "--block", "--node-ip-address", host, "--port", str(port),
                "--temp-dir", str(ray_temp_dir(home)), "--include-dashboard", "false", "--disable-usage-stats"]
    if name == "worker":
        # --type creates the pool when it is missing
        return [_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", worker_name(pool)]
    raise ServiceError(f"unknown service '{name}'; choose one of: {', '.join(SERVICES)}")


def service_env(name: str, home: Path) -> dict[str, str]:
    """The environment a service runs with: its home in the workspace; the worker also the other servers' URLs."""
    env = dict(os.environ)
    state = service_dir(name, home)
    if name == "prefect":
        env.pop("PREFECT_API_URL", None)
        env |= {"PREFECT_HOME": str(state), "PREFECT_UI_ENABLED": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{state / 'prefect.db'}"}
    elif name == "mlflow":
        env |= {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    elif name == "ray":
        env |= {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    elif name == "worker":
        prefect = read_state("prefect", home)
        if prefect is None:
            raise ServiceError("the worker needs the Prefect server: run `gptflow serve prefect` first")
        env |= {"PREFECT_HOME": str(state), prefect.export.split("=", 1)[0]: prefect.export.split("=", 1)[1],
                "GPTFLOW_REPO": env.get("GPTFLOW_REPO", str(REPO_ROOT)),  # prefect.yaml's pull step goes there
                "GPTFLOW_HOME": str(home),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))}
        for other in ("mlflow", "ray"):  # flow runs track to, and train on, the workspace's servers
            running = read_state(other, home)
            if running is not None:
                key, value = running.export.split("=", 1)
                env[key] = value
    return env


# ---------------------------------------------------------------------------------------------- health


def healthy(state: State, home: Path) -> bool:
    """One health check: Prefect `/api/health`, MLflow `/health`, `ray status`, the worker online in its pool."""
    try:
        if state.name == "prefect":
            return _get(f"http://{state.host}:{state.port}/api/health") == 200
        if state.name == "mlflow":
            return _get(f"http://{state.host}:{state.port}/health") == 200
        if state.name == "ray":
            out = subprocess.run([_bin("ray"), "status", "--address", f"{state.host}:{state.port}"],
                                 capture_output=True, timeout=60, env=service_env("ray", home))
            return out.returncode == 0
        return _worker_online(state)
    except (OSError, subprocess.TimeoutExpired):
        return False


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status


def _worker_online(state: State) -> bool:
    api = state.url.split("/work-pools/")[0] + "/api"
    pool = state.url.rsplit("/", 1)[1]
    req = urllib.request.Request(f"{api}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            workers = json.loads(resp.read())
    except urllib.error.HTTPError:
        return False  # 404 until the worker has created its pool
    return any(w["name"] == worker_name(pool) and w.get("status") == "ONLINE" for w in workers)


# ---------------------------------------------------------------------------------------------- start, stop


def start(name: str, host: str = "127.0.0.1", port: int | None = None, home: Path | None = None,
          backend_store_uri: str | None = None, artifacts_destination: str | None = None, pool: str = "gptflow",
          timeout: float = 180, echo=print) -> State:
    """Start `name` detached and wait for its health check; if it already runs, say so and return its state."""
    home = home or workspace()
    launched = launch(name, host, port, home, backend_store_uri, artifacts_destination, pool, echo)
    return wait_ready(launched, home, timeout, echo)


def start_all(host: str = "127.0.0.1", ports: dict[str, int] | None = None, home: Path | None = None,
              backend_store_uri: str | None = None, artifacts_destination: str | None = None, pool: str = "gptflow",
              timeout: float = 180, echo=print) -> list[State]:
    """The three servers launched at once (their start-ups overlap: ~20 s each on 2 cores), then the worker."""
    home, ports = home or workspace(), ports or {}
    launched = [launch(name, host, ports.get(name), home, backend_store_uri, artifacts_destination, pool, echo)
                for name in SERVICES[:-1]]
    states = [wait_ready(one, home, timeout, echo) for one in launched]
    return [*states, start("worker", host, None, home, pool=pool, timeout=timeout, echo=echo)]


def launch(name: str, host: str, port: int | None, home: Path, backend_store_uri: str | None = None,
           artifacts_destination: str | None = None, pool: str = "gptflow", echo=print) -> State | tuple[State, subprocess.Popen]:
    """Start `name` detached and record its state: (state, process), or the state alone if it already runs."""
    running = read_state(name, home)
    if running is not None:
        echo(f"{name}: already running (pid {running.pid}) at {running.url}")
        return running
    if host not in LOCAL_HOSTS:
        echo(f"warning: {name} will listen on {host}, reachable from other machines, with no authentication")
    port = DEFAULT_PORTS[name] if port is None else port
    prefect_url = ""
    if name == "worker":
        prefect = read_state("prefect", home)
        if prefect is None:
            raise ServiceError("the worker needs the Prefect server: run `gptflow serve prefect` first")
        prefect_url = prefect.url
    else:
        check_port(host, port, name)
    cmd = command(name, host, port, home, backend_store_uri, artifacts_destination, pool)
    env = service_env(name, home)
    if name == "prefect":  # the UI's API address follows the settings, not `--port`: it said :4200 on any port
        env["PREFECT_UI_API_URL"] = f"http://{host}:{port}/api"
    folder = service_dir(name, home)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "server.log", "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO_ROOT)
    url, export = urls(name, host, port, pool, prefect_url)
    state = State(name=name, pid=proc.pid, host=host, port=port, url=url, export=export)
    write_state(state, home)
    return state, proc


def wait_ready(launched: State | tuple[State, subprocess.Popen], home: Path, timeout: float = 180, echo=print) -> State:
    """Wait for a launched service's health check; if it exits or stays silent, stop it and raise with its log."""
    if isinstance(launched, State):
        return launched  # it was already running
    state, proc = launched
    log = service_dir(state.name, home) / "server.log"
    deadline = time.monotonic() + timeout
    while not healthy(state, home):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with status {proc.returncode}" if proc.poll() is not None else f"did not answer in {timeout:.0f} s"
            stop(state.name, home, echo=lambda _: None)
            raise ServiceError(f"{state.name} {why}; its log: {log}\n" + _tail(log))
        time.sleep(0.5)
    echo(f"{state.name}: running (pid {state.pid}); " + ("open " if state.url.startswith("http") else "at ")
         + state.url + (f"\n  export {state.export}" if state.export else ""))
    return state


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(name: str, home: Path | None = None, timeout: float = 30, echo=print) -> bool:
    """SIGTERM the service's process group, SIGKILL after `timeout`; remove its state. False if it was not running.

    Not `ray stop`: it stops every Ray on the machine, other users' and other workspaces' included. The head's
    `ray start --block` process stops its node's processes on SIGTERM; any left (they outlive a SIGKILL) are
    found by the workspace's Ray temp folder on their command lines."""
    home = home or workspace()
    state = read_state(name, home)
    remove_state(name, home)
    if state is None:
        echo(f"{name}: not running")
        return False
    _signal_group(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(state.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(state.pid):
        _signal_group(state.pid, signal.SIGKILL)
    if name == "ray":
        temp = ray_temp_dir(home)
        for pid in _pids_with(str(temp)):
            _signal_group(pid, signal.SIGKILL, group=False)
        if temp.parent != service_dir("ray", home):  # the short folder outside the workspace: not left in /tmp
            shutil.rmtree(temp, ignore_errors=True)
            (service_dir("ray", home) / "tmp").unlink(missing_ok=True)
    echo(f"{name}: stopped (pid {state.pid})")
    return True


def _signal_group(pid: int, sig: int, group: bool = True) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pids_with(text: str) -> list[int]:
    """Our own processes whose command line mentions `text` (Linux; elsewhere none)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.stat().st_uid == os.getuid() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            pass
    return [pid for pid in found if pid != os.getpid()]


def status(home: Path | None = None) -> list[str]:
    """One line per service: running with its pid and URL, or stopped."""
    lines = []
    for name in SERVICES:
        state = read_state(name, home)
        lines.append(f"{name:8} running  pid {state.pid:<7} {state.url}" if state else f"{name:8} stopped")
    return lines
