"""The one reader of JSON Lines files: plain, gzipped (`.gz`) or bzip2 (`.bz2`), one file or a folder of them.

Blank lines are skipped; a line that is not a JSON object raises `JsonlError` naming the file and the line, so
a bad record in a corpus of thousands of files can be found. Callers with their own error type for the user
(`tasks.stage.GptflowError`) re-raise it as theirs. The parser is the stdlib's on purpose: it keeps the lone
surrogate escapes (`"\\ud800"`) that crawled text carries, which the tokenizer stage then repairs.
"""

from __future__ import annotations

import bz2
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class JsonlError(ValueError):
    """A line of a JSONL file that is not a JSON object."""


def open_text(path: str | Path, newline: str | None = None) -> IO[str]:
    """`path` opened for reading UTF-8 text, decompressed by its suffix (`.gz`, `.bz2`)."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline=newline)
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8", newline=newline)
    return open(path, encoding="utf-8", newline=newline)  # noqa: SIM115 (the caller closes it)


def open_bytes(path: str | Path) -> IO[bytes]:
    """`path` opened for reading bytes, decompressed by its suffix (`.gz`, `.bz2`)."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".bz2":
        return bz2.open(path, "rb")
    return open(path, "rb")  # noqa: SIM115 (the caller closes it)


def check_utf8(path: str | Path) -> None:
    """Raise `JsonlError` naming the file (and line) when it is not UTF-8 text: UTF-16 (found by its byte-order
    mark) or bytes of another encoding (latin-1, cp1252). Readers that decode lazily (pyarrow) would otherwise fail
    later, on some record, with no file named. A UTF-8 byte-order mark is fine."""
    with open_bytes(path) as f:
        for n, line in enumerate(f, 1):
            if n == 1 and line.startswith((b"\xff\xfe", b"\xfe\xff")):
                raise JsonlError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); re-encode it as UTF-8")
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JsonlError(f"{path}:{n}: not UTF-8 text (byte {line[e.start:e.start + 1]!r} at column "
                                 f"{e.start + 1}: latin-1 or cp1252?); re-encode it as UTF-8") from None


def numbered_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line number, record)` of every non-blank line, counting from 1."""
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsonlError(f"{path}:{n}: not valid JSON: {e}") from e
            if not isinstance(record, dict):
                raise JsonlError(f"{path}:{n}: not a JSON object but {type(record).__name__}")
            yield n, record


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a `.jsonl`, `.jsonl.gz` or `.jsonl.bz2` file, in order."""
    for _, record in numbered_jsonl(path):
        yield record


def iter_jsonl_folder(folder: str | Path, pattern: str = "*.jsonl.gz") -> Iterator[dict[str, Any]]:
    """The records of every file in `folder` matching `pattern` (`**/*.jsonl*` reaches sub-folders), files in
    sorted order."""
    for path in sorted(Path(folder).glob(pattern)):
        yield from read_jsonl(path)
