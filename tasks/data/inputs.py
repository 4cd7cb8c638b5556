"""Inputs of the data stage: local files, fsspec URLs and Common Crawl `*.paths.gz` listings.

A Common Crawl listing (`warc.paths.gz`, `wet.paths.gz`) holds one path per line, relative to the bucket
(`crawl-data/CC-MAIN-2024-22/segments/.../warc/....warc.gz`). `crawl_inputs` expands each listing into full URLs
under a base, once, then asks about every file once (URLs in parallel) and returns them as `InputRef`s with their
hash and size. That list is what the rest of the stage sees (the stage key, the readers, dealing files to tasks by
size), so nothing asks a server twice. URLs are any fsspec URL (`https://`, `s3://`, ...): their filesystems are
only asked for `info()` (exists, size, version) until the readers stream them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

from infra import env
from tasks.data.config import DataConfig
from tasks.refs import InputRef
from tasks.stage import file_info, file_infos, is_url, path_sha256, url_sha256

LISTING_SUFFIXES = (".paths.gz", ".paths")


def resolve_path(path: str) -> str:
    """fsspec URLs as given; local paths as `infra.env.resolve_path` finds them (cwd, else the repo)."""
    return path if is_url(path) else str(env.resolve_path(path))


def _name_parts(path: str) -> list[str]:
    return posixpath.basename(path).split(".")[1:]


def is_wet(path: str) -> bool:
    """Common Crawl names WET files `*.warc.wet.gz`."""
    return "wet" in _name_parts(path)


def is_wat(path: str) -> bool:
    """Common Crawl names WAT files `*.warc.wat.gz`."""
    return "wat" in _name_parts(path)


def is_listing(path: str) -> bool:
    return path.endswith(LISTING_SUFFIXES)


# ----------------------------------------------------------------------------------------------------------------
# Listings


def _is_listed_path(line: str) -> bool:
    """A listing line: a relative path to a WARC/WET/WAT file (Common Crawl names them all `*.warc*`)."""
    parts = line.split("/")
    return (
        not is_url(line)
        and not line.startswith("/")
        and ".." not in parts
        and not any(ch.isspace() for ch in line)
        and ".warc" in parts[-1]
    )


def read_listing(listing: str) -> list[str]:
    """The relative paths a listing names, in order; a clear error naming the listing when it is unusable."""
    import fsspec

    resolved = resolve_path(listing)
    try:
        with fsspec.open(resolved, "rt", compression="infer", encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except FileNotFoundError as e:  # fsspec's http raises it for a 404 and for an unreachable host alike
        raise FileNotFoundError(
            f"crawl listing not found: {listing} (looked for {resolved}); without access to it, point the data "
            f"stage at a local copy or your own files: --set 'data.inputs=[\"path/to/wet.paths.gz\"]' (or WARC/WET "
            "files), with data.paths_base=FOLDER for a local mirror of the listed files"
        ) from e
    except (OSError, EOFError, UnicodeDecodeError) as e:  # not gzip though named .gz, cut short, binary
        raise ValueError(f"crawl listing {listing} is unreadable: {type(e).__name__}: {e}") from e
    if not any(lines):
        raise ValueError(f"crawl listing {listing} is empty: expected one relative WARC/WET path per line")
    for n, line in enumerate(lines, start=1):
        if line and not _is_listed_path(line):
            raise ValueError(
                f"crawl listing {listing}, line {n}: {line[:100]!r} is not a relative WARC/WET path "
                "(like crawl-data/CC-MAIN-2024-22/segments/.../warc/....warc.gz)"
            )
    return [line for line in lines if line]


def join_base(base: str, relative: str) -> str:
    return base.rstrip("/") + "/" + relative


def expand_inputs(inputs: list[str], base: str, max_files: int | None = None) -> list[str]:
    """Replace each listing by the files it names under `base` (the first `max_files` of each listing)."""
    files: list[str] = []
    for entry in inputs:
        if is_listing(entry):
            files += [join_base(base, p) for p in read_listing(entry)[:max_files]]
        else:
            files.append(entry)
    twice = sorted({f for f in files if files.count(f) > 1})
    if twice:
        raise ValueError(f"an input is listed twice once listings are expanded: {twice[:5]}")
    return files


# ----------------------------------------------------------------------------------------------------------------
# Checks, before any work starts


def refuse_wat(path: str) -> None:
    """WAT files hold one JSON metadata record per crawled record (headers, links), not page text.

    We refuse them up front rather than read them: a WAT input can only yield zero documents, and a
    `wat.paths.gz` passed for `warc.paths.gz` would otherwise download gigabytes for nothing. (A WAT file named
    like a WARC still gets through; `CrawlReader` counts its records as `wat_metadata_only`.)
    """
    if is_wat(path):
        raise ValueError(
            f"data input {path} is a WAT file (JSON metadata records, no page text): give the WARC (HTML) or "
            "WET (text) file of the same segment, e.g. warc.paths.gz or wet.paths.gz instead of wat.paths.gz"
        )


def check_input(path: str, info: Mapping[str, Any] | Exception | None = None) -> Mapping[str, Any]:
    """Raise naming `path` when it is a WAT file, missing, not a file, or its server cannot be reached; else return
    what its filesystem said about it. `info` is that answer (or the error asking raised) when the caller has
    already asked, as `crawl_inputs` has for every file at once."""
    refuse_wat(path)
    resolved = resolve_path(path)
    if info is None:
        try:
            info = file_info(resolved)
        except Exception as e:  # noqa: BLE001  named below
            info = e
    why = ""
    if isinstance(info, FileNotFoundError):  # fsspec's http raises it for a 404 and for a refused connection alike
        why, info = (f"; {type(info.__cause__).__name__}: {info.__cause__}" if info.__cause__ else ""), None
    elif isinstance(info, Exception):  # DNS, credentials, ...: say which input, keep the cause
        raise OSError(f"data input {path} could not be reached: {type(info).__name__}: {info}") from info
    if info is None or info.get("type", "file") != "file":
        raise FileNotFoundError(f"data input not found: {path} (looked for {resolved}{why})")
    return info


# ----------------------------------------------------------------------------------------------------------------
# The stage's inputs: each file named, asked about once, hashed


def input_names(cfg: DataConfig) -> dict[str, str]:
    """The stage's input files as the config gives them, listings expanded: `input_0..` the crawl files in order,
    `text_0..` the text sources. The names are the stage key's, so they must not change. WAT files are refused
    here, before any request: a `wat.paths.gz` would otherwise have every file it lists asked about."""
    files = expand_inputs(cfg.inputs, cfg.paths_base, cfg.max_files)
    names = {f"input_{i}": p for i, p in enumerate(files)} | {f"text_{i}": p for i, p in enumerate(cfg.text_sources)}
    for path in names.values():
        refuse_wat(path)
    return names


def look_up(names: Mapping[str, str]) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """(resolved path, filesystem info) of each named input, every file asked about once, URLs in parallel; the
    first input that is missing or unreachable (in input order) raises, naming it as `check_input` does."""
    resolved = {name: resolve_path(p) for name, p in names.items()}
    infos = file_infos(resolved.values())
    return {name: (resolved[name], check_input(p, infos[resolved[name]])) for name, p in names.items()}


def crawl_inputs(cfg: DataConfig) -> dict[str, InputRef]:
    """The data stage's inputs for `run_stage` and `build_corpus`: each file (listings expanded once) with its
    sha256 and size. A local file is hashed by content; a URL by its server's metadata (size, ETag,
    Last-Modified), from the one answer its server gave."""

    def sha256(path: str, info: Mapping[str, Any]) -> str:
        return url_sha256(path, info) if is_url(path) else path_sha256(path)

    found = look_up(input_names(cfg))
    return {name: InputRef(path=p, sha256=sha256(p, info), size=info.get("size")) for name, (p, info) in found.items()}


def sized_inputs(cfg: DataConfig) -> dict[str, InputRef]:
    """`crawl_inputs` without the content hashes: enough to plan the stage (`warm_up`'s dry run, benchmarks)."""
    return {name: InputRef(path=p, size=info.get("size")) for name, (p, info) in look_up(input_names(cfg)).items()}


def crawl_files(inputs: Mapping[str, InputRef]) -> list[str]:
    """The crawl files among the inputs, in input order."""
    return [inputs[f"input_{i}"].path for i in range(sum(name.startswith("input_") for name in inputs))]


def text_files(cfg: DataConfig, inputs: Mapping[str, InputRef]) -> dict[str, str]:
    """Each text source (its name in the config, which its documents carry) -> its input file."""
    if sum(name.startswith("text_") for name in inputs) != len(cfg.text_sources):
        raise ValueError(f"the inputs {sorted(inputs)} are not those of this config's {len(cfg.text_sources)} text "
                         "sources; get them with crawl_inputs(cfg)")
    return {source: inputs[f"text_{i}"].path for i, source in enumerate(cfg.text_sources)}


# ----------------------------------------------------------------------------------------------------------------
# Which reader and which task read a file


def deal_files(sizes: Mapping[str, int], tasks: int) -> dict[str, int]:
    """Assign input files (path -> size) to tasks, largest first to the least loaded task (files are not split)."""
    load, ranks = [0] * tasks, {}
    for path in sorted(sizes, key=lambda p: (-sizes[p], p)):
        ranks[path] = load.index(min(load))
        load[ranks[path]] += sizes[path]
    return ranks


def split_root(path: str) -> tuple[str, str]:
    """(folder a reader opens, path listed under it). URLs keep their whole path under the bucket or host, so a
    Common Crawl listing spread over many segment folders is read by one reader per host, not one per folder."""
    resolved = resolve_path(path)
    protocol, _, rest = resolved.partition("://")
    if rest and protocol != "file":
        host, _, relative = rest.partition("/")
        return f"{protocol}://{host}", relative
    local = rest or resolved
    return posixpath.dirname(local), posixpath.basename(local)
