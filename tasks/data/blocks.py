"""Our own datatrove blocks for the data stage, only where datatrove has none.

- `CrawlReader`: datatrove's `WarcReader` that also counts the page records it drops and survives a corrupt
  or truncated file (the other files' documents are kept; the skip is counted with the file name).
- `TextReader`: the same for JSONL text sources (datatrove's `JsonlReader` stops the task on a truncated gzip).
- `SourceSampler`: keeps a deterministic fraction of each source's documents (the mixing weights).
- `BenchmarkDecontFilter`: drops documents that hold a benchmark item's n-gram (`DataConfig.decontaminate`).
- `SpanDedupFilter`: datatrove's C4 sentence-span dedup filter, counting the documents it drops and what it cuts.
- `PhoneNumberFormatter`: masks phone numbers; datatrove's `PIIFormatter` only does emails and IPs.
- `document_text`: the content getter of the exact-dedup hash (module level, so workers can unpickle it).

Importing this module also makes datatrove's dependency check cheap (`infra.startup`): every process that
unpickles our blocks imports it first, each worker included.

Stats convention, shared with `tasks/data/counts.py`: every block that can lose documents counts `total`, `forwarded`
and `dropped` (+ `dropped_<reason>`), so `total == forwarded + dropped` can be checked from the stats files.
Readers count `records` in (page records or lines) and `documents` out, with `dropped_<reason>` for the rest.
"""

import io
import os
import re
import zlib

import xxhash
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.dedup.sentence_dedup import SentenceDedupFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.readers.jsonl import JsonlReader
from datatrove.pipeline.readers.warc import WarcReader, process_record
from datatrove.utils.logging import logger

from infra.startup import patch_datatrove_dependency_check

# Each block checks its dependencies as it is made, also when a worker unpickles it. Local workers fork from a
# forkserver that preloads this module; a Ray worker imports it when it unpickles one of our blocks.
patch_datatrove_dependency_check()

# What a damaged input raises mid-read: gzip's EOFError ("Compressed file ended before the end-of-stream marker")
# or BadGzipFile (an OSError), zlib.error for bad deflate data, warcio's ArchiveLoadFailed for a non-WARC body.
CORRUPT_FILE_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error, UnicodeDecodeError)


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    from warcio.recordloader import ArchiveLoadFailed

    return (*CORRUPT_FILE_ERRORS, ArchiveLoadFailed)


def corrupt_file_stat(filepath: str) -> str:
    """Stat key that records a skipped damaged file by name (read back by `tasks/data/counts.py`)."""
    return f"corrupt_file:{os.path.basename(filepath)}"


class _AssignedFiles:
    """A datatrove reader shards its file list round-robin from task 0, so with few files of very different sizes
    (and several readers in one pipeline) task 0 gets most of the work. `file_ranks` (name as listed in the paths
    file -> task) lets `tasks/data/plan.py` deal the files itself: largest first, to the least loaded task."""

    def __init__(self, *args, file_ranks: dict[str, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.file_ranks = dict(file_ranks or {})

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._task, self._n_tasks = rank, world_size
        return super().run(data, 0, 1)  # list every file as a single task would; read_files_shard keeps ours

    def read_files_shard(self, shard: list[str]) -> DocumentsPipeline:
        mine = [f for i, f in enumerate(shard) if self.file_ranks.get(f, i) % self._n_tasks == self._task]
        return super().read_files_shard(mine)


class _ReadErrorMemo:
    """A file that remembers the damage error a read raised, for when the caller (warcio) swallows it."""

    def __init__(self, f):
        self._f, self.error = f, None

    def read(self, *args):
        try:
            return self._f.read(*args)
        except CORRUPT_FILE_ERRORS as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


class CrawlReader(_AssignedFiles, WarcReader):
    """WarcReader for WARC (HTML `response` and `resource`) and WET (plain-text `conversion`) records.

    A page record (`response`, `conversion`, or an HTML `resource`, as archiving tools such as warcit write for
    files) becomes a document or is dropped as `non_html_or_undecodable` (images, PDFs, robots.txt, undecodable
    bytes: datatrove's own `process_record` rules) or `empty`. A `response` whose payload has no HTTP header block
    (some crawl tools write the HTML body directly) is read as that body; warcio alone would eat its first lines as
    headers. Other records (requests, WARC metadata, warcinfo, revisits, non-HTML resources such as wget's log)
    are not pages: they are counted as `skipped_<type>_records`, not as records. A WAT record (JSON metadata about
    a page, in a WAT file named like a WARC; `tasks/data/inputs.py` refuses files named *.wat*) is counted and
    dropped as `wat_metadata_only`, so such a file shows up in the counts instead of silently giving nothing. A
    damaged or empty file is logged (with the last record read) and skipped from the point of damage on, counted
    in `corrupt_files`.
    """

    name = "🕷 Crawl (WARC/WET)"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        from warcio.archiveiterator import ArchiveIterator
        from warcio.recordloader import ArchiveLoadFailed

        ri = -1
        try:
            with self.data_folder.open(filepath, "rb", compression=self.compression) as raw:
                f = _ReadErrorMemo(raw)
                for ri, record in enumerate(ArchiveIterator(f, no_record_parse=True)):
                    if record.format == "arc" and ".arc" not in os.path.basename(filepath):
                        raise ArchiveLoadFailed("not a WARC file: no WARC/1.x header (warcio took it for an ARC file)")
                    if is_wat_record(record):
                        self.stat_update("records")
                        self.stat_update("dropped", "dropped_wat_metadata_only")
                        continue
                    if not is_page_record(record):
                        self.stat_update(f"skipped_{record.rec_type}_records")
                        continue
                    page = read_page(record)  # the whole record, so a damaged one raises before it is counted
                    self.stat_update("records")
                    with self.track_time():
                        data = process_record(page)
                        document = self.get_document_from_dict(data, filepath, ri) if data else None
                    if document is None:
                        self.stat_update("dropped", "dropped_empty" if data else "dropped_non_html_or_undecodable")
                        continue
                    yield document
                # warcio takes an EOFError for the end of the file, so a file cut short can end "cleanly": raise
                # the error it swallowed, or the one reading past its stop gives (or complain of unread bytes).
                if f.error is not None:
                    raise f.error
                if f.read(1):
                    raise EOFError("data left after the last record warcio could parse")
                if ri < 0:
                    raise EOFError("no WARC record in it (an empty file)")
        except _corrupt_errors() as e:
            self.stat_update("corrupt_files", corrupt_file_stat(filepath))
            where = f"at record {ri}, counting from 0" if ri >= 0 else "before its first record"
            logger.error(f"Skipping the rest of damaged input {filepath} ({where}): {type(e).__name__}: {e}")


HTML_TYPES = ("text/html", "application/xhtml+xml")


def is_page_record(record) -> bool:
    """A record that holds a page: a response, a WET conversion, or a resource declared as HTML."""
    if record.rec_type in ("response", "conversion"):
        return True
    return record.rec_type == "resource" and (record.content_type or "").split(";")[0].strip() in HTML_TYPES


def read_page(record):
    """The record made ready for datatrove's `process_record` (records come from `ArchiveIterator(...,
    no_record_parse=True)`, so nothing of the block is consumed yet): an HTTP header block, when the payload starts
    with one, is parsed off; a payload without one (an HTML body written directly, or a resource) is kept whole,
    and its WARC Content-Type stands for the payload type datatrove looks for."""
    from warcio.statusandheaders import StatusAndHeadersParser

    block = record.raw_stream.read()
    if record.rec_type == "response" and block.startswith(b"HTTP/"):
        stream = io.BytesIO(block)
        record.http_headers = StatusAndHeadersParser([], verify=False).parse(stream)
        record.raw_stream = io.BytesIO(stream.read())
        return record
    record.raw_stream = io.BytesIO(block)
    record.http_headers = None
    declared = (record.content_type or "").split(";")[0].strip()
    if record.rec_type != "conversion" and declared in HTML_TYPES and not record.rec_headers.get_header(
            "WARC-Identified-Payload-Type"):
        record.rec_headers.add_header("WARC-Identified-Payload-Type", declared)
    if record.rec_type == "resource":
        record.rec_type = "response"  # process_record reads responses and conversions only
    return record


def is_wat_record(record) -> bool:
    """WAT files hold `metadata` records whose body is JSON; WARC metadata records are WARC fields, not JSON."""
    return record.rec_type == "metadata" and (record.content_type or "").startswith("application/json")


class TextReader(_AssignedFiles, JsonlReader):
    """JsonlReader that counts lines and skips bad lines (by reason) and damaged files (a file cut short, or not
    UTF-8: from the first undecodable line on) instead of failing the task; a UTF-8 byte-order mark is dropped."""

    name = "🐿 Text (JSONL)"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        try:
            with self.data_folder.open(filepath, "r", compression=self.compression) as f:
                for li, line in enumerate(f):
                    self.stat_update("records")
                    with self.track_time():
                        document, reason = self._document(line.removeprefix("\ufeff") if li == 0 else line,
                                                          filepath, li)
                    if document is None:
                        self.stat_update("dropped", f"dropped_{reason}")
                        continue
                    yield document
        except _corrupt_errors() as e:
            self.stat_update("corrupt_files", corrupt_file_stat(filepath))
            logger.error(f"Skipping the rest of damaged input {filepath}: {type(e).__name__}: {e}")

    def _document(self, line: str, filepath: str, li: int) -> tuple[Document | None, str | None]:
        """(document, None), or (None, why the line gives none): `bad_json` (not a JSON object), `no_text_field`,
        `text_not_a_string` (a number, a list, null: datatrove would fail the task on its length) or `empty`."""
        import orjson

        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None, "bad_json"
        if not isinstance(record, dict):
            return None, "bad_json"
        if self.text_key not in record:
            return None, "no_text_field"
        if not isinstance(record[self.text_key], str):
            return None, "text_not_a_string"
        document = self.get_document_from_dict(record, filepath, li)
        return document, None if document else "empty"


class SourceSampler(BaseFilter):
    """Keep a fixed fraction of each source's documents (`metadata["source"]`); other sources pass untouched.

    The draw is a hash of (seed, document id), so it does not depend on task sharding or document order and a
    rerun keeps exactly the same documents.
    """

    name = "🎲 Source sampler"

    def __init__(self, rates: dict[str, float], seed: int = 0, exclusion_writer=None):
        super().__init__(exclusion_writer)
        for source, rate in rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"sampling rate for {source!r} must be in [0, 1], got {rate}")
        self.rates = dict(rates)
        self.seed = seed

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        rate = self.rates.get(doc.metadata.get("source"), 1.0)
        if rate >= 1.0:
            return True
        draw = xxhash.xxh64_intdigest(f"{self.seed}/{doc.id}") / 2**64
        return draw < rate or (False, "sampled_out")


class BenchmarkDecontFilter(BaseFilter):
    """Drop every document that shares a word n-gram with a benchmark item (`eval/decontam.py`, GPT-3's rule), as
    `decontaminated`; the removed document's metadata names the task, doc_id and n-gram, and a stat
    `contaminated_<task>` counts them per task.

    Not datatrove's `NGramsDecontFilter`: it has a fixed n only (no whole-segment n-gram for short items) and reads
    an index that its indexer builds through lighteval. The index is built from the prepared benchmark files in
    each worker, on its first batch (it is not pickled with the block).
    """

    name = "🦠 Benchmark decontamination"

    def __init__(self, data_dir: str, tasks: list[str], n: int, min_words: int, exclusion_writer=None,
                 batch_size: int = 64):
        super().__init__(exclusion_writer, batch_size)
        self.data_dir, self.tasks, self.n, self.min_words = data_dir, list(tasks), n, min_words
        self._index = None

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        from eval.decontam import BenchmarkIndex

        if self._index is None:
            self._index = BenchmarkIndex.build(self.data_dir, self.tasks, self.n, self.min_words)
        results: list[bool | tuple[bool, str]] = []
        for doc, matches in zip(batch, self._index.find_many([d.text for d in batch]), strict=True):
            if not matches:
                results.append(True)
                continue
            m = matches[0]
            doc.metadata.update(contaminated_task=m.task, contaminated_doc_id=m.doc_id, contaminated_ngram=m.ngram)
            self.stat_update(f"contaminated_{m.task}")
            results.append((False, "decontaminated"))
        return results

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]


class SpanDedupFilter(SentenceDedupFilter):
    """C4 span dedup (datatrove's `SentenceDedupFilter`) with counts that add up.

    datatrove drops a document left too short once its duplicate spans are cut (fewer than `min_doc_words` words
    or `min_num_sentences` sentences) without counting it. We count `forwarded`, `dropped` and
    `dropped_too_short_after_span_dedup`, plus `duplicate_spans` (spans cut) and `removed_chars` (characters cut,
    also from documents then dropped); datatrove itself counts `removed_sentences`.
    """

    name = "💥 C4 span dedup"

    def remove_dup_sentences(self, doc: Document, du_lines) -> tuple[str, str]:
        text, marked = super().remove_dup_sentences(doc, du_lines)
        self.stat_update("duplicate_spans", value=len(du_lines))
        self.stat_update("removed_chars", value=len(doc.text) - len(text))
        return text, marked

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        n_in = n_out = 0

        def counted(docs: DocumentsPipeline) -> DocumentsPipeline:
            nonlocal n_in
            for doc in docs:
                n_in += 1
                yield doc

        for doc in super().run(counted(data), rank, world_size):
            n_out += 1
            self.stat_update("forwarded")
            yield doc
        if n_in > n_out:
            self.stat_update("dropped", "dropped_too_short_after_span_dedup", value=n_in - n_out)


# A phone number: an optional "+country" prefix, then either a bracketed area code or NANP-style groups with a
# consistent "-" or "." separator, or a "+country" number with space groups. Plain space-separated digit runs
# (years, counts, prices) are deliberately not matched; a validator also asks for 7-15 digits (E.164 length).
_PHONE_RE = re.compile(
    r"(?<![\w+])"
    r"(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"  # +44 20 7946 0958, +1-555-123-4567
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]\d{3,4}"  # (555) 123-4567
    r"|\d{3}([-.])\d{3}\1\d{4}"  # 555-123-4567, 555.123.4567
    r")"
    r"(?![\w-])"
)


class PhoneNumberFormatter(BaseFormatter):
    """Replace phone numbers with a fixed placeholder (a fixed one keeps duplicate pages identical)."""

    name = "📞 Phone numbers"

    def __init__(self, replacement: str = "<PHONE>"):
        super().__init__()
        self.replacement = replacement

    def _replace(self, match: re.Match) -> str:
        n_digits = sum(ch.isdigit() for ch in match.group(0))
        if not 7 <= n_digits <= 15:
            return match.group(0)
        self.stat_update("phone_numbers_masked")
        return self.replacement

    def format(self, text: str) -> str:
        return _PHONE_RE.sub(self._replace, text)


# `datasets.load_dataset("json", ...)` takes the schema of the first file and casts the others to it, so every
# row of the final output has the same metadata keys with the same types: strings ("" where a source has none,
# never null) and the language score. The crawl date is left out: pyarrow reads ISO dates as timestamps, which
# cannot be cast to or from the empty string of sources without dates.
OUTPUT_METADATA = ("source", "url", "file_path", "language")


def output_record(writer, document: Document) -> dict:
    """JsonlWriter adapter of the final documents: text, id and fixed metadata keys with fixed types."""
    metadata = {k: str(document.metadata.get(k) or "") for k in OUTPUT_METADATA}
    metadata["language_score"] = float(document.metadata.get("language_score", 0.0))
    return {"text": document.text, "id": str(document.id), "metadata": metadata}


def document_text(doc: Document) -> str:
    """Exact-dedup content: the whole text (the annotation tells datatrove which hash function to use)."""
    return doc.text
