"""HTML text extraction: quality against Common Crawl's own WET text, and speed, for the extractors we can run.

    python -m bench.extraction [--warc PATH ...] [--rounds 2] [--out FILE.md] [--json FILE]

Pages are the HTML `response` records of the WARC files, decoded as the data stage decodes them (datatrove's
`process_record`, which also skips non-HTML records). A WARC with a WET beside it (`X.warc.gz` + `X.warc.wet.gz`)
is paired record by record: the WET `conversion` record's `WARC-Refers-To` names the WARC response's
`WARC-Record-ID` (else the same `WARC-Target-URI`). For each paired page and extractor:
- characters of our text and of the WET text;
- word precision: the share of our words (bag of words, Unicode `\\w+`, lower-cased) also in the WET text;
- word recall: the share of the WET's words also in ours;
- line precision: the share of our non-empty lines found verbatim (whitespace collapsed) in the WET text.
The WET is Common Crawl's whole-page text (menus, language lists and footers included), not a main-content
gold standard: a main-content extractor should score precision near 1 and recall well below 1, and a whole-page
converter (inscriptis) near 1 on both; it checks that we lose no main text and add no text that is not on the page.

Extractors (each run in this process, one page at a time, no timeout; pages over the stage's 1 s limit are
counted, since the stage drops them):
- trafilatura precision: datatrove's `Trafilatura(favour_precision=True, timeout=...)` block's `extract`, as
  `tasks/data/plan.py` configures it (our pipeline);
- trafilatura default and trafilatura recall (`favor_recall=True`): the same block with the other settings;
- inscriptis: whole-page HTML to text (the text half of datatrove's `ReadabilityInscriptis`; its readability half,
  `readability-lxml`, is not installed);
- resiliparse `extract_plain_text(main_content=True)`, only if `resiliparse` is importable (it is not one of our
  pinned dependencies).
Speed is pages per second on one core: per page the fastest of `--rounds` runs (trafilatura's duplicate cache
is reset before each run), summed; "pages/s under 1 s" counts only the pages that finish within the stage's time
limit (the stage gives up on the others), so a few multi-MB pages do not dominate it. All WARC files in data/crawl/ are used by default; the ones without a WET
give speed and length statistics, plus the share of words in prose-like lines (>= 3 words ending in terminal
punctuation, C4's line rule in short) as a rough sign of how much boilerplate an extractor lets through.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.env import DATA_DIR, setup_env

CRAWL_DIR = DATA_DIR / "crawl"
WORD = re.compile(r"\w+")
TERMINAL = tuple(".!?\"'”’。！？")


# ---------------------------------------------------------------------------------------------------------------
# Text comparison (pure)


def words(text: str) -> Counter:
    return Counter(w.lower() for w in WORD.findall(text or ""))


def word_overlap(ours: str, reference: str) -> dict[str, float]:
    """Bag-of-words overlap: precision = shared / our words, recall = shared / reference words (0 when empty)."""
    a, b = words(ours), words(reference)
    shared = sum((a & b).values())
    n_a, n_b = sum(a.values()), sum(b.values())
    precision = shared / n_a if n_a else 0.0
    recall = shared / n_b if n_b else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"shared": shared, "ours": n_a, "reference": n_b, "precision": precision, "recall": recall, "f1": f1}


def clean_lines(text: str) -> list[str]:
    """Lines with table bars and list dashes removed (trafilatura writes cells as "a | b |" and items as "- a"),
    whitespace collapsed; lines without a word are left out."""
    out = []
    for line in (text or "").splitlines():
        line = " ".join(re.sub(r"^\s*-\s+", "", line).replace("|", " ").split())
        if WORD.search(line):
            out.append(line)
    return out


def line_precision(ours: str, reference: str) -> float:
    """Share of our lines that occur verbatim (after `clean_lines`) in the reference text."""
    lines, ref = clean_lines(ours), " ".join(clean_lines(reference))
    return sum(line in ref for line in lines) / len(lines) if lines else 0.0


def is_prose(line: str) -> bool:
    """C4's line rule in short: at least 3 words, ending in terminal punctuation."""
    return len(WORD.findall(line)) >= 3 and line.rstrip().endswith(TERMINAL)


def prose_recall(ours: str, reference: str) -> float:
    """Share of the reference's prose lines (sentences, not menus) that occur verbatim in our text."""
    lines, text = [line for line in clean_lines(reference) if is_prose(line)], " ".join(clean_lines(ours))
    return sum(line in text for line in lines) / len(lines) if lines else 0.0


def prose_share(text: str) -> float:
    """Share of words in lines with >= 3 words that end in terminal punctuation (C4's line rule, roughly)."""
    total = prose = 0
    for line in (text or "").splitlines():
        n = len(WORD.findall(line))
        total += n
        prose += n if is_prose(line) else 0
    return prose / total if total else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Page:
    file: str
    url: str
    record_id: str
    html: str
    wet: str | None = None


def read_pages(warc: Path) -> list[Page]:
    """HTML responses, decoded by datatrove's `process_record` exactly as the data stage's reader does."""
    from datatrove.pipeline.readers.warc import process_record
    from warcio.archiveiterator import ArchiveIterator

    pages = []
    with open(warc, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type != "response":
                continue
            data = process_record(record)  # None for non-HTML or undecodable records
            if data and data.get("text"):
                headers = record.rec_headers
                pages.append(Page(warc.name, headers.get_header("WARC-Target-URI") or "",
                                  headers.get_header("WARC-Record-ID") or "", data["text"]))
    return pages


def attach_wet(pages: list[Page], wet: Path) -> int:
    """Set `page.wet` from the WET conversion record of the same capture; returns how many pages got one."""
    from warcio.archiveiterator import ArchiveIterator

    by_id, by_url = {}, {}
    with open(wet, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type != "conversion":
                continue
            text = record.content_stream().read().decode("utf-8", errors="replace")
            by_id[record.rec_headers.get_header("WARC-Refers-To")] = text
            by_url[record.rec_headers.get_header("WARC-Target-URI")] = text
    for page in pages:
        page.wet = by_id.get(page.record_id, by_url.get(page.url))
    return sum(page.wet is not None for page in pages)


def wet_beside(warc: Path) -> Path | None:
    name = warc.name.removesuffix(".gz").removesuffix(".warc")
    candidate = warc.with_name(f"{name}.warc.wet.gz")
    return candidate if candidate.is_file() else None


# ---------------------------------------------------------------------------------------------------------------
# Extractors


def extractors(timeout_s: float) -> dict[str, Callable[[str], str | None]]:
    from datatrove.pipeline.extractors import Trafilatura
    from inscriptis import get_text

    found: dict[str, Callable[[str], str | None]] = {
        "trafilatura precision (ours)": Trafilatura(favour_precision=True, timeout=timeout_s).extract,
        "trafilatura default": Trafilatura(favour_precision=False, timeout=timeout_s).extract,
        "trafilatura recall": Trafilatura(favour_precision=False, favor_recall=True, timeout=timeout_s).extract,
        "inscriptis (whole page)": get_text,
    }
    try:
        from resiliparse.extract.html2text import extract_plain_text

        found["resiliparse main content"] = lambda html: extract_plain_text(html, main_content=True)
    except ImportError:
        pass
    return found


@dataclass
class Timed:
    texts: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # per page, fastest round


def run_extractor(fn: Callable[[str], str | None], pages: list[Page], rounds: int) -> Timed:
    from trafilatura.meta import reset_caches

    best: list[float] = [float("inf")] * len(pages)
    texts: list[str] = []
    for _ in range(rounds):
        reset_caches()  # trafilatura's duplicate filter remembers paragraphs across calls
        texts = []
        for i, page in enumerate(pages):
            start = time.perf_counter()
            text = fn(page.html) or ""
            best[i] = min(best[i], time.perf_counter() - start)
            texts.append(text)
    return Timed(texts, best)


# ---------------------------------------------------------------------------------------------------------------
# Tables


def render(headers: list[str], rows: list[list[Any]]) -> tuple[str, str]:
    """A plain-text table for the terminal and the same table in markdown."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    text = "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in [headers, *cells]
    )
    md = "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                    *("| " + " | ".join(row) + " |" for row in cells)])
    return text, md


def short(url: str, n: int = 48) -> str:
    url = re.sub(r"^https?://", "", url)
    return url if len(url) <= n else url[: n - 1] + "…"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.extraction", description=__doc__.split("\n\n")[0])
    ap.add_argument("--warc", type=Path, nargs="+", help="WARC files (default: every *.warc.gz in data/crawl/)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per extractor; each page's fastest counts")
    ap.add_argument("--out", type=Path, help="also write the tables as markdown to this file")
    ap.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    setup_env()
    from tasks.data import DataConfig

    timeout_s = DataConfig().extract_timeout_s
    warcs = args.warc or sorted(p for p in CRAWL_DIR.glob("*.warc.gz") if not p.name.endswith(".wet.gz"))
    files: dict[str, list[Page]] = {}
    for warc in warcs:
        files[warc.name] = read_pages(warc)
        wet = wet_beside(warc)
        paired = attach_wet(files[warc.name], wet) if wet else 0
        print(f"{warc.name}: {len(files[warc.name])} HTML pages" + (f", {paired} paired with {wet.name}" if wet else ""))
    pages = [p for ps in files.values() for p in ps]
    fns = extractors(timeout_s)
    missing = [] if any(k.startswith("resiliparse") for k in fns) else ["resiliparse (not installed)"]
    print(f"{len(pages)} pages; extractors: {', '.join(fns)}" + (f"; not run: {', '.join(missing)}" if missing else ""))
    print(f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    results = {}
    for name, fn in fns.items():
        results[name] = run_extractor(fn, pages, args.rounds)
        print(f"  {name}: {sum(results[name].seconds):.2f} s for {len(pages)} pages", flush=True)

    md_parts, res = ["# Extraction benchmark\n"], {"pages": len(pages), "extractors": {}, "wet": [], "files": []}

    # 1. against the WET text, per paired page and over all of them (sums of words; means of line shares)
    paired = [i for i, p in enumerate(pages) if p.wet is not None]
    headers = ["page", "extractor", "chars", "WET chars", "word prec.", "word recall", "line prec.", "prose recall"]
    rows = []
    for name, r in results.items():
        per_page = []
        for i in paired:
            ov = word_overlap(r.texts[i], pages[i].wet)
            per_page.append((ov, line_precision(r.texts[i], pages[i].wet), prose_recall(r.texts[i], pages[i].wet)))
            rows.append([short(pages[i].url, 36), name, len(r.texts[i]), len(pages[i].wet), ov["precision"],
                         ov["recall"], per_page[-1][1], per_page[-1][2]])
        if len(paired) > 1:
            shared, ours_n, ref_n = (sum(ov[k] for ov, _, _ in per_page) for k in ("shared", "ours", "reference"))
            rows.append(["all paired pages", name, sum(len(r.texts[i]) for i in paired),
                         sum(len(pages[i].wet) for i in paired), shared / max(ours_n, 1), shared / max(ref_n, 1),
                         statistics.mean(x[1] for x in per_page), statistics.mean(x[2] for x in per_page)])
    if paired:
        text, md = render(headers, rows)
        title = f"Against Common Crawl's WET text ({len(paired)} paired page{'s' * (len(paired) > 1)})"
        print(f"\n{title}\n{text}")
        md_parts.append(f"## {title}\n\n{md}\n")
        res["wet"] = [dict(zip(headers, row, strict=True)) for row in rows]

    # 2. speed and output size per WARC file
    headers = ["file", "extractor", "pages", "non-empty", "pages/s", "median ms", "max ms",
               f"over {timeout_s:g} s", "chars out", "median chars", "prose share"]
    rows = []
    for fname in files:
        idx = [i for i, p in enumerate(pages) if p.file == fname]
        for name, r in results.items():
            secs, chars = [r.seconds[i] for i in idx], [len(r.texts[i]) for i in idx]
            rows.append([fname.removesuffix(".warc.gz"), name, len(idx), sum(c > 0 for c in chars),
                         f"{len(idx) / sum(secs):.1f}", f"{1000 * statistics.median(secs):.1f}",
                         f"{1000 * max(secs):.0f}", sum(t > timeout_s for t in secs), sum(chars),
                         int(statistics.median(chars)), prose_share("\n".join(r.texts[i] for i in idx))])
    text, md = render(headers, rows)
    print(f"\nspeed (one core) and output size per WARC file\n{text}")
    md_parts.append(f"## Speed (one core) and output size per WARC file\n\n{md}\n")
    res["files"] = [dict(zip(headers, row, strict=True)) for row in rows]

    # 3. all pages
    headers = ["extractor", "pages", "non-empty", "pages/s", "pages/s under 1 s", "k chars out", "prose share"]
    rows = []
    for name, r in results.items():
        fast = [t for t in r.seconds if t <= timeout_s]
        stats = {"pages": len(pages), "non_empty": sum(bool(t) for t in r.texts),
                 "pages_per_s": len(pages) / sum(r.seconds), "pages_per_s_under_timeout": len(fast) / sum(fast),
                 "chars": sum(map(len, r.texts)), "prose_share": prose_share("\n".join(r.texts))}
        res["extractors"][name] = stats
        rows.append([name, len(pages), stats["non_empty"], f"{stats['pages_per_s']:.1f}",
                     f"{stats['pages_per_s_under_timeout']:.1f}", f"{stats['chars'] / 1e3:.0f}", stats["prose_share"]])
    text, md = render(headers, rows)
    print(f"\nall pages\n{text}")
    md_parts.append(f"## All pages\n\n{md}\n")
    if missing:
        note = f"Not run: {', '.join(missing)}."
        print(note)
        md_parts.append(note + "\n")
    print(f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.out:
        args.out.write_text("\n".join(md_parts))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
