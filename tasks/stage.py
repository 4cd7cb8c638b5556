"""Stage folders, content hashes and manifests: how a stage knows it has already been done.

A stage writes into `<runs>/<stage>/<key>/`, where `key` hashes the stage name, its config and the content
of its inputs. `manifest.json` (inputs with hashes, parameters, counts, outputs) is written last, then
`_SUCCESS`; a folder with `_SUCCESS` is reused as it is, so a rerun with the same inputs and parameters does
not recompute it. A folder without it is the stage's own scratch: stages that checkpoint resume from it.
The key also holds the version of the code that computes the stage (`tasks.code_version`: its modules' source
and the versions of the libraries they call), so a code change reruns the stage; `manifest.json` says which.
One process at a time works in a stage folder: `run_stage` holds an OS lock on `<stage>/<key>.lock` while the core
runs, so a second run of the same stage and key (another pipeline on the same workspace) waits, then reuses the
finished folder. The OS drops the lock when its holder dies, so a killed run leaves no stale lock.
An input may also be an fsspec URL (`https://`, `s3://`): it is hashed from what its server says about it
(`url_sha256`), not downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from infra.env import resolve_path
from infra.locks import file_lock
from tasks.code_version import code_version
from tasks.refs import InputRef, Ref, dump_ref, load_ref

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


def file_info(path: str) -> dict[str, Any]:
    """fsspec's `info()` of a local path or URL (type, size; for a URL its server's version headers)."""
    from fsspec.core import url_to_fs

    fs, fs_path = url_to_fs(path)
    return fs.info(fs_path)


def file_infos(paths: Iterable[str], threads: int = 16) -> dict[str, dict[str, Any] | Exception]:
    """`file_info` of every path, URLs asked in parallel (a crawl listing names thousands); a failure is returned
    in place of its answer, for the caller to name the input."""

    def ask(path: str) -> dict[str, Any] | Exception:
        try:
            return file_info(path)
        except Exception as e:  # noqa: BLE001  the caller raises, naming the input
            return e

    paths = list(dict.fromkeys(str(p) for p in paths))
    if sum(is_url(p) for p in paths) < 2:
        return {p: ask(p) for p in paths}
    with ThreadPoolExecutor(min(threads, len(paths))) as pool:
        return dict(zip(paths, pool.map(ask, paths), strict=True))


def url_sha256(url: str, info: Mapping[str, Any] | None = None) -> str:
    """Hash a remote file by its URL, size and version metadata (ETag, Last-Modified, checksums) without
    downloading it: a Common Crawl WARC is about 1 GB. Only when the server reports no version at all (a size
    alone would miss an edit) is the content streamed and hashed."""
    from fsspec.core import url_to_fs

    info = file_info(url) if info is None else info
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


def stage_key(stage: str, params: Mapping[str, Any], input_hashes: Mapping[str, str], code: str) -> str:
    """The stage folder's name: a hash of the stage, its parameters, its inputs' content and its code version."""
    blob = json.dumps({"stage": stage, "params": params, "inputs": dict(input_hashes), "code": code},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    if not (stage_dir / "_SUCCESS").exists():
        return None
    return json.loads((stage_dir / "manifest.json").read_text())


def as_input(value: Ref | Path | str) -> Ref:
    """A stage input: a ref from another stage, or a path or URL the user gave (resolved as `infra.env` does)."""
    if isinstance(value, Ref):
        return value
    text = str(value)
    return InputRef(path=text if is_url(text) else str(resolve_path(text)))


def input_hashes(stage: str, inputs: Mapping[str, Ref]) -> dict[str, str]:
    """The sha256 of each input: a ref's own (computed once, by the stage that made it), else hashed here."""
    hashes = {}
    for name, ref in inputs.items():
        if not ref.sha256 and not input_exists(ref.path):
            raise GptflowError(f"{stage}: input '{name}' does not exist: {ref.path}")
        hashes[name] = ref.sha256 or path_sha256(ref.path)
    return hashes


def seal(ref: Ref, **done: Any) -> Ref:
    """Fill in what `run_stage` knows once the core has returned: hashes, stage, key, manifest, seconds."""
    nested = {name: seal(value, **done) for name, value in ref if isinstance(value, Ref)}
    sha = ref.sha256 or path_sha256(ref.path)
    return ref.model_copy(update={"sha256": sha, **nested, **done})


def output_hashes(ref: Ref) -> dict[str, dict[str, str]]:
    """Every named output of a sealed ref with its sha256; a path already hashed (the main output, a nested ref's)
    is not hashed again: the token shards folder can be gigabytes."""
    nested = {name: v for name, v in ref if isinstance(v, Ref)}
    known = {ref.path: ref.sha256} | {v.path: v.sha256 for v in nested.values()}
    outputs = {name: {"path": v.path, "sha256": v.sha256} for name, v in nested.items()}
    for name, p in ref.files.items():
        outputs[name] = {"path": p, "sha256": known.get(p) or path_sha256(p)}
    return outputs


def run_stage(
    stage: str,
    cfg: BaseModel,
    inputs: Mapping[str, Ref | Path | str],
    core: Callable[[Path], Ref],
    root: Path,
    code: str | None = None,
) -> Ref:
    """Run `core(out_dir)` unless a finished folder for the same key exists; return the stage's sealed ref.

    The key hashes the stage name, the config, the inputs' content and the code version of module `code`
    (default: the module of the config's class, which lives next to the stage's core). The core runs under the
    folder's lock (`infra.locks.file_lock`). `manifest.json` (inputs with hashes, parameters, code version,
    counts, metrics, outputs with hashes, the ref) is written when the core returns, `_SUCCESS` last; a folder
    without `_SUCCESS` is the stage's unfinished work, which a stage that checkpoints resumes.
    """
    refs = {name: as_input(v) for name, v in inputs.items()}
    hashes = input_hashes(stage, refs)
    params = cfg.model_dump(mode="json")
    version = code_version(code or type(cfg).__module__)
    key = stage_key(stage, params, hashes, version["sha256"])
    out_dir = Path(root) / stage / key
    if (ref := reuse(stage, out_dir)) is not None:
        return ref
    with file_lock(Path(root) / stage / f"{key}.lock", stage):
        if (ref := reuse(stage, out_dir)) is not None:  # the run we waited for finished it
            return ref
        return compute(stage, key, refs, hashes, params, version, core, out_dir)


def reuse(stage: str, out_dir: Path) -> Ref | None:
    """The ref of a finished stage folder, marked cached; None when it is not finished."""
    done = read_manifest(out_dir)
    if done is None:
        return None
    log.info("%s: inputs, parameters and code unchanged, reusing %s", stage, out_dir)
    return load_ref(done["ref"]).model_copy(update={"cached": True})


def compute(stage: str, key: str, refs: Mapping[str, Ref], hashes: Mapping[str, str], params: dict[str, Any],
            version: dict[str, Any], core: Callable[[Path], Ref], out_dir: Path) -> Ref:
    """Run the core in `out_dir` (under the lock), seal its ref, write `manifest.json`, then `_SUCCESS`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ref = core(out_dir)
    seconds = round(time.perf_counter() - start, 3)
    ref = seal(ref, stage=stage, key=key, manifest=str(out_dir / "manifest.json"), seconds=seconds)
    manifest = {
        "stage": stage,
        "key": key,
        "dir": str(out_dir),
        "inputs": {name: {"path": refs[name].path, "sha256": hashes[name]} for name in refs},
        "params": params,
        "code_version": version,
        "counts": ref.counts,
        "metrics": ref.metrics,
        "outputs": output_hashes(ref),
        "seconds": seconds,
        "ref": dump_ref(ref),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    (out_dir / "_SUCCESS").write_text(key)
    return ref
