"""Counts of the data stage from datatrove's per-task stats files, with the in = kept + dropped invariant checked
at every step and across steps (what a step reads is what the steps before it let through).

Every block that can lose documents counts `total`, `forwarded` and `dropped` (+ `dropped_<reason>`); readers
count `records` in and `documents` out (`tasks/data/blocks.py`). A step's counts: {block, seconds, kind, in,
kept, dropped, dropped_by_reason, stats}; readers add `corrupt_files`, span dedup what it `removed`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.data.plan import DatatroveRun


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


def read_run_stats(logging_dir: Path, n_steps: int) -> list[Any]:
    """Merge `stats/<rank>.json` of every task (also those completed by an earlier run) into one Stats per step."""
    from datatrove.utils.stats import PipelineStats

    files = sorted((logging_dir / "stats").glob("*.json"))
    if not files:
        raise DataInvariantError(f"no datatrove stats in {logging_dir / 'stats'}; did the run happen?")
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


def _named_drops(raw: dict[str, Any]) -> dict[str, int]:
    return {k.removeprefix("dropped_"): v for k, v in raw.items() if k.startswith("dropped_")}


def _document_flow(key: str, step: Any, stats: Any, raw: dict[str, Any]) -> tuple | None:
    """(kind, in, kept, dropped by reason, extra counts) of a step that sees documents; None for one that does not."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter
    from datatrove.pipeline.dedup.minhash import MinhashDedupFilter
    from datatrove.pipeline.dedup.sentence_dedup import SentenceDedupFilter
    from datatrove.pipeline.extractors.base import BaseExtractor
    from datatrove.pipeline.filters.base_filter import BaseFilter
    from datatrove.pipeline.formatters.base import BaseFormatter
    from datatrove.pipeline.readers.base import BaseReader
    from datatrove.pipeline.writers.disk_base import DiskWriter

    if isinstance(step, BaseReader):
        kept = _total(stats, "documents")
        n_in = _total(stats, "records") if "records" in stats.stats else kept  # datatrove's own readers count docs only
        corrupt = sorted(k.split(":", 1)[1] for k in raw if k.startswith("corrupt_file:"))
        return "reader", n_in, kept, _named_drops(raw), {"corrupt_files": corrupt}
    if isinstance(step, BaseExtractor):
        reasons = {reason: _total(stats, k) for k, reason in _EXTRACTOR_DROPS.items() if _total(stats, k)}
        return "extractor", _total(stats, "total"), _total(stats, "forwarded"), reasons, {}
    if isinstance(step, (BaseFilter, ExactDedupFilter, MinhashDedupFilter, SentenceDedupFilter)):
        reasons = _named_drops(raw)
        unnamed = _total(stats, "dropped") - sum(reasons.values())
        if unnamed:
            reasons[_DEFAULT_REASONS.get(key, "unspecified")] = unnamed
        extra = {}
        if isinstance(step, SentenceDedupFilter):  # what span dedup cut from the documents it kept or dropped
            extra["removed"] = {
                "spans": _total(stats, "duplicate_spans"),
                "sentences": _total(stats, "removed_sentences"),
                "chars": _total(stats, "removed_chars"),
            }
        return "filter", _total(stats, "total"), _total(stats, "forwarded"), reasons, extra
    if isinstance(step, (BaseFormatter, DiskWriter)):
        kind = "formatter" if isinstance(step, BaseFormatter) else "writer"
        return kind, _total(stats, "total"), _total(stats, "total"), {}, {}
    if "total" in stats.stats:  # dedup signature steps: every document is hashed into the index; none go further
        return "index", _total(stats, "total"), _total(stats, "total"), {}, {}
    return None  # bucket / cluster steps work on signatures, not documents


def step_counts(key: str, step: Any, stats: Any) -> dict[str, Any]:
    """in / kept / dropped (by reason) of one step, from its merged datatrove stats."""
    totals = {k: _metric_total(v) for k, v in stats.stats.items() if "XXXXX" not in k}  # skip writer file templates
    raw = {k: int(v) if float(v).is_integer() else round(v, 3) for k, v in totals.items()}
    counts: dict[str, Any] = {"block": step.name, "seconds": round(stats.time_stats.total, 3)}
    flow = _document_flow(key, step, stats, raw)
    if flow is None:
        return counts | {"kind": "dedup", "stats": raw}
    kind, n_in, kept, reasons, extra = flow
    dropped = sum(reasons.values())
    if n_in != kept + dropped:
        raise DataInvariantError(f"step {key} ({step.name}): in={n_in} != kept={kept} + dropped={dropped} {reasons}")
    return counts | extra | {
        "kind": kind,
        "in": n_in,
        "kept": kept,
        "dropped": dropped,
        "dropped_by_reason": reasons,
        "stats": raw,
    }


def run_counts(run: DatatroveRun, logging_dir: Path) -> dict[str, dict[str, Any]]:
    """Counts per step of one run, checking that each step's input is what the steps before it let through."""
    merged = read_run_stats(logging_dir, len(run.steps))
    counts, flowing = {}, 0
    for (key, step), stats in zip(run.steps, merged, strict=True):
        c = step_counts(key, step, stats)
        if c["kind"] == "reader":
            flowing += c["kept"]  # readers pass earlier documents through and add their own
        elif "in" in c:
            if c["in"] != flowing:
                raise DataInvariantError(f"run {run.name}, step {key}: in={c['in']} but {flowing} documents reached it")
            flowing = c["kept"] if c["kind"] != "index" else 0
        counts[key] = c
    return counts
