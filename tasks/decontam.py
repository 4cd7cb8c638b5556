"""Decontamination stage: which benchmark items this run's training data holds (GPT-3's 13-gram overlap).

In: the data stage's `CorpusRef` (its `documents/*.jsonl.gz`), the SFT sources and the preference sources (read
with `tasks.conversations`' loaders, so the text is what training saw), and the prepared benchmark files
(`DecontamConfig.data_dir`). Out: a `ContaminationReport` to `contamination.json` ({task: items, contaminated,
fraction, examples, doc_ids}) with `contamination.md`, the table. The matching lives in `eval/decontam.py`.
The pipeline runs it before promotion; `eval.decontam.clean_scores` then scores each task on its clean subset.
Run alone: `decontam_task.fn(DecontamConfig(), CorpusRef(path=...), sft_sources, preference_sources, root)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from eval.benchmarks import TASKS
from eval.decontam import MIN_WORDS, N_GRAM, BenchmarkIndex, check_tasks, check_texts, write_report
from infra.env import resolve_path
from infra.jsonl import iter_jsonl_folder
from tasks.conversations import PreferenceSource, SFTSource, load_pairs, load_sft
from tasks.refs import ContaminationReport, CorpusRef


class DecontamConfig(BaseModel):
    """Decontamination check config. Defaults are GPT-3's (Brown et al. 2020, appendix C)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(N_GRAM, ge=1, description="Word n-gram length; 13 as in GPT-3 (it capped n at 13 for speed).")
    min_words: int = Field(MIN_WORDS, ge=1, description="A segment (context + one choice) shorter than n words "
                           "but with at least this many is one n-gram of all its words; shorter ones cannot match. "
                           "8 is GPT-3's minimum n.")
    data_dir: str = Field("data/benchmarks", description="Folder of prepared benchmark files `<task>.jsonl.gz` "
                          "(`python -m eval.prepare` makes the full sets); doc_id = a record's line index.")
    tasks: list[str] = Field(default_factory=lambda: list(TASKS), description="Benchmarks to check.")

    @model_validator(mode="after")
    def _check(self) -> DecontamConfig:
        if self.min_words > self.n:
            raise ValueError(f"min_words ({self.min_words}) must be at most n ({self.n})")
        check_tasks(self.tasks)
        return self


def corpus_texts(corpus: CorpusRef) -> Iterator[tuple[str, str]]:
    """(document id, text) of every document the data stage kept."""
    for i, rec in enumerate(iter_jsonl_folder(corpus.path)):
        yield str(rec.get("id", i)), rec["text"]


def sft_texts(source: SFTSource) -> Iterator[tuple[str, str]]:
    """Every usable conversation of the source (the SFT mixture draws from these), its messages' contents joined."""
    convos, _ = load_sft(source)
    for i, convo in enumerate(convos):
        yield f"{i}", "\n".join(m["content"] for m in convo)


def preference_texts(source: PreferenceSource) -> Iterator[tuple[str, str]]:
    """Every usable pair of the source, twice: the prompt with the chosen reply, and with the rejected one."""
    pairs, _ = load_pairs(source)
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        context = "\n".join(m["content"] for m in prompt)
        yield f"{i}/chosen", f"{context}\n{chosen}"
        yield f"{i}/rejected", f"{context}\n{rejected}"


def check_contamination(cfg: DecontamConfig, corpus: CorpusRef, sft_sources: Sequence[SFTSource],
                        preference_sources: Sequence[PreferenceSource], out_dir: Path) -> ContaminationReport:
    """Core of the stage: index every benchmark item's n-grams, run this run's training text through the index,
    write `contamination.json` and `contamination.md` into `out_dir`.

    Returns the report: metrics `decontam/<task>/fraction`, counts of items and contaminated items per task and
    of documents read per source (`corpus`, `sft_<label>`, `preference_<label>`).
    """
    index = BenchmarkIndex.build(resolve_path(cfg.data_dir), cfg.tasks, cfg.n, cfg.min_words)
    # chat sources are loaded before the corpus is read: a bad file fails before the long part
    sources: dict[str, Iterable[tuple[str, str]]] = {f"sft_{s.label}": list(sft_texts(s)) for s in sft_sources}
    sources |= {f"preference_{s.label}": list(preference_texts(s)) for s in preference_sources}
    sources = {"corpus": corpus_texts(corpus), **sources}
    report = check_texts(index, sources)
    js, md = write_report(report, Path(out_dir))
    tasks = report["tasks"]
    counts = {**{f"items_{t}": r["items"] for t, r in tasks.items()},
              **{f"contaminated_{t}": r["contaminated"] for t, r in tasks.items()},
              **{f"docs_{s}": k for s, k in report["sources"].items()}}
    metrics = {f"decontam/{t}/fraction": r["fraction"] for t, r in tasks.items()}
    return ContaminationReport(path=str(js), counts=counts, metrics=metrics,
                               files={"report": str(js), "table": str(md)}, artifacts=["report", "table"])
