"""Data stage: raw Common Crawl WARC/WET (plus clean JSONL text sources) in, clean English documents out.

In:   `DataConfig.inputs` (WARC files: HTML extracted with Trafilatura; WET files: text used as is; local paths,
      fsspec URLs or Common Crawl `*.paths.gz` listings, see `tasks/data_inputs.py`) and
      `DataConfig.text_sources` (JSONL files with a "text" field, mixed in with a sampling weight).
Out:  `<out_dir>/documents/*.jsonl.gz` (JSONL: text, id, metadata {source, url, file_path, language,
      language_score}; datatrove's JsonlReader and `datasets.load_dataset("json", ...)` read it), `<out_dir>/removed/<step>/` (what each filter dropped, for audit), `<out_dir>/logs/<stage>/`
      (datatrove logs, per-task stats and completion markers) and `<out_dir>/summary.json` (the returned counts).
Steps, all datatrove blocks: read -> Trafilatura (WARC only) -> [source sampling] -> fastText language ID ->
      Gopher repetition -> Gopher quality -> C4 quality -> C4 bad words -> exact dedup -> MinHash dedup ->
      C4 three-sentence span dedup -> PII masking.
      Each stage is its own executor run (no `depends=`: a fastText model loaded in-process is not picklable):
      `LocalPipelineExecutor`, or `RayPipelineExecutor` when `RAY_ADDRESS` is set (`DataConfig.executor`). A rerun
      skips the tasks a previous run completed.
Run alone: `.venv/bin/python -m tasks.data [OUT_DIR]`. Workers start through a forkserver, so a script that calls
`build_corpus` needs the usual `if __name__ == "__main__":` guard (without it every worker re-runs the script).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from infra.env import DATA_DIR, runs_dir, setup_env
from tasks.data_inputs import (
    COMMON_CRAWL_BASE,
    check_inputs,
    deal_files,
    expand_inputs,
    is_listing,
    is_wet,
    resolve_path,
    split_root,
)
from tasks.data_report import funnel_chart, write_samples
from tasks.stage import is_url, prefetch_info, remote_lookups, run_stage

log = logging.getLogger(__name__)

BUNDLED_CRAWL = [
    "data/crawl/CC-MAIN-2020-34_resiliparse-warcfile.warc.gz",
    "data/crawl/CC-MAIN-2016-50_sparkwarc-sample.warc.wet.gz",
    "data/crawl/CC-MAIN-2024-22_whirlwind.warc.gz",
    "data/crawl/CC-MAIN-2024-22_whirlwind.warc.wet.gz",
]
# 2.5 MB Internet Archive WARC (HTML mixed with images, PDFs, dns records): a volume and robustness input. Not a
# default: it costs ~11 CPU-s, mostly Trafilatura (multi-MB forum pages hit the 1 s limit), for ~10 English documents;
# with it the default run took 45-70 s wall on our shared 2-core machine (29-44 s without), over the ~60 s budget.
ARCHIVE_ORG_CRAWL = "data/crawl/IA-2008_archive-org-crawl_aut-example.warc.gz"
CRAWL_SOURCE = "crawl"  # metadata["source"] of every crawl document; text sources use their configured path
ASSETS_DIR = DATA_DIR / "assets"


# ----------------------------------------------------------------------------------------------------------------
# Config


class DataConfig(BaseModel):
    """Data stage config. Defaults follow the papers the filters come from (Gopher, C4, FineWeb)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: list[str] = Field(
        default_factory=lambda: list(BUNDLED_CRAWL),
        description="Crawl files, WARC (HTML responses, extracted with Trafilatura) or WET (files named *.wet*, "
        "plain text used as is); repo-relative paths, absolute paths or fsspec URLs (https://, s3://, ...). An entry "
        "ending in .paths.gz or .paths is a Common Crawl listing (one path per line, relative to paths_base), "
        "expanded before anything else runs. WAT files (metadata only) are refused. Default: the bundled "
        "Common Crawl samples in data/crawl/ (the larger Internet Archive WARC there is left out for speed).",
    )
    paths_base: str = Field(
        COMMON_CRAWL_BASE,
        description="Where the relative paths of a .paths.gz listing live: Common Crawl's HTTPS endpoint by "
        "default; s3://commoncrawl/ from AWS (needs the s3fs package, which our pinned install leaves out), or a "
        "local mirror folder.",
    )
    max_files: int | None = Field(
        None,
        ge=1,
        description="Use only the first N files of each listing, in listing order (a crawl listing names tens of "
        "thousands of ~1 GB files); None uses them all. Plain file inputs are not limited.",
    )
    text_sources: dict[str, float] = Field(
        default_factory=lambda: {"data/text/c4_demo.jsonl.gz": 1.0},
        description="Clean JSONL text sources (a 'text' field per line) mixed in, with the fraction of each "
        "source's documents to sample in (0, 1]; the crawl is always used in full. The realised mix (documents "
        "and characters per source after filtering) is reported in the summary. Default: 300 C4 documents, "
        "because the sample crawl yields little English.",
    )
    languages: list[str] = Field(
        default_factory=lambda: ["en"],
        description="fastText lid.176 language codes to keep. English only, as in C4 and FineWeb.",
    )
    language_threshold: float = Field(
        0.65,
        ge=0.0,
        le=1.0,
        description="Minimum fastText score of a kept language. 0.65 is FineWeb's value (C4 used langdetect at "
        "0.99, a different model and scale).",
    )
    extract_timeout_s: float = Field(
        1.0,
        gt=0.0,
        description="Per-page Trafilatura time limit in seconds (datatrove's and FineWeb's default).",
    )
    gopher_repetition: bool = Field(
        True,
        description="Gopher repetition filter (Rae et al. 2021, table A1): duplicate line/paragraph fractions "
        "0.3/0.3 (by characters 0.2/0.2), top 2-4-gram and duplicate 5-10-gram character shares.",
    )
    gopher_quality: bool = Field(
        True,
        description="Gopher quality filter: 50-100k words, mean word length 3-10, symbol/word <= 0.1, "
        "<= 90% bullet lines, <= 30% ellipsis lines, >= 80% words with a letter, >= 2 stop words.",
    )
    c4_quality: bool = Field(
        True,
        description="C4 line and page rules (Raffel et al. 2020, TFDS c4_utils): keep lines ending in terminal "
        "punctuation (not '...') with >= 3 words, drop lines mentioning javascript or cookie/terms policies and "
        "lines with a word > 1000 chars, strip [1]/[edit] citations, drop pages with 'lorem ipsum' or '{' or fewer "
        "than 5 sentences. One deviation in datatrove: a closing single quote also counts as terminal.",
    )
    c4_badwords: bool = Field(
        True,
        description="C4 bad-words page filter with the LDNOOBW English list at the commit C4 pinned (bundled "
        "in data/assets/ldnoobw/en).",
    )
    pii: bool = Field(
        True,
        description="Mask emails and public IPv4/IPv6 addresses (datatrove PIIFormatter, as in FineWeb) and phone "
        "numbers (our PhoneNumberFormatter). Applied last, after dedup, so masking cannot hide duplicates.",
    )
    exact_dedup: bool = Field(
        True,
        description="Drop documents whose whole text hashes (xxhash64) like an earlier one (datatrove exact "
        "dedup, 3 stages).",
    )
    minhash: bool = Field(
        True,
        description="MinHash near-duplicate removal with FineWeb's settings: word 5-grams, 14 buckets x 8 hashes "
        "(pairs at 0.75 / 0.8 Jaccard similarity are caught with probability ~0.77 / ~0.92); datatrove's 4 stages.",
    )
    sentence_dedup: bool = Field(
        True,
        description="C4's span dedup (Raffel et al. 2020, sec. 2.2): 'we discarded all but one of any three-sentence "
        "span occurring more than once in the data set'. datatrove's 3 sentence-dedup stages (spaCy sentencizer, no "
        "download), after exact/MinHash dedup and before PII masking; a document left with < 50 words or < 3 "
        "sentences is dropped as too_short_after_span_dedup (datatrove's defaults).",
    )
    seed: int = Field(0, description="Seed of the per-source sampling draw (a hash of seed and document id).")
    tasks: int = Field(2, ge=1, description="datatrove tasks (shards) per stage; files are sharded across tasks.")
    workers: int = Field(2, ge=1, description="Tasks run at once (processes); 2 for a 2-core machine.")
    executor: Literal["auto", "local", "ray"] = Field(
        "auto",
        description="'local': datatrove's LocalPipelineExecutor (processes on this machine). 'ray': its "
        "RayPipelineExecutor on the Ray cluster at RAY_ADDRESS, else on a local Ray started for the run (the output "
        "folder must then be on storage every node shares). 'auto': ray when RAY_ADDRESS is set, else local.",
    )

    @field_validator("text_sources")
    @classmethod
    def _check_weights(cls, v: dict[str, float]) -> dict[str, float]:
        for path, weight in v.items():
            if not 0.0 < weight <= 1.0:
                raise ValueError(f"text source {path!r}: weight must be in (0, 1], got {weight}")
        return v

    @model_validator(mode="after")
    def _check_languages_and_inputs(self) -> DataConfig:
        paths = [*self.inputs, *self.text_sources]
        if len(set(paths)) != len(paths):
            raise ValueError(f"an input is listed twice: {sorted(p for p in set(paths) if paths.count(p) > 1)}")
        if not self.languages:
            raise ValueError("languages must name at least one language")
        if self.c4_badwords and set(self.languages) != {"en"}:
            raise ValueError(
                f"c4_badwords ships only the English list (data/assets/ldnoobw/en) and would download the others; "
                f"set c4_badwords=False for languages={self.languages}"
            )
        return self

    def fingerprint(self) -> str:
        """Short hash of the config, for output folders keyed by config."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------------
# Offline assets


def seed_offline_assets(assets_dir: Path = ASSETS_DIR) -> list[Path]:
    """Put the bundled fastText LID model and LDNOOBW list where datatrove looks before downloading.

    datatrove's `cached_asset_path_or_download` skips the download when `<assets cache>/<url with / -> _>` and its
    `.completed` marker exist. The cache folder is computed in each worker from the environment, so we seed both
    the folder huggingface_hub resolved at import and the one the current environment gives (they differ only when
    HF_HOME changed after import). The lid.176 URL names the .bin model; fastText loads the bundled .ftz the same way.
    """
    from datatrove.pipeline.filters.c4_filters import _EN_BADWORDS_URL
    from datatrove.utils.lid import FT176LID
    from fsspec.core import strip_protocol
    from huggingface_hub import cached_assets_path

    env_assets = os.environ.get("HF_ASSETS_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "assets"
    )
    seeded = []
    for src, url, namespace, subfolder in [
        (assets_dir / "lid.176.ftz", FT176LID.MODEL_URL, "lid", FT176LID.MODEL_SUBFOLDER),
        (assets_dir / "ldnoobw" / "en", _EN_BADWORDS_URL, "filters", "c4_badwords"),
    ]:
        if not src.is_file():
            raise FileNotFoundError(f"bundled asset missing: {src}")
        folders = {
            Path(cached_assets_path(library_name="datatrove", namespace=namespace, subfolder=subfolder)),
            Path(
                cached_assets_path(
                    library_name="datatrove", namespace=namespace, subfolder=subfolder, assets_dir=env_assets
                )
            ),
        }
        for folder in folders:
            dst = folder / strip_protocol(url).replace("/", "_")
            if not (dst.is_file() and Path(f"{dst}.completed").exists() and dst.stat().st_size == src.stat().st_size):
                shutil.copyfile(src, dst)
                Path(f"{dst}.completed").touch()
            seeded.append(dst)
    return seeded


# ----------------------------------------------------------------------------------------------------------------
# Pipeline construction: one Stage per LocalPipelineExecutor run; each step has a short key used in the counts
# and as the folder name of its exclusion writer.


@dataclass
class Stage:
    name: str
    steps: list[tuple[str, Any]]  # (key, datatrove PipelineStep)
    tasks: int


def _reader_steps(cfg: DataConfig, lists_dir: Path) -> list[tuple[str, Any]]:
    """WARC readers + Trafilatura first (the extractor must only see HTML), then WET and JSONL readers.

    datatrove readers pass earlier documents through, so one pipeline holds them all. A reader reads one folder
    (a local folder, or a URL's host or bucket), so files are grouped by it and listed in a paths file relative to
    it; `deal_files` decides which task reads which file.
    """
    from datatrove.pipeline.extractors import Trafilatura

    from tasks.data_blocks import CrawlReader, TextReader

    ranks = deal_files([*cfg.inputs, *cfg.text_sources], cfg.tasks)

    def reader(cls: type, key: str, paths: list[str], source: str) -> tuple[str, Any]:
        lists_dir.mkdir(parents=True, exist_ok=True)
        listing = lists_dir / f"{key}.txt"
        names = [split_root(p)[1] for p in paths]
        listing.write_text("".join(f"{n}\n" for n in names))
        folder = split_root(paths[0])[0]
        file_ranks = {n: ranks[p] for n, p in zip(names, paths, strict=True)}
        return key, cls(folder, str(listing), default_metadata={"source": source}, file_ranks=file_ranks)

    def by_folder(paths: list[str]) -> list[list[str]]:
        groups: dict[str, list[str]] = {}
        for p in paths:
            groups.setdefault(split_root(p)[0], []).append(p)
        return list(groups.values())

    steps: list[tuple[str, Any]] = []
    warc = by_folder([p for p in cfg.inputs if not is_wet(p)])
    for i, group in enumerate(warc):
        steps.append(reader(CrawlReader, "read_warc" + (f"_{i}" if i else ""), group, CRAWL_SOURCE))
    if warc:
        steps.append(("trafilatura", Trafilatura(favour_precision=True, timeout=cfg.extract_timeout_s)))
    for i, group in enumerate(by_folder([p for p in cfg.inputs if is_wet(p)])):
        steps.append(reader(CrawlReader, "read_wet" + (f"_{i}" if i else ""), group, CRAWL_SOURCE))
    for i, source in enumerate(cfg.text_sources):
        steps.append(reader(TextReader, f"read_text_{i}", [source], source))
    return steps


def _filter_steps(cfg: DataConfig, removed: Path) -> list[tuple[str, Any]]:
    from datatrove.pipeline.filters import (
        C4BadWordsFilter,
        C4QualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
    )
    from datatrove.pipeline.writers import JsonlWriter

    from tasks.data_blocks import SourceSampler

    def excluded(key: str) -> JsonlWriter:
        return JsonlWriter(str(removed / key))

    rates = {source: w for source, w in cfg.text_sources.items() if w < 1.0}
    steps: list[tuple[str, Any]] = []
    if rates:
        steps.append(("sample", SourceSampler(rates, seed=cfg.seed, exclusion_writer=excluded("sample"))))
    steps.append(
        (
            "language",
            LanguageFilter(cfg.languages, cfg.language_threshold, exclusion_writer=excluded("language")),
        )
    )
    if cfg.gopher_repetition:
        steps.append(("gopher_repetition", GopherRepetitionFilter(exclusion_writer=excluded("gopher_repetition"))))
    if cfg.gopher_quality:
        steps.append(("gopher_quality", GopherQualityFilter(exclusion_writer=excluded("gopher_quality"))))
    if cfg.c4_quality:
        steps.append(("c4_quality", C4QualityFilter(exclusion_writer=excluded("c4_quality"))))
    if cfg.c4_badwords:
        steps.append(("c4_badwords", C4BadWordsFilter(exclusion_writer=excluded("c4_badwords"))))
    return steps


def _pii_steps() -> list[tuple[str, Any]]:
    from datatrove.pipeline.formatters import PIIFormatter

    from tasks.data_blocks import PhoneNumberFormatter

    return [("pii", PIIFormatter()), ("phone", PhoneNumberFormatter())]


def plan_stages(cfg: DataConfig, out_dir: Path) -> list[Stage]:
    """The stages to run, in order. Content stages end in a writer; dedup index stages write signatures only."""
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.dedup.sentence_dedup import SentDedupConfig, SentenceDedupSignature, SentenceFindDedups
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    # Before any block is built: importing tasks.data_blocks makes datatrove's dependency checks cheap.
    from tasks.data_blocks import SpanDedupFilter, document_text, output_record

    work, removed = out_dir / "work", out_dir / "removed"
    content = ["filter"] + ["exact_dedup"] * cfg.exact_dedup + ["minhash_dedup"] * cfg.minhash
    content += ["sentence_dedup"] * cfg.sentence_dedup
    output = {name: work / name for name in content[:-1]} | {content[-1]: out_dir / "documents"}

    def finish(name: str) -> list[tuple[str, Any]]:
        if name != content[-1]:
            return [("write", JsonlWriter(str(output[name])))]
        pii = _pii_steps() if cfg.pii else []  # last, so masking cannot make duplicates look different
        return [*pii, ("write", JsonlWriter(str(output[name]), adapter=output_record))]

    def read(name: str) -> tuple[str, Any]:
        return ("read", JsonlReader(str(output[name]), glob_pattern="*.jsonl.gz"))

    stages = [
        Stage(
            "filter",
            [*_reader_steps(cfg, out_dir / "logs" / "inputs"), *_filter_steps(cfg, removed), *finish("filter")],
            cfg.tasks,
        )
    ]
    previous = "filter"
    if cfg.exact_dedup:
        exact = ExactDedupConfig(content_getter=document_text)
        sigs, dups = work / "exact_signatures", work / "exact_duplicates"
        stages += [
            Stage(
                "exact_signatures", [read(previous), ("signature", ExactDedupSignature(str(sigs), exact))], cfg.tasks
            ),
            Stage("exact_find", [("find", ExactFindDedups(str(sigs), str(dups), exact))], 1),
            Stage(
                "exact_dedup",
                [
                    read(previous),
                    (
                        "exact_dedup",
                        ExactDedupFilter(str(dups), exact, exclusion_writer=JsonlWriter(str(removed / "exact_dedup"))),
                    ),
                    *finish("exact_dedup"),
                ],
                cfg.tasks,
            ),
        ]
        previous = "exact_dedup"
    if cfg.minhash:
        mh = MinhashConfig()  # FineWeb: 5-grams, 14 buckets x 8 hashes, 64-bit xxhash
        sigs, buckets, clusters = work / "minhash_signatures", work / "minhash_buckets", work / "minhash_clusters"
        stages += [
            Stage(
                "minhash_signatures",
                [read(previous), ("signature", MinhashDedupSignature(str(sigs), config=mh))],
                cfg.tasks,
            ),
            Stage(
                "minhash_buckets",
                [("buckets", MinhashDedupBuckets(str(sigs), str(buckets), config=mh))],
                mh.num_buckets,
            ),
            Stage("minhash_cluster", [("cluster", MinhashDedupCluster(str(buckets), str(clusters), config=mh))], 1),
            Stage(
                "minhash_dedup",
                [
                    read(previous),
                    (
                        "minhash_dedup",
                        MinhashDedupFilter(str(clusters), exclusion_writer=JsonlWriter(str(removed / "minhash_dedup"))),
                    ),
                    *finish("minhash_dedup"),
                ],
                cfg.tasks,
            ),
        ]
        previous = "minhash_dedup"
    if cfg.sentence_dedup:
        # C4: spans of 3 sentences. Signatures and the filter number documents by their position in the task's
        # input, so both stages read the same files with the same task count. The finder sees every signature
        # (1 task) and keeps one occurrence of each span (in the lowest document index, then task); the others are
        # cut. removed/sentence_dedup/ holds every document it changed, the cut spans marked >>> <<<.
        sd = SentDedupConfig(n_sentences=3)
        sigs, dups = work / "sentence_signatures", work / "sentence_duplicates"
        stages += [
            Stage(
                "sentence_signatures",
                [read(previous), ("signature", SentenceDedupSignature(str(sigs), config=sd))],
                cfg.tasks,
            ),
            Stage("sentence_find", [("find", SentenceFindDedups(str(sigs), str(dups), config=sd))], 1),
            Stage(
                "sentence_dedup",
                [
                    read(previous),
                    (
                        "sentence_dedup",
                        SpanDedupFilter(
                            str(dups), config=sd, exclusion_writer=JsonlWriter(str(removed / "sentence_dedup"))
                        ),
                    ),
                    *finish("sentence_dedup"),
                ],
                cfg.tasks,
            ),
        ]
    return stages


# Imported once by the forkserver, so every worker of every stage starts with them loaded. `import spacy` alone
# takes 4-10 s here (thinc imports torch); without this each worker of each stage pays it again.
FORKSERVER_PRELOAD = [
    "spacy",
    "spacy.lang.en",
    "trafilatura",
    "fasttext",
    "datatrove.pipeline.readers",
    "datatrove.pipeline.extractors",
    "datatrove.pipeline.filters",
    "datatrove.pipeline.formatters",
    "datatrove.pipeline.dedup",
    "datatrove.pipeline.writers",
    "tasks.data_blocks",
]


def start_forkserver() -> None:
    """Start the forkserver that local workers fork from, which imports `FORKSERVER_PRELOAD` once; idempotent.

    `execute_stage` calls it; the CLI calls it earlier, so that the preload runs while Prefect's server starts.
    """
    import multiprocess
    from multiprocess import forkserver

    # Only takes effect before this process's forkserver starts; a later call reuses the running server.
    multiprocess.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    forkserver.ensure_running()


def warm_up(cfg: DataConfig) -> None:
    """The stage's start-up that needs neither Prefect nor MLflow, for the CLI to do while its Prefect server
    starts: the local workers' forkserver (which imports their modules once), the offline assets, the funnel
    chart's matplotlib, and a dry run of `plan_stages` into a throwaway folder, which imports the blocks and fills
    datatrove's caches (its dependency checks read every installed package's metadata: ~1.6 s here). The dry run
    is skipped unless every input is a local file: planning sizes the inputs, and remote ones cost requests;
    problems with inputs are `build_corpus`'s to report."""
    import tempfile

    import matplotlib

    if not uses_ray(cfg):
        start_forkserver()
    seed_offline_assets()
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    paths = [*cfg.inputs, *cfg.text_sources]
    if all(not is_url(p) and not is_listing(p) and Path(resolve_path(p)).is_file() for p in paths):
        with tempfile.TemporaryDirectory(prefix="gptflow-plan-") as tmp:
            plan_stages(cfg, Path(tmp))


def execute_stage(stage: Stage, logging_dir: Path, workers: int) -> None:
    from datatrove.executor import LocalPipelineExecutor

    start_forkserver()

    executor = LocalPipelineExecutor(
        pipeline=[step for _, step in stage.steps],
        tasks=stage.tasks,
        workers=min(workers, stage.tasks),
        logging_dir=str(logging_dir),
        skip_completed=True,  # a rerun skips the tasks a finished run completed
        start_method="forkserver",
    )
    executor.run()


def execute_stage_on_ray(stage: Stage, logging_dir: Path, workers: int) -> None:
    """The same stage on datatrove's RayPipelineExecutor, in the Ray that `build_corpus` joined or started.

    Each task runs in a Ray actor (1 CPU) that forks one process for it. Workers find the fastText and LDNOOBW
    assets that `seed_offline_assets` put under HF_HOME (`infra.ray_cluster.ray_init` passes HF_HOME and the
    offline switches to them), and write stats and completion markers into `logging_dir`, where `stage_counts`
    reads them; on a multi-node cluster it must be on storage every node shares.
    """
    from datatrove.executor.ray import RayPipelineExecutor

    executor = RayPipelineExecutor(
        pipeline=[step for _, step in stage.steps],
        tasks=stage.tasks,
        workers=min(workers, stage.tasks),
        logging_dir=str(logging_dir),
        skip_completed=True,
        cpus_per_task=1,
        mem_per_cpu_gb=1,  # a Ray resource reservation, not a limit; our tasks stay well under 1 GB
    )
    executor.run()
    # datatrove's Ray executor logs a failed task and returns; fail here, as the local executor does.
    failed = executor.get_incomplete_ranks(skip_completed=True)
    if failed:
        raise RuntimeError(f"data stage {stage.name}: tasks {failed} did not finish on Ray; see {logging_dir}/logs")


def uses_ray(cfg: DataConfig) -> bool:
    return cfg.executor == "ray" or (cfg.executor == "auto" and bool(os.environ.get("RAY_ADDRESS")))


# ----------------------------------------------------------------------------------------------------------------
# Counts from datatrove's per-task stats files, with the in = kept + dropped invariant checked at every step.


class DataInvariantError(RuntimeError):
    """The per-step document counts do not add up."""


# Drop reasons for filters that drop without naming one.
_DEFAULT_REASONS = {
    "language": "language_not_kept_or_low_score",
    "exact_dedup": "exact_duplicate",
    "minhash_dedup": "near_duplicate",
}
_EXTRACTOR_DROPS = {
    "dropped": "empty_extraction",
    "timeout": "timeout",
    "clean_error": "clean_error",
    "broken_process": "broken_process",
}


def read_stage_stats(logging_dir: Path, n_steps: int) -> list[Any]:
    """Merge `stats/<rank>.json` of every task (also those completed by an earlier run) into one Stats per step."""
    from datatrove.utils.stats import PipelineStats

    files = sorted((logging_dir / "stats").glob("*.json"))
    if not files:
        raise DataInvariantError(f"no datatrove stats in {logging_dir / 'stats'}; did the stage run?")
    merged = sum((PipelineStats.from_json(json.loads(f.read_text())) for f in files), start=PipelineStats())
    if len(merged.stats) != n_steps:
        raise DataInvariantError(f"{logging_dir}: {len(merged.stats)} step stats for {n_steps} steps")
    return merged.stats


def _metric_total(metric: Any) -> float:
    # Stats loaded from one file keep datatrove's compact JSON form (a number, or a dict with "total"); merged
    # stats hold MetricStats objects.
    if isinstance(metric, dict):
        return metric.get("total", 0)
    return getattr(metric, "total", metric)


def _total(stats: Any, key: str) -> int:
    return int(_metric_total(stats.stats.get(key, 0)))


def step_counts(key: str, step: Any, stats: Any) -> dict[str, Any]:
    """in / kept / dropped (by reason) of one step, from its merged datatrove stats."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter
    from datatrove.pipeline.dedup.minhash import MinhashDedupFilter
    from datatrove.pipeline.dedup.sentence_dedup import SentenceDedupFilter
    from datatrove.pipeline.extractors.base import BaseExtractor
    from datatrove.pipeline.filters.base_filter import BaseFilter
    from datatrove.pipeline.formatters.base import BaseFormatter
    from datatrove.pipeline.readers.base import BaseReader
    from datatrove.pipeline.writers.disk_base import DiskWriter

    totals = {k: _metric_total(v) for k, v in stats.stats.items() if "XXXXX" not in k}  # skip writer file templates
    raw = {k: int(v) if float(v).is_integer() else round(v, 3) for k, v in totals.items()}
    counts: dict[str, Any] = {"block": step.name, "seconds": round(stats.time_stats.total, 3)}
    reasons: dict[str, int] = {}
    if isinstance(step, BaseReader):
        kind, kept = "reader", _total(stats, "documents")
        n_in = _total(stats, "records") if "records" in stats.stats else kept  # datatrove's own readers count docs only
        reasons = {k.removeprefix("dropped_"): v for k, v in raw.items() if k.startswith("dropped_")}
        counts["corrupt_files"] = sorted(k.split(":", 1)[1] for k in raw if k.startswith("corrupt_file:"))
    elif isinstance(step, BaseExtractor):
        kind, n_in, kept = "extractor", _total(stats, "total"), _total(stats, "forwarded")
        reasons = {reason: _total(stats, k) for k, reason in _EXTRACTOR_DROPS.items() if _total(stats, k)}
    elif isinstance(step, (BaseFilter, ExactDedupFilter, MinhashDedupFilter, SentenceDedupFilter)):
        kind, n_in, kept = "filter", _total(stats, "total"), _total(stats, "forwarded")
        reasons = {k.removeprefix("dropped_"): v for k, v in raw.items() if k.startswith("dropped_")}
        unnamed = _total(stats, "dropped") - sum(reasons.values())
        if unnamed:
            reasons[_DEFAULT_REASONS.get(key, "unspecified")] = unnamed
        if isinstance(step, SentenceDedupFilter):  # what span dedup cut from the documents it kept or dropped
            counts["removed"] = {
                "spans": _total(stats, "duplicate_spans"),
                "sentences": _total(stats, "removed_sentences"),
                "chars": _total(stats, "removed_chars"),
            }
    elif isinstance(step, (BaseFormatter, DiskWriter)):
        kind = "formatter" if isinstance(step, BaseFormatter) else "writer"
        n_in = kept = _total(stats, "total")
    elif "total" in stats.stats:  # dedup signature steps: every document is hashed into the index; none go further
        kind, n_in, kept = "index", _total(stats, "total"), _total(stats, "total")
    else:  # bucket / cluster steps work on signatures, not documents
        return counts | {"kind": "dedup", "stats": raw}
    dropped = sum(reasons.values())
    if n_in != kept + dropped:
        raise DataInvariantError(f"step {key} ({step.name}): in={n_in} != kept={kept} + dropped={dropped} {reasons}")
    return counts | {
        "kind": kind,
        "in": n_in,
        "kept": kept,
        "dropped": dropped,
        "dropped_by_reason": reasons,
        "stats": raw,
    }


def stage_counts(stage: Stage, logging_dir: Path) -> dict[str, dict[str, Any]]:
    """Counts per step, checking that each step's input is what the steps before it let through."""
    merged = read_stage_stats(logging_dir, len(stage.steps))
    counts, flowing = {}, 0
    for (key, step), stats in zip(stage.steps, merged, strict=True):
        c = step_counts(key, step, stats)
        if c["kind"] == "reader":
            flowing += c["kept"]  # readers pass earlier documents through and add their own
        elif "in" in c:
            if c["in"] != flowing:
                raise DataInvariantError(
                    f"stage {stage.name}, step {key}: in={c['in']} but {flowing} documents reached it"
                )
            flowing = c["kept"] if c["kind"] != "index" else 0
        counts[key] = c
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Core


def iter_documents(out_dir: Path) -> Iterator[str]:
    """Yield the kept texts of a finished `build_corpus` run (the tokenizer stage consumes this)."""
    for record in iter_records(Path(out_dir) / "documents"):
        yield record["text"]


def iter_records(folder: Path) -> Iterator[dict]:
    """The JSON records of a folder of `*.jsonl.gz` shards (kept documents, or one filter's removals), in file order."""
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def _mix(cfg: DataConfig, documents: Path) -> dict[str, dict[str, float]]:
    """Realised proportions of the output per source, in documents and characters."""
    weights = {CRAWL_SOURCE: 1.0} | dict(cfg.text_sources)
    mix = {source: {"weight": w, "docs": 0, "chars": 0} for source, w in weights.items()}
    for record in iter_records(documents):
        source = record.get("metadata", {}).get("source", "unknown")
        entry = mix.setdefault(source, {"weight": 0.0, "docs": 0, "chars": 0})
        entry["docs"] += 1
        entry["chars"] += len(record["text"])
    n_docs = sum(m["docs"] for m in mix.values()) or 1
    n_chars = sum(m["chars"] for m in mix.values()) or 1
    for m in mix.values():
        m["doc_share"] = round(m["docs"] / n_docs, 4)
        m["char_share"] = round(m["chars"] / n_chars, 4)
    return mix


def input_locations(cfg: DataConfig) -> dict[str, str]:
    """Named inputs for `tasks.stage.run_stage`, which hashes them into the stage key: listings expanded to the
    files they name, local paths resolved, URLs kept as URLs (hashed from their size, ETag or Last-Modified)."""
    files = expand_inputs(cfg.inputs, cfg.paths_base, cfg.max_files)
    inputs = {f"input_{i}": resolve_path(p) for i, p in enumerate(files)}
    return inputs | {f"text_{i}": resolve_path(p) for i, p in enumerate(cfg.text_sources)}


PROGRESS_EVERY_S = 30.0


@contextmanager
def stage_progress(stage: Stage, logging_dir: Path) -> Iterator[None]:
    """While a stage runs, log every `PROGRESS_EVERY_S` seconds how many of its tasks are done, from the completion
    markers datatrove writes (`<logging_dir>/completions/<rank>`); stages that finish sooner say nothing."""
    every_s, stop, start = PROGRESS_EVERY_S, threading.Event(), time.perf_counter()

    def report() -> None:
        while not stop.wait(every_s):
            folder = logging_dir / "completions"
            done = len(list(folder.iterdir())) if folder.is_dir() else 0
            log.info("data stage %s: %d/%d tasks done after %.0f s", stage.name, done, stage.tasks,
                     time.perf_counter() - start)

    thread = threading.Thread(target=report, name=f"progress-{stage.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_stages(
    stages: list[Stage], out_dir: Path, workers: int, on_ray: bool = False
) -> tuple[dict[str, dict[str, Any]], int | None, list[str]]:
    """Run and count the stages in order. Returns the step counts, the documents the last content stage wrote and
    the stages skipped because an earlier one left no documents."""
    from infra.ray_cluster import ray_session

    execute = execute_stage_on_ray if on_ray else execute_stage
    steps: dict[str, dict[str, Any]] = {}
    written, skipped = None, []
    with ray_session(num_cpus=workers) if on_ray else nullcontext():  # a Ray started here is shut down after
        for stage in stages:
            if written == 0:  # every document was dropped: later stages would find no files to read
                skipped.append(stage.name)
                continue
            logging_dir = out_dir / "logs" / stage.name
            t = time.perf_counter()
            with stage_progress(stage, logging_dir):
                execute(stage, logging_dir, workers)
            steps |= {f"{stage.name}/{key}": c for key, c in stage_counts(stage, logging_dir).items()}
            keys = [key for key, _ in stage.steps]
            if keys[0] == "read" and steps[f"{stage.name}/read"]["kept"] != written:
                read = steps[f"{stage.name}/read"]["kept"]
                raise DataInvariantError(f"stage {stage.name} read {read} documents; the stage before wrote {written}")
            if "write" in keys:
                written = steps[f"{stage.name}/write"]["kept"]
            log.info("data stage %s done in %.1fs", stage.name, time.perf_counter() - t)
    return steps, written, skipped


@remote_lookups()
def data_stage(cfg: DataConfig, root: Path) -> dict[str, Any]:
    """The data stage as its flow runs it (`tasks.stage.run_stage`): its key from the config and what the inputs
    hold, then `build_corpus` into `<root>/data/<key>` unless a finished folder has that key. A remote input's
    metadata and a listing are fetched once for both, the URLs' metadata in parallel."""
    inputs = input_locations(cfg)  # listings expanded; URLs kept as URLs and hashed from their metadata
    prefetch_info(inputs.values())
    return run_stage("data", cfg, inputs, lambda out: build_corpus(cfg, out), Path(root))


@remote_lookups()
def build_corpus(cfg: DataConfig, out_dir: Path) -> dict[str, Any]:
    """Run the data stage into `out_dir`; rerunning into the same folder resumes (finished tasks are skipped).

    Args:
        cfg: the stage config.
        out_dir: output folder; must be empty or hold a run of the same config.

    Returns:
        {"counts": {"steps": {"<stage>/<step>": {in, kept, dropped, dropped_by_reason, ...}}, "totals": {...},
        "mix": {source: {docs, chars, doc_share, char_share, weight}}, "corrupt_files": [...]},
        "outputs": {"documents", "removed", "logs", "summary"}}.
    """
    files = expand_inputs(cfg.inputs, cfg.paths_base, cfg.max_files)  # listings -> the files they name
    check_inputs([*files, *cfg.text_sources])
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config_file = out_dir / "config.json"
    if config_file.exists() and json.loads(config_file.read_text()) != cfg.model_dump(mode="json"):
        raise ValueError(
            f"{out_dir} holds a run of a different config; use a fresh folder (e.g. one per cfg.fingerprint())"
        )
    config_file.write_text(cfg.model_dump_json(indent=2))
    seed_offline_assets()

    t0 = time.perf_counter()
    expanded = cfg.model_copy(update={"inputs": files})  # what the readers see; config.json keeps the listings
    steps, written, skipped = run_stages(plan_stages(expanded, out_dir), out_dir, cfg.workers, uses_ray(cfg))

    documents = out_dir / "documents"
    documents.mkdir(exist_ok=True)
    mix = _mix(cfg, documents)
    readers = [c for k, c in steps.items() if k.startswith("filter/") and c["kind"] == "reader"]
    docs_out = sum(m["docs"] for m in mix.values())
    if docs_out != written:
        raise DataInvariantError(f"{documents} holds {docs_out} documents but the last stage wrote {written}")
    totals = {
        "records_in": sum(c["in"] for c in readers),
        "docs_in": sum(c["kept"] for c in readers),
        "docs_out": docs_out,
        "chars_out": sum(m["chars"] for m in mix.values()),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    counts = {
        "steps": steps,
        "totals": totals,
        "mix": mix,
        "corrupt_files": sorted({f for c in readers for f in c["corrupt_files"]}),
        "skipped_stages": skipped,
    }
    outputs = {
        "documents": str(documents),
        "removed": str(out_dir / "removed"),
        "logs": str(out_dir / "logs"),
        "summary": str(out_dir / "summary.json"),
    }
    funnel_chart(steps, out_dir / "funnel.png")
    write_samples(out_dir)
    outputs.update({"funnel": str(out_dir / "funnel.png"), "samples": str(out_dir / "samples")})
    result = {"counts": counts, "outputs": outputs}
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    import sys

    setup_env()
    logging.basicConfig(level=logging.INFO)
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else runs_dir() / "data"
    result = build_corpus(DataConfig(), out_dir)
    print(json.dumps({"totals": result["counts"]["totals"], "mix": result["counts"]["mix"]}, indent=2))


if __name__ == "__main__":
    main()
