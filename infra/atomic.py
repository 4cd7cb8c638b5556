"""Files that are either whole or absent: written under a temporary name in the same folder, flushed to disk,
then renamed over the final name (a rename within one file system is atomic), so a process killed mid-write,
or a disk that fills, never leaves a file that looks complete. A full disk (or a quota, or a file-size limit)
is one `DiskFullError` naming the file and the free space, and the partial file is removed.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

# No room for the write: a full disk, a user quota, the process's RLIMIT_FSIZE (with SIGXFSZ ignored, as Python does).
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(OSError):
    """A write that found no room; its message names the file and the free space left."""


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` is a write that found no room. Writers in Rust (safetensors' `save_file`) raise their own error
    type with the OS error only in the text ("I/O error: No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno in _NO_ROOM
    m = re.search(r"\(os error (\d+)\)", str(e))
    return m is not None and int(m.group(1)) in _NO_ROOM


def _errno(e: BaseException) -> int:
    return e.errno if isinstance(e, OSError) else int(re.search(r"\(os error (\d+)\)", str(e)).group(1))


def disk_full_error(path: Path, e: BaseException) -> DiskFullError:
    """`e` (see `is_disk_full`) as a one-line error naming `path` and the free space of its file system."""
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:,.1f} MiB free"
    except OSError:
        free = "free space unknown"
    code = _errno(e)
    return DiskFullError(code, f"no room to write {path} ({os.strerror(code)}; {free} there): free some space "
                               "and rerun, finished work is kept")


def fsync_path(path: Path) -> None:
    """Flush a written file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (safetensors' `save_file`); when the
    block ends it is synced and renamed to `path`. On any error it is removed and `path` stays as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise disk_full_error(path, e) from e
        raise


@contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO]:
    """`open(path, mode)` that is whole or absent: see `atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)
