"""Stage folders, content hashes and manifests: how a stage knows it has already been done.

A stage writes into `<runs>/<stage>/<key>/`, where `key` hashes the stage name, its config and the content
of its inputs. `manifest.json` (inputs with hashes, parameters, counts, outputs) is written last, then
`_SUCCESS`; a folder with `_SUCCESS` is reused as it is, so a rerun with the same inputs and parameters does
not recompute it. A folder without it is the stage's own scratch: stages that checkpoint resume from it.
An input may also be an fsspec URL (`https://`, `s3://`): it is hashed from what its server says about it
(`url_sha256`), not downloaded. Within `remote_lookups()` that is asked once per URL, however many steps ask.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

log = logging.getLogger(__name__)


class GptflowError(Exception):
    """An error the user can act on: the CLI prints its message without a traceback."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


# What fsspec's info() reports about a remote file's version: HTTP headers (http), S3 and GCS object metadata.
_VERSION_KEYS = ("ETag", "etag", "Content-MD5", "Digest", "Last-Modified", "LastModified", "VersionId",
                 "md5Hash", "crc32c", "generation", "updated", "mtime", "checksum")


_lookups: contextvars.ContextVar[dict[tuple[str, str], Any] | None] = contextvars.ContextVar(
    "gptflow_remote_lookups", default=None)


@contextmanager
def remote_lookups() -> Iterator[None]:
    """Within this block, what a server says about a remote file (`file_info`) and a listing's lines are fetched
    once. Otherwise a data run asks about each URL input four times: whether it exists, its hash for the stage
    key, the check before any work, its size when files are dealt to tasks. Nested blocks share the outer one's
    answers; failures are not remembered, so the step that needs the answer raises its own error."""
    if _lookups.get() is not None:
        yield
        return
    token = _lookups.set({})
    try:
        yield
    finally:
        _lookups.reset(token)


def remembered(kind: str, key: str, fetch: Callable[[], Any]) -> Any:
    """`fetch()`, or its earlier answer for (kind, key) within `remote_lookups()`."""
    answers = _lookups.get()
    if answers is None:
        return fetch()
    if (kind, key) not in answers:
        answers[(kind, key)] = fetch()
    return answers[(kind, key)]


def file_info(path: str) -> dict[str, Any]:
    """fsspec's `info()` of a local path or URL (type, size; for a URL its server's version headers)."""
    from fsspec.core import url_to_fs

    def fetch() -> dict[str, Any]:
        fs, fs_path = url_to_fs(path)
        return fs.info(fs_path)

    return remembered("info", path, fetch) if is_url(path) else fetch()


def prefetch_info(paths: Iterable[str], threads: int = 16) -> None:
    """Within `remote_lookups()`, ask about the URLs among `paths` in parallel: one request each, instead of one
    after another in the checks (a listing can name thousands). Errors are left for those checks to raise."""
    urls = sorted({str(p) for p in paths if is_url(p)})
    if len(urls) < 2 or _lookups.get() is None:
        return

    def ask(url: str) -> None:
        try:
            file_info(url)
        except Exception:  # noqa: BLE001  the check that needs this answer asks again and names the input
            pass

    with ThreadPoolExecutor(min(threads, len(urls))) as pool:  # each call in a copy of this context: same answers
        for future in [pool.submit(contextvars.copy_context().run, ask, url) for url in urls]:
            future.result()


def url_sha256(url: str) -> str:
    """Hash a remote file by its URL, size and version metadata (ETag, Last-Modified, checksums) without
    downloading it: a Common Crawl WARC is about 1 GB. Only when the server reports no version at all (a size
    alone would miss an edit) is the content streamed and hashed."""
    from fsspec.core import url_to_fs

    info = file_info(url)
    version = {k: str(info[k]) for k in _VERSION_KEYS if info.get(k)}
    if not version:
        h = hashlib.sha256()
        fs, fs_path = url_to_fs(url)
        with fs.open(fs_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        version = {"content_sha256": h.hexdigest()}
    blob = json.dumps({"url": url, "size": info.get("size"), **version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def input_exists(path: str | Path) -> bool:
    if is_url(path):
        try:
            file_info(str(path))
        except Exception:  # noqa: BLE001  as fsspec's exists(): unreachable counts as missing; the caller names it
            return False
        return True
    return Path(path).exists()


def path_sha256(path: str | Path) -> str:
    """Hash a file, or a folder as the hash of its files' relative names and hashes; a URL with `url_sha256`."""
    if is_url(path):
        return url_sha256(str(path))
    path = Path(path)
    if not path.exists():
        raise GptflowError(f"input path does not exist: {path}")
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def stage_key(stage: str, params: Mapping[str, Any], input_hashes: Mapping[str, str]) -> str:
    blob = json.dumps({"stage": stage, "params": params, "inputs": dict(input_hashes)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    if not (stage_dir / "_SUCCESS").exists():
        return None
    return json.loads((stage_dir / "manifest.json").read_text())


def run_stage(
    stage: str,
    cfg: BaseModel,
    inputs: Mapping[str, Path | str],
    core: Callable[[Path], dict[str, Any]],
    root: Path,
) -> dict[str, Any]:
    """Run `core(out_dir)` unless a finished folder for the same key exists; return the manifest.

    `core` returns `{"counts": {...}, "metrics": {...}, "outputs": {name: path}}`; the outputs are hashed into
    the manifest so that the next stage's key changes exactly when this stage's output changes.
    """
    for name, p in inputs.items():
        if not input_exists(p):
            raise GptflowError(f"{stage}: input '{name}' does not exist: {p}")
    hashes = {name: path_sha256(p) for name, p in inputs.items()}
    params = cfg.model_dump(mode="json")
    key = stage_key(stage, params, hashes)
    out_dir = Path(root) / stage / key
    done = read_manifest(out_dir)
    if done is not None:
        log.info("%s: inputs and parameters unchanged, reusing %s", stage, out_dir)
        return {**done, "cached": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = core(out_dir)
    seconds = time.perf_counter() - start
    outputs = {name: str(Path(p)) for name, p in result.get("outputs", {}).items()}
    manifest = {
        "stage": stage,
        "key": key,
        "dir": str(out_dir),
        "inputs": {name: {"path": str(inputs[name]), "sha256": hashes[name]} for name in inputs},
        "params": params,
        "counts": result.get("counts", {}),
        "metrics": result.get("metrics", {}),
        "outputs": {name: {"path": p, "sha256": path_sha256(Path(p))} for name, p in outputs.items()},
        "seconds": round(seconds, 3),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    (out_dir / "_SUCCESS").write_text(key)
    return {**manifest, "cached": False}


def output(manifest: Mapping[str, Any], name: str) -> Path:
    return Path(manifest["outputs"][name]["path"])
