"""Per-filter document counts of the data stage over every WARC/WET file we have, as markdown for the README.

    python -m bench.data_counts [--web DIR] [--out FUNNEL.png] [--md FILE] [--keep]

Runs `tasks.data.build_corpus` with `inputs` = every WARC and WET file in ../shared/data/web/ (or data/crawl/,
our bundled copies, when ../shared is missing) and no text sources, into a temporary folder, with the default
filters. WAT files are left out: they hold JSON metadata about the captures, no page text. Prints
- per step: documents in, kept, dropped (with the drop reasons), from the stage's own counts;
- per input file: page records, documents lost before the filters (non-HTML or undecodable records, empty
  extractions, extraction timeouts), dropped by each filter (read back from `removed/<step>/`), and kept;
- totals; and copies the funnel chart PNG to `--out`.
The tables go to stdout; datatrove's task logs go to stderr (`2>/dev/null` to see only the tables).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from infra.env import DATA_DIR, REPO_ROOT, setup_env

SHARED_WEB = REPO_ROOT.parent / "shared" / "data" / "web"
BUNDLED_WEB = DATA_DIR / "crawl"


def web_files(folder: Path) -> list[Path]:
    """WARC and WET files of a folder; WAT files (metadata only) are left out."""
    return sorted(p for p in folder.glob("*.warc*.gz") if ".wat" not in p.name)


def page_records(path: Path) -> int:
    """Records the data stage reads as pages: WARC `response` and WET `conversion` records."""
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as f:
        return sum(r.rec_type in ("response", "conversion") for r in ArchiveIterator(f))


def documents(folder: Path) -> set[tuple[str, str]]:
    """(input file name, document id) of every document in a folder of JSONL(.gz) outputs."""
    docs = set()
    for path in sorted(folder.rglob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    docs.add((Path(record.get("metadata", {}).get("file_path", "?")).name, str(record.get("id"))))
    return docs


def dropped_by_file(out_dir: Path, filters: list[str]) -> tuple[dict[str, Counter], Counter]:
    """Per filter, documents it dropped per input file; and kept documents per input file.

    A filter's `removed/<step>/` can also hold documents it only trimmed and kept (datatrove's sentence dedup
    writes those there too), so a document counts as dropped by the last filter whose folder holds it, unless it
    is in the final output.
    """
    seen = documents(out_dir / "documents")
    kept = Counter(name for name, _ in seen)
    dropped: dict[str, Counter] = {}
    for step in reversed(filters):
        docs = documents(out_dir / "removed" / step) - seen
        dropped[step] = Counter(name for name, _ in docs)
        seen |= docs
    return dropped, kept


def reasons(c: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.get("dropped_by_reason", {}).items(), key=lambda kv: -kv[1]))


def step_table(steps: dict[str, dict[str, Any]]) -> str:
    """Steps that can drop documents or change them: readers, the extractor, filters and formatters (the writers,
    dedup index steps and the later stages' re-reads pass everything on and are left out)."""
    rows = ["| stage / step | block | in | kept | dropped | reasons |", "|---|---|---:|---:|---:|---|"]
    for key, c in steps.items():
        if c.get("kind") not in ("reader", "extractor", "filter", "formatter") or key.endswith("/read"):
            continue
        why = reasons(c)
        if c.get("removed"):  # sentence dedup also trims the documents it keeps
            cut = c["removed"]
            why += ("; " if why else "") + f"{cut['spans']} duplicate spans cut ({cut['chars']:,} characters)"
        rows.append(f"| `{key}` | {c['block']} | {c['in']} | {c['kept']} | {c['dropped']} | {why} |")
    return "\n".join(rows)


def file_table(files: list[Path], out_dir: Path, filters: list[str]) -> str:
    removed, kept = dropped_by_file(out_dir, filters)
    head = ["file", "page records", "lost before filters", *filters, "kept"]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    totals = Counter()
    for path in files:
        n = page_records(path)
        dropped = [removed[step][path.name] for step in filters]
        lost = n - sum(dropped) - kept[path.name]
        cells = [n, lost, *dropped, kept[path.name]]
        totals.update(dict(enumerate(cells)))
        rows.append(f"| `{path.name}` | " + " | ".join(str(c) for c in cells) + " |")
    rows.append("| **all files** | " + " | ".join(f"**{totals[i]}**" for i in range(len(head) - 1)) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.data_counts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--web", type=Path, help="folder of WARC/WET files (default ../shared/data/web, else data/crawl)")
    ap.add_argument("--out", type=Path, help="where to copy the funnel chart PNG (default: in the temporary folder)")
    ap.add_argument("--md", type=Path, help="also write the markdown tables to this file")
    ap.add_argument("--keep", action="store_true", help="keep the data stage's output folder")
    args = ap.parse_args(argv)
    setup_env()
    from tasks.data import DataConfig, build_corpus, crawl_inputs

    folder = args.web or (SHARED_WEB if SHARED_WEB.is_dir() else BUNDLED_WEB)
    files = web_files(folder)
    if not files:
        raise SystemExit(f"no WARC/WET files in {folder}")
    left_out = sorted(p.name for p in folder.glob("*.wat*"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-counts-"))
    cfg = DataConfig(inputs=[str(p) for p in files], text_sources={})
    print(f"{len(files)} files from {folder}" + (f" (left out, metadata only: {', '.join(left_out)})" if left_out else ""))
    result = build_corpus(cfg, crawl_inputs(cfg), tmp / "data")
    counts = result.counts
    steps = counts["steps"]
    filters = [k.split("/", 1)[1] for k, c in steps.items() if c.get("kind") == "filter"]
    t = counts["totals"]
    md = [
        (f"Inputs: {', '.join(f'`{p.name}`' for p in files)}; no text sources; default filters "
         f"(tasks {cfg.tasks}, workers {cfg.workers}).\n"),
        ("Per step (`run/step`; a step's *in* is what the steps before it let through; writers, dedup index "
         "steps and re-reads, which pass every document on, are left out):\n"),
        step_table(steps) + "\n",
        ("Per input file (*lost before filters*: non-HTML or undecodable records, empty extractions and "
         "extraction timeouts; filter columns: documents that filter dropped):\n"),
        file_table(files, tmp / "data", filters) + "\n",
        (f"Totals: {t['records_in']} page records in, {t['docs_in']} documents read, {t['docs_out']} kept "
         f"({t['chars_out']:,} characters) in {t['seconds']:.0f} s; corrupt files: "
         f"{', '.join(counts['corrupt_files']) or 'none'}."),
    ]
    text = "\n".join(md)
    print("\n" + text)
    png = args.out or tmp / "funnel.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    if result.file("funnel").resolve() != png.resolve():
        shutil.copyfile(result.file("funnel"), png)
    print(f"\nfunnel chart: {png}")
    if args.md:
        args.md.write_text(text + "\n")
    if not args.keep and args.out:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"counts": counts, "funnel": str(png)}


if __name__ == "__main__":
    main()
