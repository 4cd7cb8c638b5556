"""Start-up speed work, in one place: what we do so that a run's first seconds go to its work, not to imports.

Each function says what it saves and what it cost before, measured on our shared 2-core machine. None of them
changes a result, and each may be called more than once. Only light standard-library modules are imported here at the
top (urllib, importlib.metadata, datatrove and multiprocess inside the functions that need them: every `gptflow`
command imports this module, `gptflow plan` and `--help` included), and nothing from `tasks/` or `flows/`:
`infra` is a leaf.
"""

from __future__ import annotations

import functools
import gc
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

# ----------------------------------------------------------------------------------------------------------------
# Worker processes: one forkserver that imports the heavy modules once

# Imported once by the forkserver, so every worker of every datatrove run starts with them loaded. `import spacy`
# alone takes 4-10 s here (thinc imports torch); without this each worker of each run pays it again.
FORKSERVER_PRELOAD = [
    "spacy",
    "spacy.lang.en",
    "trafilatura",
    "fasttext",
    "datatrove.pipeline.readers",
    "datatrove.pipeline.extractors",
    "datatrove.pipeline.filters",
    "datatrove.pipeline.formatters",
    "datatrove.pipeline.dedup",
    "datatrove.pipeline.writers",
]


def start_forkserver(extra: Sequence[str] = ()) -> None:
    """Start the forkserver that local workers fork from, which imports `FORKSERVER_PRELOAD` and `extra` (the
    caller's own worker modules) once; idempotent.

    The data stage calls it before each local datatrove run, and the CLI's warm-up calls it earlier, so that the
    imports run while Prefect's server starts. The preload list only takes effect before this process's
    forkserver starts; a later call reuses the running server.
    """
    import multiprocess
    from multiprocess import forkserver

    multiprocess.get_context("forkserver").set_forkserver_preload([*FORKSERVER_PRELOAD, *extra])
    forkserver.ensure_running()


# ----------------------------------------------------------------------------------------------------------------
# datatrove's dependency check


def distribution_installed(name: str) -> bool | None:
    """Whether a distribution of this name is installed: True, or None, as datatrove's `_is_distribution_available`
    answers, but by a lookup of its name. datatrove's parses the metadata of every installed package for each name
    it checks (~0.17 s a name here, ~1.6 s for the data stage's blocks), and does so in every process that builds
    or unpickles a block, each worker included."""
    import importlib.metadata

    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return True


def patch_datatrove_dependency_check() -> Callable[[str], Any] | None:
    """Make datatrove's dependency check answer from `distribution_installed` (cached per name); idempotent.

    Call it in every process before it builds or unpickles a datatrove block: a block checks its dependencies in
    `__new__`, so also when a worker unpickles it. `check_required_dependencies` looks the check up in its module
    at each call, so swapping the module attribute is enough. Returns datatrove's own check (None when this
    datatrove has none), which tests compare ours against.
    """
    from datatrove.utils import _import_utils

    current = getattr(_import_utils, "_is_distribution_available", None)
    if current is None:
        return None
    own = getattr(current, "datatrove_own", current)
    if own is current:  # not patched yet in this process
        patched = functools.lru_cache(distribution_installed)
        patched.datatrove_own = current
        _import_utils._is_distribution_available = patched
    return own


# ----------------------------------------------------------------------------------------------------------------
# Prefect's server: its route tables


def http_status(url: str, timeout: float = 2) -> int | None:
    """The HTTP status of a GET on `url`, None when nothing answers; never through a proxy."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def warm_up_routes(api_url: str, alive: Callable[[], bool], warmed: threading.Event) -> None:
    """Once the server at `api_url` answers its health check, send it one request that no route matches; then
    set `warmed` (also when the server exits first).

    FastAPI builds its routers' route tables on the first request that walks them: ~0.65 s of the server's CPU
    here, which would otherwise be spent on the flow's first API call. Run it in a thread as soon as the server is
    launched, so that the cost is paid while the CLI is still importing and warming its stage up.
    """
    while alive():
        if http_status(f"{api_url}/health") == 200:
            http_status(f"{api_url}/gptflow-warm-up", timeout=30)  # a 404, after every route table is built
            break
        time.sleep(0.1)
    warmed.set()


# ----------------------------------------------------------------------------------------------------------------
# Exit


def freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's sight, for a quick exit.

    At shut-down the interpreter's collector walks the whole heap (Prefect, MLflow, datatrove: ~0.6-1 s here);
    frozen objects are skipped. Exit handlers still run. Call it once the command's work is done.
    """
    gc.freeze()
