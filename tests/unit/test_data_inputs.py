"""Data stage inputs: Common Crawl `.paths.gz` listings, remote (fsspec) URLs served by a local HTTP server, WAT files
refused or counted, and URL inputs hashed into the stage key. No internet: the "remote" files are the bundled crawl
files, served from 127.0.0.1.

Run: `.venv/bin/python -m pytest tests/unit/test_data_inputs.py -q` (about 15 s on 2 cores: one real pipeline run
over HTTP, one over the same files read locally).
"""

import functools
import gzip
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from infra.env import DATA_DIR, setup_env

setup_env()

from tasks.data import DataConfig, build_corpus, check_input, crawl_inputs, iter_records  # noqa: E402
from tasks.data.blocks import CrawlReader  # noqa: E402
from tasks.data.inputs import expand_inputs, is_wat, is_wet, read_listing, split_root  # noqa: E402
from tasks.refs import CorpusRef, InputRef  # noqa: E402
from tasks.stage import run_stage  # noqa: E402

WARC = "CC-MAIN-2024-22_whirlwind.warc.gz"  # 1 HTML page (Aragonese: dropped by the language filter)
WET = "CC-MAIN-2016-50_sparkwarc-sample.warc.wet.gz"  # 68 text pages, a few of them English
SHARED_WAT = Path(__file__).resolve().parents[3] / "shared" / "data" / "web" / "CC-MAIN-2024-22_whirlwind.warc.wat.gz"
# Trafilatura's 1 s limit also bounds the start of its sandbox process, which a busy machine can miss.
SLOW_MACHINE_TIMEOUT_S = 10.0


def write_listing(path: Path, lines: list[str]) -> Path:
    data = "".join(f"{line}\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_wat(path: Path, urls: list[str]) -> Path:
    """A tiny WAT file as Common Crawl writes them: a warcinfo record, then one JSON `metadata` record per page."""
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        writer.write_record(writer.create_warcinfo_record(path.name, {"format": "WARC File Format 1.0"}))
        for url in urls:
            envelope = {"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": url}, "Payload-Metadata": {}}}
            writer.write_record(
                writer.create_warc_record(
                    url,
                    "metadata",
                    payload=io.BytesIO(json.dumps(envelope).encode()),
                    warc_content_type="application/json",
                )
            )
    return path


REQUESTS: list[tuple[str, str]] = []  # (method, path) of every request the test server answered


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Python's http.server on 127.0.0.1 (a free port, in a thread) serving a copy of two small bundled crawl files
    (copied so a test can change a served file)."""
    root = tmp_path_factory.mktemp("served")
    for name in (WARC, WET):
        shutil.copyfile(DATA_DIR / "crawl" / name, root / name)

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # one line per request would flood the test output; kept in REQUESTS
            REQUESTS.append((self.command, self.path))

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()


def filter_only(**kwargs) -> DataConfig:
    """One executor run: the filter stage only (dedup and PII do not touch input handling)."""
    return DataConfig(
        text_sources={},
        exact_dedup=False,
        minhash=False,
        sentence_dedup=False,
        extract_timeout_s=SLOW_MACHINE_TIMEOUT_S,
        **kwargs,
    )


def corpus(cfg: DataConfig, out: Path) -> CorpusRef:
    return build_corpus(cfg, crawl_inputs(cfg), out)


def run_data_stage(cfg: DataConfig, root: Path) -> CorpusRef:
    """The data stage as its flow runs it: the inputs found once, then `run_stage` (key, folder, manifest)."""
    inputs = crawl_inputs(cfg)
    return run_stage("data", cfg, inputs, lambda out: build_corpus(cfg, inputs, out), root)


def outcome(out: Path, result: CorpusRef) -> dict:
    """What a run kept and removed (by step), and its counts, without the file paths that name where it read."""

    def docs(folder: Path) -> list[tuple]:
        return sorted((r["id"], r["metadata"]["url"], r["text"]) for r in iter_records(folder))

    removed = {d.name: docs(d) for d in sorted((out / "removed").iterdir())}
    counts = {k: (c.get("in"), c.get("kept"), c.get("dropped_by_reason")) for k, c in result.counts["steps"].items()}
    return {"kept": docs(out / "documents"), "removed": removed, "counts": counts}


# ---------------------------------------------------------------------------------------------------------------
# Listings (pure: no pipeline)


def test_listing_expands_in_order_under_the_base_and_keeps_plain_inputs(tmp_path):
    lines = [f"crawl-data/CC-MAIN-2024-22/segments/1715971057216.39/warc/CC-MAIN-{i:05d}.warc.gz" for i in range(3)]
    listing = write_listing(tmp_path / "warc.paths.gz", [lines[0], "", lines[1], lines[2]])  # blank lines skipped
    plain = write_listing(tmp_path / "wet.paths", ["crawl-data/x/wet/a.warc.wet.gz"])
    files = expand_inputs(["data/crawl/" + WARC, str(listing), str(plain)], "s3://commoncrawl/", max_files=2)
    assert files == [
        "data/crawl/" + WARC,
        "s3://commoncrawl/" + lines[0],
        "s3://commoncrawl/" + lines[1],
        "s3://commoncrawl/crawl-data/x/wet/a.warc.wet.gz",
    ]
    https = expand_inputs([str(listing)], "https://data.commoncrawl.org")  # with or without the trailing slash
    assert https[2] == "https://data.commoncrawl.org/" + lines[2]
    assert [is_wet(f) for f in files] == [False, False, False, True]
    assert split_root(files[1]) == ("s3://commoncrawl", lines[0])  # one reader per bucket, not per segment folder


@pytest.mark.parametrize(
    "name, content, error, message",
    [
        ("empty.paths.gz", gzip.compress(b"\n\n"), ValueError, "empty.paths.gz is empty"),
        ("html.paths", b"<html><body>Not Found</body></html>\n", ValueError, "html.paths, line 1"),
        ("abs.paths", b"crawl-data/a.warc.gz\n/etc/passwd.warc.gz\n", ValueError, "abs.paths, line 2"),
        ("url.paths", b"https://data.commoncrawl.org/crawl-data/a.warc.gz\n", ValueError, "url.paths, line 1"),
        ("index.paths", b"cc-index/collections/CC-MAIN-2024-22/indexes/cdx-00000.gz\n", ValueError, "not a relative"),
        ("plain.paths.gz", b"crawl-data/a.warc.gz\n", ValueError, "plain.paths.gz is unreadable"),
        ("binary.paths", b"\xff\xfe\x00junk", ValueError, "binary.paths is unreadable"),
    ],
)
def test_bad_listing_is_named(tmp_path, name, content, error, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=message):
        read_listing(str(tmp_path / name))


def test_missing_listing_and_duplicates_after_expansion_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.paths.gz"):
        expand_inputs([str(tmp_path / "nope.paths.gz")], "https://data.commoncrawl.org/")
    listing = write_listing(tmp_path / "warc.paths", ["crawl-data/a.warc.gz"])
    with pytest.raises(ValueError, match="listed twice"):
        expand_inputs(["/base/crawl-data/a.warc.gz", str(listing)], "/base")


# ---------------------------------------------------------------------------------------------------------------
# Remote inputs over HTTP: the same documents as the local files


@pytest.fixture(scope="module")
def local_and_remote(server, tmp_path_factory):
    base, _ = server
    folder = tmp_path_factory.mktemp("remote")
    local = corpus(filter_only(inputs=[f"data/crawl/{WARC}", f"data/crawl/{WET}"]), folder / "local")
    # The WET file comes through a listing based at the server; max_files=1 leaves out a second line that names
    # a file the server does not have (were it expanded, the run would stop on it before any work).
    listing = write_listing(folder / "wet.paths.gz", [WET, "missing/CC-MAIN-00000.warc.wet.gz"])
    cfg = filter_only(inputs=[f"{base}/{WARC}", str(listing)], paths_base=base + "/", max_files=1)
    remote = corpus(cfg, folder / "remote")
    return (folder / "local", local), (folder / "remote", remote)


def test_remote_urls_give_the_same_documents_and_counts_as_local_files(local_and_remote, server):
    (local_dir, local), (remote_dir, remote) = local_and_remote
    assert outcome(remote_dir, remote) == outcome(local_dir, local)
    assert remote.counts["steps"]["filter/read_wet"]["in"] == 68
    assert len(list(iter_records(remote_dir / "documents"))) >= 3  # English pages of the WET sample
    paths = {r["metadata"]["file_path"] for r in iter_records(remote_dir / "removed" / "language")}
    assert paths == {f"{server[0]}/{WARC}", f"{server[0]}/{WET}"}  # read over HTTP, not from data/crawl
    assert json.loads((remote_dir / "config.json").read_text())["inputs"][1].endswith("wet.paths.gz")


def test_missing_or_unreachable_remote_input_is_named_before_any_work(server, tmp_path):
    base, _ = server
    with pytest.raises(FileNotFoundError, match=f"{base}/no-such.warc.gz"):
        corpus(filter_only(inputs=[f"{base}/{WARC}", f"{base}/no-such.warc.gz"]), tmp_path / "out")
    listing = write_listing(tmp_path / "warc.paths.gz", ["crawl-data/gone.warc.gz"])
    with pytest.raises(FileNotFoundError, match=f"{base}/crawl-data/gone.warc.gz"):
        corpus(filter_only(inputs=[str(listing)], paths_base=base), tmp_path / "out")
    closed = "http://127.0.0.1:9/x.warc.gz"  # the discard port: nothing listens there
    with pytest.raises(OSError, match="127.0.0.1:9/x.warc.gz"):
        check_input(closed)
    with pytest.raises(OSError, match="127.0.0.1:9/x.warc.gz"):  # also among other inputs, asked all at once
        crawl_inputs(filter_only(inputs=[f"{base}/{WARC}", closed]))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# URL inputs in the stage key (what the flow's data task hashes)


def test_url_inputs_are_hashed_from_server_metadata_and_rehashed_when_the_file_changes(server, tmp_path):
    base, root = server
    listing = write_listing(tmp_path / "wet.paths", [WET])
    cfg = DataConfig(inputs=[f"{base}/{WARC}", str(listing)], paths_base=base, text_sources={})
    inputs = crawl_inputs(cfg)
    assert {name: ref.path for name, ref in inputs.items()} == {"input_0": f"{base}/{WARC}", "input_1": f"{base}/{WET}"}
    assert inputs["input_0"].size == (root / WARC).stat().st_size and len(inputs["input_0"].sha256) == 64
    calls = []

    def core(out: Path) -> InputRef:
        calls.append(out)
        (out / "documents").mkdir()
        return InputRef(path=str(out / "documents"))

    first = run_stage("data", cfg, inputs, core, tmp_path / "runs")
    again = run_stage("data", cfg, crawl_inputs(cfg), core, tmp_path / "runs")
    assert again.cached and len(calls) == 1

    def manifest_inputs(ref: InputRef) -> dict:
        return json.loads(Path(ref.manifest).read_text())["inputs"]

    assert manifest_inputs(first)["input_0"]["path"] == f"{base}/{WARC}"
    # Same size, new content, a later Last-Modified: a new key.
    served = root / WARC
    served.write_bytes(bytes(reversed(served.read_bytes())))
    stat = served.stat()
    os.utime(served, (stat.st_atime, stat.st_mtime + 10))
    changed = run_stage("data", cfg, crawl_inputs(cfg), core, tmp_path / "runs")
    assert changed.key != first.key and len(calls) == 2
    assert manifest_inputs(changed)["input_1"]["sha256"] == manifest_inputs(first)["input_1"]["sha256"]
    shutil.copyfile(DATA_DIR / "crawl" / WARC, served)  # leave the served copy as the other tests expect


def test_a_data_stage_asks_about_each_remote_input_and_reads_a_listing_once(server, tmp_path):
    """What the flow runs (`crawl_inputs`, then `run_stage` with `build_corpus`): the stage key, the checks before
    any work and the dealing of files to tasks all need each URL's metadata, and expanding a listing its lines;
    `crawl_inputs` fetches each once and hands the answers on (a URL used to be asked about four times, a listing
    read twice). The readers still open their files."""
    base, root = server
    (root / "wet.paths").write_text(f"{WET}\n")
    cfg = filter_only(inputs=[f"{base}/{WARC}", f"{base}/wet.paths"], paths_base=base, max_files=1)
    REQUESTS.clear()
    first = run_data_stage(cfg, tmp_path / "runs")
    built = list(REQUESTS)
    REQUESTS.clear()
    again = run_data_stage(cfg, tmp_path / "runs")  # reused: only the key is computed
    assert again.cached and again.key == first.key and not first.cached
    listing = [("GET", "/wet.paths"), ("HEAD", "/wet.paths")]  # fsspec opens a file over HTTP with a HEAD
    assert sorted(REQUESTS) == sorted([*listing, ("HEAD", f"/{WARC}"), ("HEAD", f"/{WET}")])
    assert built.count(("GET", "/wet.paths")) == 1
    assert built.count(("HEAD", f"/{WARC}")) <= 2 and built.count(("HEAD", f"/{WET}")) <= 2  # ours, the reader's
    assert first.counts["steps"]["filter/read_wet"]["in"] == 68 and isinstance(first, CorpusRef)


# ---------------------------------------------------------------------------------------------------------------
# WAT files: refused by name, counted by content


def test_wat_input_is_refused_by_name_before_any_work(tmp_path):
    wat = write_wat(tmp_path / "CC-MAIN-00000.warc.wat.gz", ["https://example.org/a", "https://example.org/b"])
    assert is_wat(str(wat)) and not is_wet(str(wat)) and not is_wat("data/crawl/x.water.warc.gz")
    with pytest.raises(ValueError, match="CC-MAIN-00000.warc.wat.gz is a WAT file"):
        corpus(DataConfig(inputs=[str(wat)], text_sources={}), tmp_path / "out")
    listing = write_listing(tmp_path / "wat.paths.gz", ["crawl-data/CC/segments/1/wat/CC-MAIN-00001.warc.wat.gz"])
    with pytest.raises(ValueError, match="CC-MAIN-00001.warc.wat.gz is a WAT file"):
        corpus(DataConfig(inputs=[str(listing)], paths_base=str(tmp_path), text_sources={}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wat_records_in_a_file_named_like_a_warc_are_counted_not_read(tmp_path):
    write_wat(tmp_path / "renamed.warc.gz", [f"https://example.org/{i}" for i in range(3)])
    (tmp_path / "files.txt").write_text("renamed.warc.gz\n")
    reader = CrawlReader(str(tmp_path), str(tmp_path / "files.txt"))
    assert list(reader.run()) == []
    assert reader.stats["records"].total == reader.stats["dropped_wat_metadata_only"].total == 3
    assert reader.stats["dropped"].total == 3


@pytest.mark.skipif(not SHARED_WAT.is_file(), reason=f"{SHARED_WAT} not present")
def test_common_crawl_wat_sample_is_refused_and_its_records_counted(tmp_path):
    with pytest.raises(ValueError, match="whirlwind.warc.wat.gz is a WAT file"):
        check_input(str(SHARED_WAT))
    (tmp_path / "files.txt").write_text(SHARED_WAT.name + "\n")
    reader = CrawlReader(str(SHARED_WAT.parent), str(tmp_path / "files.txt"))
    assert list(reader.run()) == []
    assert reader.stats["records"].total == reader.stats["dropped_wat_metadata_only"].total >= 1


def test_a_url_input_on_the_command_line_is_checked_not_refused(server, tmp_path):
    """`gptflow data --input URL`: a URL that answers is kept as given (a local path must exist, as before);
    one that does not is a one-line error naming it, before Prefect starts."""
    from flows.cli import data_input
    from tasks.stage import GptflowError

    base, _ = server
    assert data_input(f"{base}/{WARC}") == f"{base}/{WARC}"
    with pytest.raises(GptflowError, match="no-such.warc.gz"):
        data_input(f"{base}/no-such.warc.gz")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"GPTFLOW_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "data", "--input", "http://127.0.0.1:9/x.warc.gz"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("gptflow: error: data input") and "http://127.0.0.1:9/x.warc.gz" in last
    assert not (tmp_path / "home" / "prefect" / "prefect.db").exists()  # no Prefect server was started
