"""The plan of the data stage: which datatrove runs, in order, each a list of blocks.

Every run is one executor run (`tasks/data/execute.py`). There is no `depends=` between them: a fastText model
loaded in-process is not picklable. Content runs read what the run before wrote and end in a writer: `filter`
(readers, Trafilatura, filters), then each dedup family's filter run (`exact_dedup`, `minhash_dedup`,
`sentence_dedup`); the last one also masks PII and writes `documents/`. Before each dedup filter, its index runs
write signatures, buckets or clusters only. Each step has a short key, used in the counts (`<run>/<key>`) and as
the folder name of its exclusion writer (`removed/<key>/`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from infra.env import resolve_path
from infra.startup import patch_datatrove_dependency_check
from tasks.data.config import CRAWL_SOURCE, DataConfig
from tasks.data.inputs import crawl_files, deal_files, is_wet, split_root, text_files
from tasks.refs import InputRef

Step = tuple[str, Any]  # (key, datatrove PipelineStep)


@dataclass
class DatatroveRun:
    """One datatrove executor run: its name (the folder of its logs), its blocks and how many tasks share it."""

    name: str
    steps: list[Step]
    tasks: int


# ----------------------------------------------------------------------------------------------------------------
# Content: readers, filters, writers


def content_runs(cfg: DataConfig) -> list[str]:
    """The runs that write documents, in order; each reads what the one before it wrote."""
    dedups = {"exact_dedup": cfg.exact_dedup, "minhash_dedup": cfg.minhash, "sentence_dedup": cfg.sentence_dedup}
    return ["filter", *(name for name, on in dedups.items() if on)]


def output_folder(cfg: DataConfig, out_dir: Path, run: str) -> Path:
    """Where a content run writes: `work/<run>`, the last one `documents/`."""
    return out_dir / "documents" if run == content_runs(cfg)[-1] else out_dir / "work" / run


def read_step(cfg: DataConfig, out_dir: Path, run: str) -> Step:
    """What `run` wrote, read back by the next runs."""
    from datatrove.pipeline.readers import JsonlReader

    return ("read", JsonlReader(str(output_folder(cfg, out_dir, run)), glob_pattern="*.jsonl.gz"))


def write_steps(cfg: DataConfig, out_dir: Path, run: str) -> list[Step]:
    """A content run's end: a writer; the last run masks PII first (after dedup, so masking cannot make duplicates
    look different) and writes the final record format."""
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.writers import JsonlWriter

    from tasks.data.blocks import PhoneNumberFormatter, output_record

    folder = str(output_folder(cfg, out_dir, run))
    if run != content_runs(cfg)[-1]:
        return [("write", JsonlWriter(folder))]
    pii = [("pii", PIIFormatter()), ("phone", PhoneNumberFormatter())] if cfg.pii else []
    return [*pii, ("write", JsonlWriter(folder, adapter=output_record))]


def _by_folder(paths: list[str]) -> list[list[str]]:
    """Paths grouped by the folder a reader opens (a local folder, or a URL's host or bucket)."""
    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(split_root(p)[0], []).append(p)
    return list(groups.values())


def _reader(cls: type, key: str, paths: list[str], source: str, ranks: Mapping[str, int], lists_dir: Path) -> Step:
    """One reader of files under one folder, listed in `<lists_dir>/<key>.txt` relative to it, with the task that
    reads each file."""
    lists_dir.mkdir(parents=True, exist_ok=True)
    listing = lists_dir / f"{key}.txt"
    names = [split_root(p)[1] for p in paths]
    listing.write_text("".join(f"{n}\n" for n in names))
    file_ranks = {n: ranks[p] for n, p in zip(names, paths, strict=True)}
    return key, cls(split_root(paths[0])[0], str(listing), default_metadata={"source": source}, file_ranks=file_ranks)


def reader_steps(cfg: DataConfig, inputs: Mapping[str, InputRef], lists_dir: Path) -> list[Step]:
    """WARC readers + Trafilatura first (the extractor must only see HTML), then WET and JSONL readers.

    datatrove readers pass earlier documents through, so one pipeline holds them all. `deal_files` decides which
    task reads which file, from the sizes the inputs were found with.
    """
    from datatrove.pipeline.extractors import Trafilatura

    from tasks.data.blocks import CrawlReader, TextReader

    ranks = deal_files({ref.path: ref.size or 0 for ref in inputs.values()}, cfg.tasks)
    crawl = crawl_files(inputs)
    steps: list[Step] = []
    warc = _by_folder([p for p in crawl if not is_wet(p)])
    for i, group in enumerate(warc):
        steps.append(_reader(CrawlReader, "read_warc" + (f"_{i}" if i else ""), group, CRAWL_SOURCE, ranks, lists_dir))
    if warc:
        steps.append(("trafilatura", Trafilatura(favour_precision=True, timeout=cfg.extract_timeout_s)))
    for i, group in enumerate(_by_folder([p for p in crawl if is_wet(p)])):
        steps.append(_reader(CrawlReader, "read_wet" + (f"_{i}" if i else ""), group, CRAWL_SOURCE, ranks, lists_dir))
    for i, (source, path) in enumerate(text_files(cfg, inputs).items()):
        steps.append(_reader(TextReader, f"read_text_{i}", [path], source, ranks, lists_dir))
    return steps


def filter_steps(cfg: DataConfig, removed: Path) -> list[Step]:
    """Source sampling, then language ID, Gopher and C4 filters and, when asked, benchmark decontamination, each
    writing what it drops to `removed/<key>/`."""
    from datatrove.pipeline.filters import (
        C4BadWordsFilter,
        C4QualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
    )
    from datatrove.pipeline.writers import JsonlWriter

    from tasks.data.blocks import SourceSampler

    def excluded(key: str) -> JsonlWriter:
        return JsonlWriter(str(removed / key))

    rates = {source: w for source, w in cfg.text_sources.items() if w < 1.0}
    steps: list[Step] = []
    if rates:
        steps.append(("sample", SourceSampler(rates, seed=cfg.seed, exclusion_writer=excluded("sample"))))
    steps.append(("language", LanguageFilter(cfg.languages, cfg.language_threshold, exclusion_writer=excluded("language"))))
    if cfg.gopher_repetition:
        steps.append(("gopher_repetition", GopherRepetitionFilter(exclusion_writer=excluded("gopher_repetition"))))
    if cfg.gopher_quality:
        steps.append(("gopher_quality", GopherQualityFilter(exclusion_writer=excluded("gopher_quality"))))
    if cfg.c4_quality:
        steps.append(("c4_quality", C4QualityFilter(exclusion_writer=excluded("c4_quality"))))
    if cfg.c4_badwords:
        steps.append(("c4_badwords", C4BadWordsFilter(exclusion_writer=excluded("c4_badwords"))))
    if cfg.decontaminate:
        from eval.benchmarks import TASKS, data_file
        from eval.decontam import MIN_WORDS, N_GRAM
        from tasks.data.blocks import BenchmarkDecontFilter

        data_dir = str(resolve_path(cfg.decontaminate_benchmarks))
        missing = [str(data_file(data_dir, t)) for t in TASKS if not data_file(data_dir, t).is_file()]
        if missing:  # before any worker starts
            raise FileNotFoundError(f"decontaminate: benchmark file(s) not found: {', '.join(missing)}")
        steps.append(("decontaminate", BenchmarkDecontFilter(data_dir, list(TASKS), N_GRAM, MIN_WORDS,
                                                              exclusion_writer=excluded("decontaminate"))))
    return steps


# ----------------------------------------------------------------------------------------------------------------
# Dedup: one builder per family, each given the content run it reads


def exact_dedup_runs(cfg: DataConfig, out_dir: Path, previous: str) -> list[DatatroveRun]:
    """Exact dedup (xxhash64 of the whole text): signatures, a 1-task finder, then the filter."""
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.writers import JsonlWriter

    from tasks.data.blocks import document_text

    exact = ExactDedupConfig(content_getter=document_text)
    sigs, dups = out_dir / "work" / "exact_signatures", out_dir / "work" / "exact_duplicates"
    dedup = ExactDedupFilter(str(dups), exact, exclusion_writer=JsonlWriter(str(out_dir / "removed" / "exact_dedup")))
    return [
        DatatroveRun("exact_signatures", [read_step(cfg, out_dir, previous),
                                          ("signature", ExactDedupSignature(str(sigs), exact))], cfg.tasks),
        DatatroveRun("exact_find", [("find", ExactFindDedups(str(sigs), str(dups), exact))], 1),
        DatatroveRun("exact_dedup", [read_step(cfg, out_dir, previous), ("exact_dedup", dedup),
                                     *write_steps(cfg, out_dir, "exact_dedup")], cfg.tasks),
    ]


def minhash_runs(cfg: DataConfig, out_dir: Path, previous: str) -> list[DatatroveRun]:
    """MinHash near-dedup with FineWeb's settings (5-grams, 14 buckets x 8 hashes, 64-bit xxhash): signatures,
    one task per bucket, a 1-task clustering, then the filter."""
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.writers import JsonlWriter

    mh = MinhashConfig()
    work = out_dir / "work"
    sigs, buckets, clusters = work / "minhash_signatures", work / "minhash_buckets", work / "minhash_clusters"
    dedup = MinhashDedupFilter(str(clusters), exclusion_writer=JsonlWriter(str(out_dir / "removed" / "minhash_dedup")))
    return [
        DatatroveRun("minhash_signatures", [read_step(cfg, out_dir, previous),
                                            ("signature", MinhashDedupSignature(str(sigs), config=mh))], cfg.tasks),
        DatatroveRun("minhash_buckets", [("buckets", MinhashDedupBuckets(str(sigs), str(buckets), config=mh))],
                     mh.num_buckets),
        DatatroveRun("minhash_cluster", [("cluster", MinhashDedupCluster(str(buckets), str(clusters), config=mh))], 1),
        DatatroveRun("minhash_dedup", [read_step(cfg, out_dir, previous), ("minhash_dedup", dedup),
                                       *write_steps(cfg, out_dir, "minhash_dedup")], cfg.tasks),
    ]


def sentence_dedup_runs(cfg: DataConfig, out_dir: Path, previous: str) -> list[DatatroveRun]:
    """C4's span dedup: spans of 3 sentences. Signatures and the filter number documents by their position in the
    task's input, so both read the same files with the same task count. The finder sees every signature (1 task)
    and keeps one occurrence of each span (in the lowest document index, then task); the others are cut.
    `removed/sentence_dedup/` holds every document it changed, the cut spans marked >>> <<<."""
    from datatrove.pipeline.dedup.sentence_dedup import SentDedupConfig, SentenceDedupSignature, SentenceFindDedups
    from datatrove.pipeline.writers import JsonlWriter

    from tasks.data.blocks import SpanDedupFilter

    sd = SentDedupConfig(n_sentences=3)
    sigs, dups = out_dir / "work" / "sentence_signatures", out_dir / "work" / "sentence_duplicates"
    removed = JsonlWriter(str(out_dir / "removed" / "sentence_dedup"))
    return [
        DatatroveRun("sentence_signatures", [read_step(cfg, out_dir, previous),
                                             ("signature", SentenceDedupSignature(str(sigs), config=sd))], cfg.tasks),
        DatatroveRun("sentence_find", [("find", SentenceFindDedups(str(sigs), str(dups), config=sd))], 1),
        DatatroveRun("sentence_dedup", [read_step(cfg, out_dir, previous),
                                        ("sentence_dedup", SpanDedupFilter(str(dups), config=sd, exclusion_writer=removed)),
                                        *write_steps(cfg, out_dir, "sentence_dedup")], cfg.tasks),
    ]


DEDUP_RUNS = {"exact_dedup": exact_dedup_runs, "minhash_dedup": minhash_runs, "sentence_dedup": sentence_dedup_runs}


def plan_runs(cfg: DataConfig, inputs: Mapping[str, InputRef], out_dir: Path) -> list[DatatroveRun]:
    """The datatrove runs of the stage, in order, reading `inputs` (from `crawl_inputs`) and writing into `out_dir`
    (the readers' file lists go to `logs/inputs/` now; everything else when the runs run)."""
    patch_datatrove_dependency_check()  # before any block is built: each checks its dependencies as it is made
    filtering = [*reader_steps(cfg, inputs, out_dir / "logs" / "inputs"), *filter_steps(cfg, out_dir / "removed")]
    runs = [DatatroveRun("filter", [*filtering, *write_steps(cfg, out_dir, "filter")], cfg.tasks)]
    for previous, name in pairwise(content_runs(cfg)):
        runs += DEDUP_RUNS[name](cfg, out_dir, previous)
    return runs
