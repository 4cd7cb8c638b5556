"""A progress bar in the driver's terminal for work that runs in Ray workers (which may be on other machines).

The worker that reports (rank 0) puts `(step, {name: value})` into a Ray queue; a thread in the driver moves the
bar. The same queue carries clock marks, `(name, wall time)` (`report_clock`), which the driver keeps in `marks`.
Ray forwards the workers' log lines to the driver too, so the bar shares the terminal with them; when the
terminal is not a TTY (CI, a log file) tqdm stays quiet and the log lines carry the progress.

The queue is a Ray actor, a Python process of its own: ~1.1-1.5 s to start on 2 cores, which ran beside the fit's
own start-up in every training stage. One queue now serves every stage of a Ray session (the pipeline's five Ray
Train stages start it once); a second bar at the same time gets a queue of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

_shared: dict[tuple[str, str], Any] = {}  # (Ray node, job) -> the session's queue
_in_use = threading.Lock()


@contextmanager
def _session_queue() -> Iterator[tuple[Any, bool]]:
    """This Ray session's queue, started on first use (and whether it is the shared one), or, while another bar
    holds it, a queue of this bar's own."""
    import ray
    from ray.util.queue import Queue

    if not _in_use.acquire(blocking=False):
        yield Queue(maxsize=10_000, actor_options={"num_cpus": 0}), False
        return
    try:
        context = ray.get_runtime_context()
        session = (context.get_node_id(), context.get_job_id())  # a new Ray (a restart) is a new session
        if session not in _shared:
            _shared.clear()
            _shared[session] = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        yield _shared[session], True
    finally:
        _in_use.release()


@contextmanager
def ray_progress(total: int, desc: str, file: IO[str] | None = None,
                 marks: dict[str, list[float]] | None = None) -> Iterator[Any]:
    """Yield a Ray queue for the workers; show its steps on a tqdm bar until the block ends.

    Args:
        total: the last step.
        desc: the bar's label.
        file: where the bar is drawn; None means stderr, and only when it is a terminal.
        marks: where the workers' clock marks go, name -> wall times in order of arrival.
    """
    import ray

    with _session_queue() as (queue, shared):
        try:
            while not queue.empty():  # what an earlier bar's failed workers left behind
                queue.get_nowait()
            yield from _show(queue, total, desc, file, marks)
        finally:
            if not shared:
                ray.kill(queue.actor)


def _show(queue: Any, total: int, desc: str, file: IO[str] | None, marks: dict[str, list[float]] | None) -> Iterator[Any]:
    """Yield `queue`; a thread moves the bar with its items until the caller's block ends."""
    from ray.util.queue import Empty
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", file=file, disable=None if file is None else False,
               mininterval=0.5, dynamic_ncols=True)
    done = threading.Event()

    def show(item: tuple[Any, Any]) -> None:
        step, values = item
        if isinstance(step, str):  # a clock mark
            if marks is not None:
                marks.setdefault(step, []).append(values)
            return
        if values:
            bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        bar.update(step - bar.n)

    def pump() -> None:
        while not done.is_set():
            try:
                show(queue.get(timeout=0.5))
            except Empty:
                pass

    thread = threading.Thread(target=pump, name=f"{desc}-progress", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        done.set()
        thread.join()
        while not queue.empty():  # what arrived after the thread's last look
            show(queue.get_nowait())
        bar.close()


def report_clock(queue: Any, name: str) -> None:
    """From a worker: mark the wall time of `name` (say, its loop's start) on the driver's `marks`; a full or lost
    queue costs the mark, never the fit."""
    import time

    from ray.exceptions import RayError
    from ray.util.queue import Full

    if queue is None:
        return
    try:
        queue.put_nowait((name, time.time()))
    except (Full, RayError):
        pass


def report_progress(queue: Any, step: int, **values: float) -> None:
    """From a worker: move the driver's bar to `step`; never blocks training (a full queue drops the update)."""
    from ray.util.queue import Full

    if queue is None:
        return
    try:
        queue.put_nowait((step, values))
    except Full:
        pass
