"""The data stage's config, `DataConfig`, and the inputs it uses when none are given (the bundled crawl samples).

The stage key hashes `DataConfig().model_dump(mode="json")`: a field, default or description changed here
changes the key of every data run, so finished stage folders are not reused.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from infra.env import DATA_DIR

COMMON_CRAWL_BASE = "https://data.commoncrawl.org/"  # where the relative paths of a `*.paths.gz` listing live
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
ASSETS_DIR = DATA_DIR / "assets"  # the fastText LID model and the LDNOOBW list, so the stage runs offline


# URL schemes the stage reads through fsspec: local files, HTTP(S) and the object stores. Others (ftp://, sftp://, a
# typo) are refused when the config is made, naming the field, rather than failing later as "could not be reached".
URL_SCHEMES = ("file", "http", "https", "s3", "gs", "gcs", "az", "abfs", "abfss")


def check_location(field: str, value: str) -> str:
    """A path or URL of the config, refused with a one-line error naming `field` when it cannot be read or would put
    credentials into the logs and MLflow params (the config is logged whole)."""
    if not value or any(ch in value for ch in "\0\n\r"):
        raise ValueError(f"{field}: {value!r} is not a usable path (empty, or holds a NUL or line break)")
    if "://" not in value:
        return value
    scheme, _, rest = value.partition("://")
    if scheme.lower() not in URL_SCHEMES:
        raise ValueError(f"{field}: {value!r} uses {scheme}://, which the data stage does not read; give a local "
                         f"path or a URL of: {', '.join(s + '://' for s in URL_SCHEMES)}")
    if "@" in rest.split("/", 1)[0]:
        raise ValueError(f"{field}: the URL holds credentials (user:password@host), which would be logged with the "
                         "config; give them through the environment (AWS_*, netrc, the tool's own config)")
    return value


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
    decontaminate: bool = Field(
        False,
        description="Drop every document that shares a word 13-gram with a benchmark item (GPT-3's rule, "
        "eval/decontam.py: segments of 8-12 words count as one n-gram) of any of the nine tasks in "
        "decontaminate_benchmarks; the last filter, counted as decontaminated. Off by default: the decontam stage "
        "reports contamination either way, and removal changes the corpus.",
    )
    decontaminate_benchmarks: str = Field(
        "data/benchmarks",
        description="The prepared benchmark files (`<task>.jsonl.gz`, `python -m eval.prepare`) decontaminate "
        "checks against; repo-relative or absolute.",
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

    @field_validator("inputs")
    @classmethod
    def _check_inputs(cls, v: list[str]) -> list[str]:
        return [check_location(f"inputs[{i}]", path) for i, path in enumerate(v)]

    @field_validator("paths_base", "decontaminate_benchmarks")
    @classmethod
    def _check_folder(cls, v: str, info) -> str:
        return check_location(info.field_name, v)

    @field_validator("text_sources")
    @classmethod
    def _check_weights(cls, v: dict[str, float]) -> dict[str, float]:
        for path, weight in v.items():
            check_location(f"text_sources[{path!r}]", path)
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
