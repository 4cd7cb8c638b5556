"""The one JSONL reader (`infra/jsonl.py`): `python -m pytest tests/unit/test_jsonl.py`."""

from __future__ import annotations

import bz2
import gzip

import pytest

from infra.jsonl import JsonlError, iter_jsonl_folder, numbered_jsonl, read_jsonl


def test_plain_gzip_and_bz2_read_alike_and_blank_lines_are_skipped(tmp_path):
    text = '{"text": "a"}\n\n{"text": "b \\ud800"}\n'  # a lone surrogate escape survives (crawled text has them)
    (tmp_path / "x.jsonl").write_text(text)
    with gzip.open(tmp_path / "x.jsonl.gz", "wt") as f:
        f.write(text)
    with bz2.open(tmp_path / "x.jsonl.bz2", "wt") as f:
        f.write(text)
    expected = [{"text": "a"}, {"text": "b \ud800"}]
    for name in ("x.jsonl", "x.jsonl.gz", "x.jsonl.bz2"):
        assert list(read_jsonl(tmp_path / name)) == expected
    assert [n for n, _ in numbered_jsonl(tmp_path / "x.jsonl")] == [1, 3]


def test_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n\nnot json\n')
    with pytest.raises(JsonlError, match=r"bad\.jsonl:3: not valid JSON"):
        list(read_jsonl(bad))
    bad.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(JsonlError, match=r"bad\.jsonl:2: not a JSON object but list"):
        list(read_jsonl(bad))


def test_folder_reads_matching_files_in_sorted_order(tmp_path):
    for name, n in (("b.jsonl.gz", 2), ("a.jsonl.gz", 1)):
        with gzip.open(tmp_path / name, "wt") as f:
            f.write(f'{{"n": {n}}}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text('{"n": 3}\n')
    assert [r["n"] for r in iter_jsonl_folder(tmp_path)] == [1, 2]
    assert [r["n"] for r in iter_jsonl_folder(tmp_path, "**/*.jsonl*")] == [1, 2, 3]
