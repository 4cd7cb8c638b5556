"""Bad crawl files through the data stage's reader path (issue 19, item 4): each case is a file made here, and every
one is either read, or a counted skip (the summary's `corrupt_files`, a `dropped_<reason>` or `skipped_<type>_records`
count of the reader step), never a silent drop. One real datatrove run (filter stage only) reads all of them at once;
each test then checks its own file. A WARC written by wget (not Common Crawl's crawler) keeps its English pages.

Run: `.venv/bin/python -m pytest tests/unit/test_data_badinput.py -q` (two filter-only pipeline runs).
"""

import functools
import gzip
import http.server
import json
import os
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from infra.env import setup_env

setup_env()

from tasks.data import DataConfig, build_corpus, crawl_inputs, iter_records  # noqa: E402
from tasks.refs import CorpusRef  # noqa: E402

# Trafilatura's 1 s limit also bounds the start of its sandbox process, which a busy machine can miss.
SLOW_MACHINE_TIMEOUT_S = 10.0

ENGLISH = {
    "bees": ("How honey bees find their way home",
             ["Honey bees use the position of the sun to find their way back to the hive after a long flight.",
              "When clouds cover the sky, they can still read the pattern of polarised light that reaches them.",
              "Young workers learn the landmarks around the hive during short orientation flights in the afternoon.",
              "A forager that finds good flowers returns and performs a dance that tells the others where to go.",
              "The angle of the dance on the comb shows the direction of the food relative to the sun."]),
    "tides": ("Why the sea has two tides a day",
              ["The moon pulls on the oceans, and the water on the side facing it rises into a gentle bulge.",
               "A second bulge forms on the far side of the earth, where the pull of the moon is weakest.",
               "As the earth turns, most coasts pass through both bulges and see two high tides each day.",
               "The sun adds its own smaller pull, so the tides are strongest when the sun and moon line up.",
               "Harbour masters publish tide tables so that ships know when the water is deep enough to enter."]),
    "bread": ("Baking a simple loaf of bread at home",
              ["Good bread needs only flour, water, salt and yeast, mixed and left to rise in a warm kitchen.",
               "Kneading the dough for ten minutes develops the gluten that traps the gas made by the yeast.",
               "After the first rise, the dough is shaped into a loaf and left to rise again in its tin.",
               "A hot oven gives the loaf a good crust, and a tray of water makes the crust thinner and crisp.",
               "The bread is done when it sounds hollow as you tap the bottom of the loaf with a finger."]),
    "trains": ("The first railways in Britain",
               ["The first public railway to use steam engines opened in the north of England two centuries ago.",
                "Its engines pulled wagons of coal from the mines down to the river, where ships carried it away.",
                "Passengers soon wanted to travel too, and new lines linked the growing industrial towns.",
                "Within a few decades a network of railways had changed how people worked, lived and travelled.",
                "Many of the old stations are still in use, and some of the early bridges carry trains today."]),
}
GERMAN = ("Die Geschichte der Eisenbahn in Deutschland",
          ["Die erste deutsche Eisenbahn fuhr im Jahr 1835 zwischen Nürnberg und Fürth und wurde schnell beliebt.",
           "In den folgenden Jahrzehnten entstand ein dichtes Netz von Strecken, das viele Städte verband.",
           "Die Züge brachten Kohle, Waren und Reisende schneller als jedes andere Verkehrsmittel ihrer Zeit.",
           "Heute fahren moderne Schnellzüge mit mehr als dreihundert Kilometern in der Stunde durch das Land."])


def page(title: str, paragraphs: list[str]) -> bytes:
    body = "".join(f"<p>{p}</p>\n" for p in paragraphs)
    return (f"<!DOCTYPE html><html><head><title>{title}</title></head><body><article><h1>{title}</h1>\n{body}"
            "</article></body></html>").encode()


def article(case: str, name: str) -> bytes:
    """An English article, its paragraphs made distinct per case: Trafilatura (datatrove's default,
    `deduplicate=True`) empties a page whose paragraphs it has already seen often in the same process."""
    title, paragraphs = ENGLISH[name]
    return page(title, [f"In the {case} notes: {p}" for p in paragraphs])


def record(url: str, kind: str, block: bytes, content_type: str, gz: bool = True) -> bytes:
    """One WARC record written by hand (warcio's writer insists on an HTTP header block for responses)."""
    head = (f"WARC/1.0\r\nWARC-Type: {kind}\r\nWARC-Target-URI: {url}\r\nWARC-Date: 2024-05-18T10:00:00Z\r\n"
            f"WARC-Record-ID: <urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, kind + url)}>\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(block)}\r\n\r\n").encode()
    raw = head + block + b"\r\n\r\n"
    return gzip.compress(raw, mtime=0) if gz else raw


def response(url: str, body: bytes, gz: bool = True, http_type: str = "text/html; charset=utf-8") -> bytes:
    http = f"HTTP/1.1 200 OK\r\nContent-Type: {http_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    return record(url, "response", http + body, "application/http; msgtype=response", gz)


def url(case: str, name: str) -> str:
    return f"https://{case}.example/{name}"


def cut(data: bytes) -> bytes:
    """Cut mid-record: the records are of nearly equal size, so half the file would end on a gzip member's end."""
    return data[: len(data) // 2 + 100]


def bad_files(folder: Path) -> dict[str, bytes]:
    """Each case's file -> its bytes (all gzipped per record unless the case is about that)."""
    good = response(url("good", "bees"), article("good", "bees"))
    # three pages, then enough other records (cheap to skip) that the cut falls well past gzip's read-ahead
    pages = b"".join(response(url("cut", n), article("cut", n)) for n in ("bees", "tides", "bread"))
    filler = b"".join(record(url("cut", f"get-{i}"), "request", b"GET / HTTP/1.1\r\n" + os.urandom(1000).hex().encode()
                             + b"\r\n\r\n", "application/http; msgtype=request") for i in range(100))
    corrupt = bytearray(response(url("crc", "tides"), article("crc", "tides")))
    corrupt[-12:-8] = b"\x00\x00\x00\x00"  # the member's CRC32: gzip notices at the end of the member
    junk = os.urandom(4096)
    return {
        "good.warc.gz": good,
        "truncated.warc.gz": cut(pages + filler),
        "corrupt.warc.gz": bytes(corrupt),
        "not-a-warc.warc.gz": gzip.compress(b"url,title\nhttps://a.example,A\n" * 50, mtime=0),
        "plain-text.warc": b"this is a text file that someone named .warc\n" * 20,
        "empty.warc.gz": b"",
        "junk.warc.gz": response(url("junk", "noise"), junk, http_type="application/octet-stream")
        + response(url("junk", "tides"), article("junk", "tides")),
        "wget-uris.warc.gz": response(f"<{url('wget', 'bread')}>", article("wget", "bread")),
        "resource-metadata.warc.gz": record(url("resource", "trains"), "resource", article("resource", "trains"),
                                            "text/html")
        + record("metadata://example/crawl.log", "resource", b"fetched 1 page\n", "text/plain")
        + record(url("resource", "trains"), "metadata", b"outlink: https://x.example/\r\n", "application/warc-fields"),
        "one-member.warc.gz": gzip.compress(b"".join(response(url("member", n), article("member", n), gz=False)
                                                     for n in ("bees", "bread")), mtime=0),
        "headerless.warc.gz": record(url("headerless", "tides"), "response", article("headerless", "tides"),
                                     "text/html")
        + record(url("headerless", "bread"), "response", article("headerless", "bread"),
                 "application/http; msgtype=response"),
    }


def text_files() -> dict[str, bytes]:
    """JSONL text sources: one with a bad line of each kind, one in latin-1, one in UTF-16, one with a UTF-8 BOM."""
    line = "The caf\u00e9 on the corner opens at eight and serves fresh bread to the whole street every morning."
    good = "".join(json.dumps({"text": f"{line} Day {i}."}, ensure_ascii=False) + "\n" for i in range(3))
    bad = good + "".join(x + "\n" for x in ("{not json", "[1, 2]", json.dumps({"body": line}),
                                             json.dumps({"text": 42}), json.dumps({"text": None}), '{"text": ""}'))
    return {"bad-lines.jsonl": bad.encode(), "latin1.jsonl": good.encode("latin-1"),
            "utf16.jsonl": good.encode("utf-16"), "bom.jsonl": good.encode("utf-8-sig")}


def reader_only(**kwargs) -> DataConfig:
    """The filter run with the language filter only: what the readers keep reaches `documents/` unless not English."""
    return DataConfig(**{"text_sources": {}} | kwargs, tasks=1, workers=1, exact_dedup=False, minhash=False, sentence_dedup=False,
                      gopher_repetition=False, gopher_quality=False, c4_quality=False, c4_badwords=False, pii=False,
                      extract_timeout_s=SLOW_MACHINE_TIMEOUT_S)


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory) -> tuple[CorpusRef, set[str], Path]:
    folder = tmp_path_factory.mktemp("bad")
    for name, data in bad_files(folder).items():
        (folder / name).write_bytes(data)
    for name, data in text_files().items():
        (folder / name).write_bytes(data)
    cfg = reader_only(inputs=[str(folder / name) for name in sorted(bad_files(folder))],
                      text_sources={str(folder / name): 1.0 for name in text_files()})
    out = folder / "out"
    result = build_corpus(cfg, crawl_inputs(cfg), out)
    kept = {r["metadata"]["url"] for r in iter_records(out / "documents") if r["metadata"]["source"] == "crawl"}
    return result, kept, out


def reader(result: CorpusRef) -> dict:
    return result.counts["steps"]["filter/read_warc"]


def task_logs(out: Path) -> str:
    return "".join(p.read_text() for p in sorted((out / "logs" / "filter" / "logs").glob("*.log")))


def test_the_run_counts_add_up_and_the_good_file_is_read(bad_run):
    result, kept, _ = bad_run
    r = reader(result)
    assert r["in"] == r["kept"] + r["dropped"]
    assert url("good", "bees") in kept


def test_truncated_gzip_is_a_counted_damaged_file_named_with_its_record(bad_run):
    result, kept, out = bad_run
    assert "truncated.warc.gz" in result.counts["corrupt_files"]
    before_the_cut = {url("cut", n) for n in ("bees", "tides", "bread")}
    assert {u for u in kept if u.startswith("https://cut.example/")} == before_the_cut
    assert "damaged input truncated.warc.gz (at record" in task_logs(out)


def test_corrupt_gzip_is_a_counted_damaged_file(bad_run):
    result, kept, out = bad_run
    assert "corrupt.warc.gz" in result.counts["corrupt_files"]
    assert "damaged input corrupt.warc.gz" in task_logs(out)


def test_a_file_that_is_not_a_warc_is_a_counted_damaged_file(bad_run):
    result, _, out = bad_run
    assert {"not-a-warc.warc.gz", "plain-text.warc"} <= set(result.counts["corrupt_files"])
    logs = task_logs(out)
    assert "not-a-warc.warc.gz (before its first record): ArchiveLoadFailed" in logs
    assert "plain-text.warc (at record 0, counting from 0): ArchiveLoadFailed: not a WARC file" in logs


def test_an_empty_file_is_a_counted_damaged_file(bad_run):
    result, _, out = bad_run
    assert "empty.warc.gz" in result.counts["corrupt_files"]
    assert "empty.warc.gz (before its first record): EOFError: no WARC record in it" in task_logs(out)


def test_binary_junk_in_a_record_is_dropped_by_reason_and_the_next_record_read(bad_run):
    result, kept, _ = bad_run
    assert reader(result)["dropped_by_reason"] == {"non_html_or_undecodable": 1}  # the junk record, no other
    assert url("junk", "tides") in kept and url("junk", "noise") not in kept
    assert "junk.warc.gz" not in result.counts["corrupt_files"]


def test_wget_style_bracketed_target_uris_give_plain_urls(bad_run):
    _, kept, _ = bad_run
    assert url("wget", "bread") in kept
    assert not any("<" in u or ">" in u for u in kept)


def test_html_resource_records_are_read_and_other_records_counted_as_skipped(bad_run):
    result, kept, _ = bad_run
    assert url("resource", "trains") in kept
    stats = reader(result)["stats"]
    assert stats["skipped_resource_records"] == 1  # the text/plain log
    assert stats["skipped_metadata_records"] == 1


def test_a_warc_gzipped_as_one_member_is_read_whole(bad_run):
    result, kept, _ = bad_run
    assert {url("member", "bees"), url("member", "bread")} <= kept
    assert "one-member.warc.gz" not in result.counts["corrupt_files"]


def test_responses_without_an_http_header_block_keep_their_html(bad_run):
    result, kept, _ = bad_run
    assert {url("headerless", "tides"), url("headerless", "bread")} <= kept
    docs = {r["metadata"]["url"]: r["text"] for r in iter_records(bad_run[2] / "documents")}
    assert "The moon pulls on the oceans" in docs[url("headerless", "tides")]
    assert "Good bread needs only flour" in docs[url("headerless", "bread")]


def test_every_kept_page_is_accounted_for(bad_run):
    """No page of a readable file is lost: the kept URLs are exactly those the cases above expect."""
    result, kept, _ = bad_run
    expected = {url("good", "bees"), url("junk", "tides"), url("wget", "bread"), url("resource", "trains"),
                url("member", "bees"), url("member", "bread"), url("headerless", "tides"), url("headerless", "bread"),
                url("cut", "bees"), url("cut", "tides"), url("cut", "bread")}
    assert kept == expected
    assert sorted(reader(result)["corrupt_files"]) == ["corrupt.warc.gz", "empty.warc.gz", "not-a-warc.warc.gz",
                                                       "plain-text.warc", "truncated.warc.gz"]


# ---------------------------------------------------------------------------------------------------------------
# JSONL text sources, read in the same run


def text_reader(result: CorpusRef, name: str) -> dict:
    """The reader step of the text source `name` (steps `filter/read_text_<i>`, in the config's order)."""
    return result.counts["steps"][f"filter/read_text_{list(text_files()).index(name)}"]


def test_bad_jsonl_lines_are_counted_by_reason_and_the_good_ones_read(bad_run):
    r = text_reader(bad_run[0], "bad-lines.jsonl")
    assert r["in"] == 9 and r["kept"] == 3
    assert r["dropped_by_reason"] == {"bad_json": 2, "no_text_field": 1, "text_not_a_string": 2, "empty": 1}


def test_jsonl_in_another_encoding_is_a_counted_damaged_file(bad_run):
    result = bad_run[0]
    for name in ("latin1.jsonl", "utf16.jsonl"):
        assert text_reader(result, name)["corrupt_files"] == [name] and text_reader(result, name)["kept"] == 0
        assert name in result.counts["corrupt_files"]


def test_jsonl_with_a_utf8_byte_order_mark_is_read_whole(bad_run):
    r = text_reader(bad_run[0], "bom.jsonl")
    assert r["in"] == r["kept"] == 3 and r["corrupt_files"] == []


# ---------------------------------------------------------------------------------------------------------------
# A WARC written by wget


@pytest.mark.slow  # a second pipeline run, with every filter (Gopher, C4): ~10 s on an idle 2-core machine
@pytest.mark.skipif(shutil.which("wget") is None, reason="wget is not installed (apt-get install wget)")
def test_a_wget_warc_keeps_its_english_pages_and_drops_the_german_one(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    pages = {f"{n}.html": page(*ENGLISH[n]) for n in ENGLISH} | {"eisenbahn.html": page(*GERMAN)}
    for name, html in pages.items():
        (site / name).write_bytes(html)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        subprocess.run(["wget", "--quiet", "--warc-file", str(tmp_path / "site"), "--output-document", os.devnull,
                        *(f"{base}/{name}" for name in pages)], check=True, timeout=60, cwd=tmp_path)
    finally:
        httpd.shutdown()
        httpd.server_close()
    warc = tmp_path / "site.warc.gz"
    raw = gzip.decompress(warc.read_bytes())
    assert f"WARC-Target-URI: <{base}/bees.html>".encode() in raw  # wget's own way of writing URIs
    assert b"WARC-Type: resource" in raw and b"WARC-Type: metadata" in raw  # its log and manifest

    cfg = DataConfig(inputs=[str(warc)], text_sources={}, tasks=1, workers=1, exact_dedup=False, minhash=False,
                     sentence_dedup=False, extract_timeout_s=SLOW_MACHINE_TIMEOUT_S)
    result = build_corpus(cfg, crawl_inputs(cfg), tmp_path / "out")
    kept = {r["metadata"]["url"] for r in iter_records(tmp_path / "out" / "documents")}
    assert kept == {f"{base}/{n}.html" for n in ENGLISH}
    steps = result.counts["steps"]
    assert steps["filter/read_warc"]["in"] == len(pages) and steps["filter/read_warc"]["dropped"] == 0
    assert steps["filter/language"]["dropped_by_reason"] == {"language_not_kept_or_low_score": 1}
    assert result.counts["corrupt_files"] == []


# ---------------------------------------------------------------------------------------------------------------
# Paths and URLs in the config: refused when the config is made, naming the field


@pytest.mark.parametrize("field, value, message", [
    ("inputs", ["ftp://127.0.0.1/crawl.warc.gz"], r"inputs\[0\]: 'ftp://127.0.0.1/crawl.warc.gz' uses ftp://"),
    ("inputs", ["data/crawl/a.warc.gz", "gopher://x/b.warc.gz"], r"inputs\[1\]: .* uses gopher://"),
    ("inputs", ["https://user:hunter2@example.org/a.warc.gz"], r"inputs\[0\]: the URL holds credentials"),
    ("inputs", [""], r"inputs\[0\]: '' is not a usable path"),
    ("text_sources", {"sftp://host/t.jsonl": 1.0}, r"text_sources\['sftp://host/t.jsonl'\]: .* uses sftp://"),
    ("paths_base", "s3://key:secret@commoncrawl/", r"paths_base: the URL holds credentials"),
    ("decontaminate_benchmarks", "ftp://h/b", r"decontaminate_benchmarks: 'ftp://h/b' uses ftp://"),
])
def test_unreadable_or_credential_bearing_locations_are_refused_by_field(field, value, message):
    """As `gptflow` validates a config (`flows.config.validate`): one line naming the field, without the URL's
    credentials."""
    from flows.config import validate
    from tasks.stage import GptflowError

    with pytest.raises(GptflowError, match=f"invalid data config: {field}: Value error, {message}") as e:
        validate(DataConfig, {field: value}, "data config")
    assert "\n" not in str(e.value) and "hunter2" not in str(e.value) and "secret@" not in str(e.value)


def test_readable_locations_are_kept_as_given():
    ok = ["file:///tmp/a.warc.gz", "../crawl/b.warc.gz", "s3://commoncrawl/c.warc.gz", "https://x.org/d.warc.gz"]
    assert DataConfig(inputs=ok).inputs == ok


def test_a_command_line_input_is_checked_like_the_config(tmp_path):
    from flows.cli import data_input
    from tasks.stage import GptflowError

    with pytest.raises(GptflowError, match=r"--input: 'ftp://127.0.0.1:9/x.warc.gz' uses ftp://"):
        data_input("ftp://127.0.0.1:9/x.warc.gz")
    (tmp_path / "x.warc.gz").write_bytes(b"")
    assert data_input(str(tmp_path / "x.warc.gz")) == str(tmp_path / "x.warc.gz")
