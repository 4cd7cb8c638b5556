"""Running the data stage's datatrove runs: each on datatrove's `LocalPipelineExecutor` (processes forked from a
forkserver on this machine) or its `RayPipelineExecutor` (`DataConfig.executor`), one after the other, counted.

Each run logs into `<out_dir>/logs/<run>/` (datatrove's logs, per-task stats and completion markers), so a rerun
into the same folder skips the tasks a previous one completed. Workers find the fastText and LDNOOBW assets that
`seed_offline_assets` put where datatrove looks, so nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from infra.startup import start_forkserver
from tasks.data.config import ASSETS_DIR, DataConfig
from tasks.data.counts import DataInvariantError, run_counts
from tasks.data.plan import DatatroveRun

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0
# Our modules that local workers import, preloaded by the forkserver with `infra.startup.FORKSERVER_PRELOAD`;
# importing the blocks also makes datatrove's dependency check cheap in every worker forked from it.
WORKER_MODULES = ["tasks.data.blocks"]


def uses_ray(cfg: DataConfig) -> bool:
    return cfg.executor == "ray" or (cfg.executor == "auto" and bool(os.environ.get("RAY_ADDRESS")))


def start_local_workers() -> None:
    """The forkserver that local workers fork from, with their modules imported once (`infra.startup`)."""
    start_forkserver(WORKER_MODULES)


def seed_offline_assets(assets_dir: Path = ASSETS_DIR) -> list[Path]:
    """Put the bundled fastText LID model and LDNOOBW list where datatrove looks before downloading.

    datatrove's `cached_asset_path_or_download` skips the download when `<assets cache>/<url with / -> _>` and its
    `.completed` marker exist. The cache folder is computed in each worker from the environment, so we seed both
    the folder huggingface_hub resolved at import and the one the current environment gives (they differ only when
    HF_HOME changed after import). The lid.176 URL names the .bin model; fastText loads the bundled .ftz the same way.
    """
    from datatrove.pipeline.filters.c4_filters import _EN_BADWORDS_URL
    from datatrove.utils.lid import FT176LID
    from fsspec.core import strip_protocol
    from huggingface_hub import cached_assets_path

    env_assets = os.environ.get("HF_ASSETS_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "assets"
    )
    seeded = []
    for src, url, namespace, subfolder in [
        (assets_dir / "lid.176.ftz", FT176LID.MODEL_URL, "lid", FT176LID.MODEL_SUBFOLDER),
        (assets_dir / "ldnoobw" / "en", _EN_BADWORDS_URL, "filters", "c4_badwords"),
    ]:
        if not src.is_file():
            raise FileNotFoundError(f"bundled asset missing: {src}")
        folders = {
            Path(cached_assets_path(library_name="datatrove", namespace=namespace, subfolder=subfolder)),
            Path(cached_assets_path(library_name="datatrove", namespace=namespace, subfolder=subfolder,
                                    assets_dir=env_assets)),
        }
        for folder in folders:
            dst = folder / strip_protocol(url).replace("/", "_")
            if not (dst.is_file() and Path(f"{dst}.completed").exists() and dst.stat().st_size == src.stat().st_size):
                # a temporary name, then a rename: another run seeding at the same time never truncates the file
                # under this run's workers, nor they under its
                tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
                Path(f"{dst}.completed").touch()
            seeded.append(dst)
    return seeded


@contextmanager
def run_progress(run: DatatroveRun, logging_dir: Path) -> Iterator[None]:
    """While a run runs, log every `PROGRESS_EVERY_S` seconds how many of its tasks are done, from the completion
    markers datatrove writes (`<logging_dir>/completions/<rank>`); runs that finish sooner say nothing."""
    every_s, stop, start = PROGRESS_EVERY_S, threading.Event(), time.perf_counter()

    def report() -> None:
        while not stop.wait(every_s):
            folder = logging_dir / "completions"
            done = len(list(folder.iterdir())) if folder.is_dir() else 0
            log.info("data run %s: %d/%d tasks done after %.0f s", run.name, done, run.tasks,
                     time.perf_counter() - start)

    thread = threading.Thread(target=report, name=f"progress-{run.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def execute_run(run: DatatroveRun, logging_dir: Path, workers: int, on_ray: bool = False) -> None:
    """One run on the local executor, or on Ray (in the Ray that `run_all` joined or started).

    On Ray each task runs in an actor (1 CPU) that forks one process for it; `infra.ray_cluster.ray_init` passes
    HF_HOME and the offline switches to them. Their stats and completion markers go to `logging_dir`, where
    `run_counts` reads them: on a multi-node cluster it must be on storage every node shares.
    """
    settings: dict[str, Any] = dict(
        pipeline=[step for _, step in run.steps],
        tasks=run.tasks,
        workers=min(workers, run.tasks),
        logging_dir=str(logging_dir),
        skip_completed=True,  # a rerun skips the tasks a finished run completed
    )
    if on_ray:
        from datatrove.executor.ray import RayPipelineExecutor

        # mem_per_cpu_gb is a Ray resource reservation, not a limit; our tasks stay well under 1 GB.
        executor = RayPipelineExecutor(**settings, cpus_per_task=1, mem_per_cpu_gb=1)
    else:
        from datatrove.executor import LocalPipelineExecutor

        start_local_workers()
        executor = LocalPipelineExecutor(**settings, start_method="forkserver")
    executor.run()
    # datatrove's Ray executor logs a failed task and returns; fail here, as the local executor does.
    failed = executor.get_incomplete_ranks(skip_completed=True) if on_ray else []
    if failed:
        raise RuntimeError(f"data run {run.name}: tasks {failed} did not finish on Ray; see {logging_dir}/logs")


def _check_read(run: DatatroveRun, steps: dict[str, dict[str, Any]], written: int | None) -> None:
    """A run that reads what the one before wrote must read all of it."""
    if run.steps[0][0] == "read" and steps[f"{run.name}/read"]["kept"] != written:
        read = steps[f"{run.name}/read"]["kept"]
        raise DataInvariantError(f"run {run.name} read {read} documents; the run before wrote {written}")


def run_all(
    runs: list[DatatroveRun], out_dir: Path, workers: int, on_ray: bool = False
) -> tuple[dict[str, dict[str, Any]], int | None, list[str]]:
    """Run and count the runs in order. Returns the step counts (`<run>/<step>`), the documents the last content
    run wrote and the runs skipped because an earlier one left no documents."""
    from infra.ray_cluster import ray_session

    steps: dict[str, dict[str, Any]] = {}
    written, skipped = None, []
    with ray_session(num_cpus=workers) if on_ray else nullcontext():  # a Ray started here is shut down after
        for run in runs:
            if written == 0:  # every document was dropped: later runs would find no files to read
                skipped.append(run.name)
                continue
            logging_dir = out_dir / "logs" / run.name
            t = time.perf_counter()
            with run_progress(run, logging_dir):
                execute_run(run, logging_dir, workers, on_ray)
            steps |= {f"{run.name}/{key}": c for key, c in run_counts(run, logging_dir).items()}
            _check_read(run, steps, written)
            if any(key == "write" for key, _ in run.steps):
                written = steps[f"{run.name}/write"]["kept"]
            log.info("data run %s done in %.1fs", run.name, time.perf_counter() - t)
    return steps, written, skipped
