"""Inputs of the data stage: local files, fsspec URLs and Common Crawl `*.paths.gz` listings.

A Common Crawl listing (`warc.paths.gz`, `wet.paths.gz`) holds one path per line, relative to the bucket
(`crawl-data/CC-MAIN-2024-22/segments/.../warc/....warc.gz`). `expand_inputs` turns each listing into full URLs
under a base before anything else runs, so the rest of the stage (existence checks, WET-vs-WARC by file name,
reader assignment, input hashing) only ever sees plain files or URLs. URLs are any fsspec URL (`https://`,
`s3://`, ...): their filesystems are only asked for `info()` (exists, size) until the readers stream them.
"""

from __future__ import annotations

import posixpath

from infra import env
from tasks.stage import file_info, is_url, remembered

LISTING_SUFFIXES = (".paths.gz", ".paths")
COMMON_CRAWL_BASE = "https://data.commoncrawl.org/"


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

    def fetch() -> list[str]:
        with fsspec.open(resolved, "rt", compression="infer", encoding="utf-8") as f:
            return [line.strip() for line in f]

    resolved = resolve_path(listing)
    try:
        lines = list(remembered("listing", resolved, fetch))  # read once within `remote_lookups()`
    except FileNotFoundError as e:
        raise FileNotFoundError(f"crawl listing not found: {listing} (looked for {resolved})") from e
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


def check_input(path: str) -> None:
    """Raise naming `path` when it is a WAT file, missing, not a file, or its server cannot be reached."""
    refuse_wat(path)
    resolved = resolve_path(path)
    why = ""
    try:
        info = file_info(resolved)
    except FileNotFoundError as e:  # fsspec's http raises it for a 404 and for a refused connection alike
        info, why = None, f"; {type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ else ""
    except Exception as e:  # DNS, credentials, ...: say which input, keep the cause
        raise OSError(f"data input {path} could not be reached: {type(e).__name__}: {e}") from e
    if info is None or info.get("type", "file") != "file":
        raise FileNotFoundError(f"data input not found: {path} (looked for {resolved}{why})")


def check_inputs(paths: list[str]) -> None:
    for path in paths:
        check_input(path)


# ----------------------------------------------------------------------------------------------------------------
# Which reader and which task read a file


def input_size(path: str) -> int:
    return file_info(resolve_path(path)).get("size") or 0


def deal_files(paths: list[str], tasks: int) -> dict[str, int]:
    """Assign input files to tasks by size, largest first to the least loaded task (files are not split)."""
    sizes = {p: input_size(p) for p in paths}
    load, ranks = [0] * tasks, {}
    for path in sorted(paths, key=lambda p: (-sizes[p], p)):
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
