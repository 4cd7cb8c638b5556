"""Our datatrove blocks for the data stage, run in-process on tiny inputs (no executor): `.venv/bin/python -m pytest
tests/unit/test_data_blocks.py -q` (a few seconds)."""

import gzip
import inspect
import io

import pytest

from infra.env import setup_env

setup_env()

from datatrove.data import Document  # noqa: E402

from tasks.data.blocks import (  # noqa: E402
    CrawlReader,
    PhoneNumberFormatter,
    SourceSampler,
    TextReader,
    document_text,
    output_record,
)


def warc_bytes(n_pages: int) -> bytes:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    for i in range(n_pages):
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        html = f"<html><body><p>Page number {i} has some text in it.</p></body></html>".encode()
        headers = {"WARC-Identified-Payload-Type": "text/html"}
        writer.write_record(
            writer.create_warc_record(
                f"https://x.example/{i}",
                "response",
                payload=io.BytesIO(html),
                http_headers=http,
                warc_headers_dict=headers,
            )
        )
    return buf.getvalue()


@pytest.mark.parametrize(
    "text",
    [
        "Call +1 (555) 123-4567 today.",
        "Call 555-123-4567 today.",
        "Call 555.123.4567 today.",
        "Ring +44 20 7946 0958 now.",
        "Fax (020) 7946 0958.",
    ],
)
def test_phone_numbers_are_masked(text):
    out = PhoneNumberFormatter().format(text)
    assert "<PHONE>" in out and not any(ch.isdigit() for ch in out), out


@pytest.mark.parametrize(
    "text",
    [
        "Between 1999 and 2005 sales grew 12.5%.",
        "ISBN 978-3-16-148410-0",
        "On 2024-05-18 at 10:30.",
        "Serial 12345678901234567890.",
        "Pay $1,250.00 by 3 June.",
    ],
)
def test_other_numbers_are_left_alone(text):
    assert PhoneNumberFormatter().format(text) == text


def test_source_sampler_keeps_a_stable_fraction_of_one_source_only():
    docs = [Document(text="x", id=f"d{i}", metadata={"source": "c4" if i % 2 else "crawl"}) for i in range(2000)]
    sampler = SourceSampler({"c4": 0.25}, seed=1)
    kept = [d for d in docs if sampler.filter(d) is True]
    assert sum(d.metadata["source"] == "crawl" for d in kept) == 1000
    assert 200 < sum(d.metadata["source"] == "c4" for d in kept) < 300
    assert [d.id for d in kept] == [d.id for d in docs if SourceSampler({"c4": 0.25}, seed=1).filter(d) is True]
    assert sampler.filter(docs[1]) in (True, (False, "sampled_out"))
    with pytest.raises(ValueError, match="must be in"):
        SourceSampler({"c4": 1.5})


def test_crawl_reader_counts_page_records_and_survives_a_cut_file(tmp_path):
    (tmp_path / "ok.warc.gz").write_bytes(warc_bytes(3))
    whole = warc_bytes(40)
    (tmp_path / "cut.warc.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "files.txt").write_text("ok.warc.gz\ncut.warc.gz\n")
    reader = CrawlReader(str(tmp_path), str(tmp_path / "files.txt"))
    urls = [d.metadata["url"] for d in reader.run()]
    assert urls[:3] == [f"https://x.example/{i}" for i in range(3)]
    assert 3 <= len(urls) < 43  # the good file in full, the cut file up to the damage (if warcio got that far)
    assert reader.stats["corrupt_files"].total == 1
    assert reader.stats["corrupt_file:cut.warc.gz"].total == 1
    assert reader.stats["records"].total == len(urls)


def test_readers_deal_files_to_their_assigned_task(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.warc.gz").write_bytes(warc_bytes(1))
    (tmp_path / "files.txt").write_text("a.warc.gz\nb.warc.gz\nc.warc.gz\n")
    ranks = {"a.warc.gz": 1, "b.warc.gz": 0, "c.warc.gz": 1}
    seen = {
        r: [
            d.metadata["file_path"].rsplit("/", 1)[1]
            for d in CrawlReader(str(tmp_path), str(tmp_path / "files.txt"), file_ranks=ranks).run(None, r, 2)
        ]
        for r in (0, 1)
    }
    assert seen == {0: ["b.warc.gz"], 1: ["a.warc.gz", "c.warc.gz"]}


def test_text_reader_counts_bad_lines_and_survives_a_cut_file(tmp_path):
    (tmp_path / "ok.jsonl").write_text('{"text": "one"}\nnot json\n{"text": ""}\n{"text": "two"}\n')
    whole = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(5000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "files.txt").write_text("ok.jsonl\ncut.jsonl.gz\n")
    reader = TextReader(str(tmp_path), str(tmp_path / "files.txt"))
    texts = [d.text for d in reader.run()]
    assert texts[:2] == ["one", "two"] and len(texts) > 2
    assert reader.stats["dropped_bad_json"].total == 1 and reader.stats["dropped_empty"].total == 1
    assert reader.stats["corrupt_file:cut.jsonl.gz"].total == 1
    assert reader.stats["records"].total == len(texts) + 2


def test_exact_dedup_getter_and_output_adapter():
    assert inspect.signature(document_text).return_annotation in (str, "str")
    doc = Document(text="hi", id="1", metadata={"source": "crawl", "language": "en", "language_score": 0.9, "extra": 1})
    record = output_record(None, doc)
    assert record == {
        "text": "hi",
        "id": "1",
        "metadata": {"source": "crawl", "url": "", "file_path": "", "language": "en", "language_score": 0.9},
    }
