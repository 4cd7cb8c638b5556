"""Data stage on real datatrove: hand-made WARC fixtures (built with warcio into tmp folders) and the bundled crawl.

Run: `.venv/bin/python -m pytest tests/unit/test_data.py -q` (about a minute on 2 cores: the first pipeline run
starts datatrove's forkserver, which imports spaCy once for all the runs after it).
"""

import io
import json
import logging
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.env import setup_env

setup_env()  # offline switches and caches in the workspace, before datatrove/huggingface_hub are imported

from tasks.data import (  # noqa: E402
    BUNDLED_CRAWL,
    DataConfig,
    build_corpus,
    crawl_inputs,
    execute,
    iter_documents,
    iter_records,
)
from tasks.refs import CorpusRef  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Hand-made pages. Each good article has one distinctive sentence we look for in the output.

ARTICLES = {
    "bread": (
        "How to keep a sourdough starter alive",
        [
            "A sourdough starter is a simple mixture of flour and water that has been colonised by wild yeast and "
            "lactic acid bacteria. Bakers feed it every day with fresh flour so that the microbes have something to eat. "
            "When the starter is active it doubles in size within a few hours and smells pleasantly sour.",
            "The distinctive sentence about bread says that rye flour wakes a sleepy starter faster than white flour. "
            "If you forget to feed it for a week, the starter is usually not dead but only hungry. "
            "Pour off the grey liquid on top, discard most of the paste and feed the rest twice a day until it recovers.",
        ],
    ),
    "lighthouse": (
        "A short history of the lighthouse keeper",
        [
            "For centuries the safety of ships near rocky coasts depended on the people who kept the lights burning. "
            "Keepers trimmed wicks, polished lenses and wound the clockwork that turned the great glass optics. "
            "Many of them lived with their families on remote islands where supply boats arrived only once a month.",
            "The distinctive sentence about lighthouses notes that automation ended the profession in most countries. "
            "Today a small computer switches the lamp on at dusk and reports faults over a radio link. "
            "Some old towers have become museums, and visitors can climb the narrow stairs to see the view.",
        ],
    ),
    "bees": (
        "Why honeybees dance",
        [
            "A forager bee that finds a rich patch of flowers returns to the hive and performs a waggle dance on the comb. "
            "The angle of the dance relative to vertical tells her sisters the direction of the food compared with the sun. "
            "The length of the waggle run tells them roughly how far they will have to fly.",
            "The distinctive sentence about bees explains that the dance was decoded by Karl von Frisch in the last century. "
            "His experiments with sugar water and painted bees earned him a share of the Nobel Prize. "
            "Researchers still argue about how precisely the recruits follow the information they receive.",
        ],
    ),
    "tides": (
        "What causes the tides",
        [
            "The oceans rise and fall twice a day because the gravity of the moon pulls unevenly on the rotating earth. "
            "Water on the side facing the moon is pulled a little more strongly than the planet beneath it. "
            "On the far side the solid earth is pulled away from the water, which produces a second bulge.",
            "The distinctive sentence about tides says that spring tides happen when the sun and moon line up. "
            "At those times the high tides are higher and the low tides are lower than usual. "
            "Harbour masters publish tables so that sailors know when there is enough water to leave port.",
        ],
    ),
    "library": (
        "Our community library is open again",
        [
            "After six months of repairs the village library has reopened with a new roof and a bright reading room. "
            "Volunteers have sorted the donated books, and the children's corner now has low shelves and soft chairs. "
            "The distinctive sentence about library events says that the first reading club meets on Tuesday evening.",
            "If you would like to help, please write to jane.doe@villagelibrary.org or call 555-867-5309 during the day. "
            "The catalogue server at 81.2.69.160 is being moved, so the online search may be slow this week. "
            "We are grateful to everyone who donated time, money and books to make this possible.",
        ],
    ),
}
GERMAN = (
    "Die Geschichte der Eisenbahn",
    [
        "Die erste Eisenbahn in Deutschland fuhr im Jahr 1835 zwischen Nürnberg und Fürth. "
        "Die Lokomotive hieß Adler und wurde aus England geliefert, zusammen mit einem englischen Lokführer. "
        "Schon wenige Jahrzehnte später verband ein dichtes Netz von Strecken fast alle größeren Städte des Landes.",
        "Heute fahren Hochgeschwindigkeitszüge mit mehr als dreihundert Kilometern pro Stunde durch das Land. "
        "Viele Menschen nutzen die Bahn täglich, um zur Arbeit oder zur Schule zu kommen. "
        "Die alten Bahnhöfe sind oft prächtige Gebäude, die unter Denkmalschutz stehen.",
    ],
)
NAV_ONLY = """<html><head><title>Shop</title></head><body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/about">About us</a></li><li><a href="/shop">Shop</a></li>
<li><a href="/contact">Contact</a></li><li><a href="/login">Log in</a></li></ul></nav>
<div class="menu"><a href="/a">Category A</a> | <a href="/b">Category B</a> | <a href="/c">Category C</a></div>
<footer>Copyright 2024 Example Shop. All rights reserved.</footer></body></html>"""
LOREM = (
    "Welcome to our new website",
    [
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore. "
        "Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo. "
        "This page is a template and the real text will be added soon by our editors.",
    ],
)


# Trafilatura's 1 s limit also bounds the start of its sandbox process; on a busy 2-core machine that can cost a
# page now and then, which the exact counts below would see. Real pages in these fixtures take a few milliseconds.
SLOW_MACHINE_TIMEOUT_S = 10.0


def article_html(title: str, paragraphs: list[str]) -> str:
    body = "".join(f"<p>{p}</p>\n" for p in paragraphs)
    return (
        f"<html><head><title>{title}</title></head><body>"
        f'<nav><a href="/">Home</a> <a href="/news">News</a> <a href="/contact">Contact</a></nav>'
        f"<article><h1>{title}</h1>\n{body}</article>"
        f"<footer>Copyright 2024. All rights reserved.</footer></body></html>"
    )


def distinctive(name: str) -> str:
    return f"The distinctive sentence about {name if name != 'lighthouse' else 'lighthouses'}"


def write_warc(path: Path, pages: list[tuple[str, str]]) -> Path:
    """A gzipped WARC with one HTTP response record (plus its request) per (url, html) page."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url, html in pages:
            get = StatusAndHeaders("GET / HTTP/1.1", [("Host", url.split("/")[2])], is_http_request=True)
            request = writer.create_warc_record(url, "request", payload=io.BytesIO(b""), http_headers=get)
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            response = writer.create_warc_record(
                url,
                "response",
                payload=io.BytesIO(html.encode("utf-8")),
                http_headers=http,
                warc_headers_dict={"WARC-Identified-Payload-Type": "text/html"},
            )
            writer.write_record(request)
            writer.write_record(response)
    return path


def corpus(cfg: DataConfig, out: Path) -> CorpusRef:
    """The stage's core as its flow calls it: the inputs found once, then the corpus built from them."""
    return build_corpus(cfg, crawl_inputs(cfg), out)


def assert_invariants(result: CorpusRef) -> None:
    for key, c in result.counts["steps"].items():
        if "in" in c:
            assert c["in"] == c["kept"] + c["dropped"] == c["kept"] + sum(c["dropped_by_reason"].values()), key


# ---------------------------------------------------------------------------------------------------------------
# Hand-made crawl: good prose, three copies of one article, a German page, a nav-only page and a lorem ipsum page.


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    folder = tmp_path_factory.mktemp("handmade")
    pages = [(f"https://example.org/{name}", article_html(*ARTICLES[name])) for name in ARTICLES]
    pages += [
        ("https://mirror-one.example.net/bread", article_html(*ARTICLES["bread"])),
        ("https://mirror-two.example.net/bread", article_html(*ARTICLES["bread"])),
        ("https://example.de/eisenbahn", article_html(*GERMAN)),
        ("https://shop.example.com/", NAV_ONLY),
        ("https://new.example.com/", article_html(*LOREM)),
    ]
    warc = write_warc(folder / "handmade.warc.gz", pages)
    cfg = DataConfig(inputs=[str(warc)], text_sources={}, minhash=False, extract_timeout_s=SLOW_MACHINE_TIMEOUT_S)
    out = folder / "out"
    progress, logger = ProgressLines(), logging.getLogger("tasks.data")
    level, every = logger.level, execute.PROGRESS_EVERY_S
    logger.addHandler(progress)
    logger.setLevel(logging.INFO)
    execute.PROGRESS_EVERY_S = 0.1  # the runs' progress lines, 10 a second
    try:
        result = corpus(cfg, out)
    finally:
        execute.PROGRESS_EVERY_S = every
        logger.setLevel(level)
        logger.removeHandler(progress)
    return result, out, progress.lines


class ProgressLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "tasks done" in record.getMessage():
            self.lines.append(record.getMessage())


def test_a_running_datatrove_run_reports_its_tasks_done(handmade):
    """Long datatrove runs say how far they are: `data run <name>: k/n tasks done after s s`, from datatrove's
    completion markers, every `PROGRESS_EVERY_S` (30 s by default; 0.1 s here)."""
    lines = handmade[2]
    seen: dict[str, list[int]] = {}
    for line in lines:
        match = re.fullmatch(r"data run (\w+): (\d+)/(\d+) tasks done after \d+ s", line)
        assert match, line
        done, total = int(match[2]), int(match[3])
        assert 0 <= done <= total, line
        assert total == 2 or match[1] != "filter", line  # the filter run has the config's 2 tasks
        seen.setdefault(match[1], []).append(done)
    assert "filter" in seen
    assert all(counts == sorted(counts) for counts in seen.values())  # tasks only ever get done


def test_handmade_keeps_each_good_article_once_and_drops_the_junk(handmade):
    result, out, _ = handmade
    assert_invariants(result)
    texts = list(iter_documents(out))
    for name in ("bread", "lighthouse", "bees", "tides", "library"):
        assert sum(distinctive(name) in t for t in texts) == 1, name
    assert len(texts) == 5
    assert not any("Eisenbahn" in t or "Lorem ipsum" in t or "Category A" in t for t in texts)
    steps = result.counts["steps"]
    assert steps["exact_dedup/exact_dedup"]["dropped_by_reason"] == {"exact_duplicate": 2}
    assert result.counts["totals"] == result.counts["totals"] | {"records_in": 10, "docs_in": 10, "docs_out": 5}
    assert result.path == str(out.resolve() / "documents") and result.docs == 5
    assert set(result.files) == {"documents", "removed", "logs", "summary", "funnel", "samples"}
    assert result.artifacts == ["funnel", "samples"] and result.file("funnel").is_file()
    assert json.loads(result.file("summary").read_text())["counts"] == result.counts


def test_handmade_removed_pages_are_written_with_their_filter(handmade):
    result, out, _ = handmade
    language = {r["metadata"]["url"]: r["metadata"]["language"] for r in iter_records(out / "removed" / "language")}
    assert language["https://example.de/eisenbahn"] == "de"
    junk = {"https://shop.example.com/", "https://new.example.com/", "https://example.de/eisenbahn"}
    kept_urls = {r["metadata"]["url"] for r in iter_records(out / "documents")}
    assert not kept_urls & junk
    removed = {r["metadata"]["url"] for f in (out / "removed").iterdir() for r in iter_records(f)}
    assert junk <= removed  # the nav-only and lorem ipsum pages score as "not English enough" before C4 sees them
    assert {"https://mirror-one.example.net/bread", "https://mirror-two.example.net/bread"} <= removed


def test_handmade_pii_is_masked(handmade):
    _, out, _ = handmade
    library = next(t for t in iter_documents(out) if distinctive("library") in t)
    assert "jane.doe@villagelibrary.org" not in library and "81.2.69.160" not in library
    assert "555-867-5309" not in library
    assert "@example.com" in library or "@example.org" in library  # datatrove's replacement addresses
    assert "<PHONE>" in library


# ---------------------------------------------------------------------------------------------------------------
# The bundled crawl (4 Common Crawl files) plus a fifth of the C4 sample: every stage, MinHash included.


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled") / "out"
    cfg = DataConfig(text_sources={"data/text/c4_demo.jsonl.gz": 0.2})
    return cfg, out, corpus(cfg, out)


def test_bundled_counts_add_up_at_every_step(bundled):
    cfg, out, result = bundled
    assert_invariants(result)
    steps = result.counts["steps"]
    assert {k.split("/")[0] for k in steps} >= {"filter", "exact_dedup", "minhash_dedup", "sentence_dedup"}
    assert steps["filter/read_warc"]["in"] == 17  # 16 + 1 HTML responses; requests/metadata are not pages
    assert steps["filter/read_wet"]["in"] == 69
    assert steps["filter/language"]["dropped"] > 50  # the sample crawl is mostly zh/ru/vi/...
    sampled = steps["filter/sample"]["dropped_by_reason"]["sampled_out"]
    assert 200 < sampled < 280  # 4 in 5 of the 300 C4 documents
    totals = result.counts["totals"]
    assert totals["docs_out"] == steps["sentence_dedup/write"]["kept"] > 40
    assert steps["sentence_dedup/sentence_dedup"]["in"] == steps["minhash_dedup/write"]["kept"]
    assert result.counts["corrupt_files"] == []


def test_bundled_output_is_english_and_readable_by_datasets(bundled, tmp_path):
    import datasets

    _, out, result = bundled
    rows = list(iter_records(out / "documents"))
    assert {r["metadata"]["language"] for r in rows} == {"en"}
    ds = datasets.load_dataset(
        "json", data_files=str(out / "documents" / "*.jsonl.gz"), split="train", cache_dir=str(tmp_path)
    )
    assert len(ds) == result.counts["totals"]["docs_out"] == sum(1 for _ in iter_documents(out))
    mix = result.counts["mix"]
    assert set(mix) == {"crawl", "data/text/c4_demo.jsonl.gz"}
    assert sum(m["chars"] for m in mix.values()) == result.counts["totals"]["chars_out"]
    assert abs(sum(m["char_share"] for m in mix.values()) - 1) < 1e-3


def test_bundled_rerun_skips_finished_work_and_reports_the_same_counts(bundled):
    cfg, out, result = bundled
    again = corpus(cfg, out)

    def doc_counts(r: CorpusRef) -> dict:
        return {k: (c.get("in"), c.get("kept"), c.get("dropped_by_reason")) for k, c in r.counts["steps"].items()}

    assert doc_counts(again) == doc_counts(result)
    assert again.counts["mix"] == result.counts["mix"]
    with pytest.raises(ValueError, match="different config"):
        corpus(cfg.model_copy(update={"minhash": False}), out)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_input_is_named_before_any_work(tmp_path):
    cfg = DataConfig(inputs=[*BUNDLED_CRAWL, "data/crawl/no-such-file.warc.gz"])
    with pytest.raises(FileNotFoundError, match="no-such-file.warc.gz"):
        corpus(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="missing.jsonl.gz"):
        corpus(DataConfig(text_sources={"data/text/missing.jsonl.gz": 1.0}), tmp_path / "out")


def test_truncated_gzip_among_good_files_keeps_the_good_documents(tmp_path):
    good = write_warc(
        tmp_path / "good.warc.gz",
        [(f"https://good.example/{n}", article_html(*ARTICLES[n])) for n in ("bees", "tides")],
    )
    whole = write_warc(
        tmp_path / "whole.warc.gz", [(f"https://bad.example/{n}", article_html(*ARTICLES[n])) for n in ARTICLES]
    )
    data = whole.read_bytes()
    (tmp_path / "bad.warc.gz").write_bytes(data[: len(data) // 2])
    cfg = DataConfig(
        inputs=[str(good), str(tmp_path / "bad.warc.gz")],
        text_sources={},
        exact_dedup=False,
        minhash=False,
        sentence_dedup=False,
        extract_timeout_s=SLOW_MACHINE_TIMEOUT_S,
    )
    result = corpus(cfg, tmp_path / "out")
    assert_invariants(result)
    assert result.counts["corrupt_files"] == ["bad.warc.gz"]
    assert result.counts["steps"]["filter/read_warc"]["corrupt_files"] == ["bad.warc.gz"]
    urls = [r["metadata"]["url"] for r in iter_records(tmp_path / "out" / "documents")]
    assert {"https://good.example/bees", "https://good.example/tides"} <= set(urls)


def test_crawl_with_no_english_gives_an_empty_corpus_not_an_error(tmp_path):
    warc = write_warc(tmp_path / "de.warc.gz", [("https://example.de/eisenbahn", article_html(*GERMAN))])
    # tasks=1, workers=1: datatrove runs the tasks in this process, so this also covers the in-process path
    cfg = DataConfig(inputs=[str(warc)], text_sources={}, tasks=1, workers=1, extract_timeout_s=SLOW_MACHINE_TIMEOUT_S)
    result = corpus(cfg, tmp_path / "out")
    assert result.counts["totals"]["docs_out"] == 0 and list(iter_documents(tmp_path / "out")) == []
    assert result.counts["skipped_stages"][0] == "exact_signatures"
    assert result.counts["steps"]["filter/language"]["dropped"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"text_sources": {"data/text/c4_demo.jsonl.gz": 0.0}}, "weight must be in"),
        ({"text_sources": {"data/text/c4_demo.jsonl.gz": 1.5}}, "weight must be in"),
        ({"languages": ["en", "de"]}, "c4_badwords ships only the English list"),
        ({"languages": []}, "at least one language"),
        ({"inputs": [BUNDLED_CRAWL[0], BUNDLED_CRAWL[0]]}, "listed twice"),
        ({"language_threshold": 1.5}, "less than or equal"),
        ({"min_words": 3}, "Extra inputs are not permitted"),
        ({"max_files": 0}, "greater than or equal to 1"),
        ({"executor": "slurm"}, "Input should be 'auto', 'local' or 'ray'"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        DataConfig(**kwargs)


def test_config_is_frozen_and_documented():
    cfg = DataConfig()
    with pytest.raises(ValidationError):
        cfg.tasks = 3
    assert all(f.description for f in DataConfig.model_fields.values())
    assert DataConfig(languages=["en", "de"], c4_badwords=False).fingerprint() != cfg.fingerprint()


def test_executor_auto_follows_ray_address(monkeypatch):
    from tasks.data import uses_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not uses_ray(DataConfig()) and uses_ray(DataConfig(executor="ray"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert uses_ray(DataConfig()) and not uses_ray(DataConfig(executor="local"))
