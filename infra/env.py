"""One place for environment defaults: offline switches, telemetry off, every cache inside the workspace.

`GPTFLOW_HOME` (default: `<repo>/.gptflow`) is the workspace: Prefect home, Ray temp files, Hugging Face
caches, the MLflow sqlite file and the run folders live there, so nothing is written into the user's home.
Variables the user already set win: `MLFLOW_TRACKING_URI`, `PREFECT_API_URL` and `RAY_ADDRESS` point the
pipeline at real servers.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"


def workspace() -> Path:
    return Path(os.environ.get("GPTFLOW_HOME", REPO_ROOT / ".gptflow")).resolve()


def defaults(home: Path) -> dict[str, str]:
    return {
        # Prefect: home in the workspace, no analytics, a patient ephemeral server on 2 cores.
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        # A server that stops answering mid-run: Prefect's client retries each request 5 times, 2**n s apart (about
        # a minute a request); bounded to 2 (~6 s), then `flows.cli.prefect_errors` names the server.
        "PREFECT_CLIENT_MAX_RETRIES": "2",
        # MLflow: sqlite in the workspace (the file store raises in MLflow 3), no telemetry.
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # A tracking server that stops answering mid-run: MLflow's client retries 7 times with a backoff factor of 2
        # (about 4 minutes) and a 120 s timeout each; bounded to ~10 s, then `tasks.tracking.server_errors` names it.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        # Ray: no usage stats, no token auth file in ~/.ray, temp files under the workspace.
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_TRAIN_V2_ENABLED": "1",
        "RAY_DEDUP_LOGS": "1",
        # Hugging Face and friends: offline, caches in the workspace.
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",  # datasets' own ping (a HEAD request per load) when the Hub is on
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TLDEXTRACT_CACHE": str(home / "cache" / "tldextract"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "MPLCONFIGDIR": str(home / "cache" / "matplotlib"),
        "TQDM_MININTERVAL": "2",
        # lm-eval: bootstrap stderrs in this process. Its default forks a pool of the whole process, Ray's and
        # Prefect's threads included, for what is one chunk of 1,000 draws here; one such pool hung at teardown.
        "DISABLE_MULTIPROC": "1",
    }


def setup_env() -> Path:
    """Apply the defaults (without overriding what is already set) and return the workspace folder."""
    home = workspace()
    home.mkdir(parents=True, exist_ok=True)
    for key, value in defaults(home).items():
        os.environ.setdefault(key, value)
    for key in ("PREFECT_HOME", "HF_HOME", "XDG_CACHE_HOME"):
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
    return home


def runs_dir() -> Path:
    return workspace() / "runs"


def resolve_path(p: str | Path) -> Path:
    """A user path: absolute, or relative to the current folder, or else relative to the repo (bundled data)."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    return (REPO_ROOT / path).resolve() if (REPO_ROOT / path).exists() else path.resolve()
