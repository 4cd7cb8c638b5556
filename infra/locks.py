"""One process at a time: an OS file lock (`flock`) that names its holder and dies with it.

Two pipeline runs on one workspace share its stage folders and its MLflow database. `file_lock` makes the second
wait for the first, saying once for whom (the holder's pid and host, written into the lock file). The OS drops an
`flock` when its holder exits or is killed, so a crashed run never leaves a stale lock; the file stays, empty of
meaning. `flock` is per machine: runs on several machines must not share one workspace folder.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the block, waiting for its holder if there is one; `what` names the
    work it guards, for the one line that says we wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            log.warning("%s: waiting for %s, which holds %s", what, holder, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
