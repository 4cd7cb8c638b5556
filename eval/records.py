"""Check prepared benchmark files before any scoring starts: every record must be in the HF layout the task's
lm-eval definition reads (`eval/tasks/gptflow_<task>.yaml`), or lm-eval fails half-way through a run, or worse,
scores something else.

`check_file(task, path)` raises `BenchmarkDataError` with one line naming the file and the record (counting from
0, as `doc_id` does) for: an empty file, a line that is not a JSON object, a record in another task's layout
(it says which), a missing field, or a value the task's functions cannot use (a WinoGrande sentence without
"_", an ARC answerKey that is not one of its labels, a HellaSwag label outside its endings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.convert import BenchmarkDataError
from infra.jsonl import JsonlError, numbered_jsonl

# the fields each task's lm-eval definition reads (HF dataset layout)
FIELDS: dict[str, tuple[str, ...]] = {
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "arc_easy": ("question", "choices", "answerKey"),
    "arc_challenge": ("question", "choices", "answerKey"),
    "piqa": ("goal", "sol1", "sol2", "label"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "boolq": ("passage", "question", "label"),
    "openbookqa": ("question_stem", "choices", "answerKey"),
    "lambada_openai": ("text",),
    "wikitext": ("page",),
    "arithmetic": ("question", "answer"),
}


def _layout_of(rec: dict[str, Any]) -> str | None:
    """The task whose fields this record has (the first in FIELDS' order), if any."""
    return next((t for t, fields in FIELDS.items() if all(f in rec for f in fields)), None)


def _bad_value(task: str, rec: dict[str, Any]) -> str | None:
    """Why lm-eval's functions for `task` cannot use this record's values (None when they can)."""
    if task == "winogrande":
        if "_" not in str(rec["sentence"]):
            return "sentence has no '_' blank"
        if rec["answer"] not in ("1", "2"):
            return f"answer {rec['answer']!r} is not '1' or '2'"
    elif task == "hellaswag":
        endings = rec["endings"]
        if not isinstance(endings, list) or not str(rec["label"]).isdigit() or int(rec["label"]) >= len(endings):
            return f"label {rec['label']!r} is not an index into endings"
    elif task in ("arc_easy", "arc_challenge", "openbookqa"):
        choices = rec["choices"]
        if not isinstance(choices, dict) or not {"text", "label"} <= set(choices):
            return "choices is not {text: [...], label: [...]}"
        if str(rec["answerKey"]).lstrip() not in choices["label"]:
            return f"answerKey {rec['answerKey']!r} is not one of {choices['label']}"
    return None


def check_record(task: str, rec: dict[str, Any], where: str) -> None:
    """Raise BenchmarkDataError (one line, starting with `where`) unless `rec` is a usable `task` record."""
    missing = [f for f in FIELDS[task] if f not in rec]
    if missing:
        other = _layout_of(rec)
        hint = f"; its fields are {other}'s layout" if other else f"; it has {sorted(rec)[:8]}"
        raise BenchmarkDataError(f"{where}: not a {task} record, missing field(s) {missing}{hint}")
    why = _bad_value(task, rec)
    if why:
        raise BenchmarkDataError(f"{where}: bad {task} record: {why}")


def check_file(task: str, path: Path) -> int:
    """Check every record of a prepared `task` file; returns the record count."""
    if task not in FIELDS:
        raise ValueError(f"unknown benchmark task {task!r}; known: {', '.join(FIELDS)}")
    n = 0
    try:
        for n, (line, rec) in enumerate(numbered_jsonl(path), 1):
            check_record(task, rec, f"{path} record {n - 1} (line {line})")
    except JsonlError as e:
        raise BenchmarkDataError(str(e)) from e
    if n == 0:
        raise BenchmarkDataError(f"{path}: no records (empty benchmark file for task {task!r})")
    return n
