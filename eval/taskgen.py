"""Render the lm-eval task YAMLs for one data folder.

The templates are `eval/tasks/gptflow_*.yaml`: lm-eval 0.4.13's own task YAMLs with `dataset_path: json`. Their
`dataset_kwargs: __DATASET_KWARGS__` placeholder becomes the `datasets.load_dataset("json", ...)` arguments: the
absolute path of every split file of the task that the data folder holds (`<task>.jsonl.gz` for the split lm-eval
evaluates, `<task>.<split>.jsonl.gz` for the others) and a datasets cache folder inside the output folder (so an
evaluation writes nothing outside it). The template's split keys (`training_split`, ...) are kept for the splits
present and set to null for the others, so lm-eval draws few-shot examples from the task's own few-shot split
when its file is there, and from the evaluation split otherwise (`split_keys` says how, and why the current
document is then left out). Every record is checked (`eval.records`) before anything is written. The templates
themselves are not runnable: point lm-eval at the rendered folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from eval.benchmarks import EVAL_SPLIT, GENERATIVE_TASKS, TASKS, split_file
from eval.records import check_file

__all__ = ["EVAL_SPLIT", "write_task_configs", "split_keys", "check_data_files", "expand_tasks", "lm_eval_name"]

TEMPLATE_DIR = Path(__file__).resolve().parent / "tasks"
PREFIX = "gptflow_"
GROUP = "gptflow_core"
PLACEHOLDER = "__DATASET_KWARGS__"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
_SPLIT_LINE = re.compile(r"^(training_split|validation_split|test_split|fewshot_split):[^\n]*\n", re.MULTILINE)
KNOWN = TASKS + GENERATIVE_TASKS


def lm_eval_name(task: str) -> str:
    """'hellaswag' -> 'gptflow_hellaswag'; 'core' or 'gptflow_core' -> the group."""
    short = short_name(task)
    if short == "core":
        return GROUP
    if short not in KNOWN:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(KNOWN)} or 'core' (the first nine)")
    return PREFIX + short


def short_name(task: str) -> str:
    return task.removeprefix(PREFIX)


def expand_tasks(tasks: Iterable[str]) -> list[str]:
    """Short names of the leaf tasks behind `tasks` ('core' expands to the nine), in order, no repeats."""
    out: list[str] = []
    for t in tasks:
        name = lm_eval_name(t)
        for leaf in TASKS if name == GROUP else [short_name(name)]:
            if leaf not in out:
                out.append(leaf)
    return out


# ----------------------------------------------------------------------------------------------------------
# splits


def _template(task: str) -> str:
    return (TEMPLATE_DIR / f"{PREFIX}{task}.yaml").read_text(encoding="utf-8")


def declared_splits(task: str) -> dict[str, str | None]:
    """The split keys of the task's YAML (lm-eval's own), e.g. {'training_split': 'train', ...}."""
    found = {m.group(1): m.group(0).split(":", 1)[1].strip() for m in _SPLIT_LINE.finditer(_template(task))}
    return {k: (None if found.get(k, "null") == "null" else found[k]) for k in SPLIT_KEYS}


def split_keys(task: str, present: Iterable[str]) -> dict[str, str | None]:
    """The task's split keys for a data folder holding the splits `present`.

    Each declared split stays when its file is present and becomes null otherwise. When no few-shot split is
    left, lm-eval falls back to the evaluation split; its sampler leaves the current document out only when the
    few-shot split equals `test_split` (lm_eval/api/task.py `fewshot_context`; for a validation-split task both
    are None), so a test-split task then gets `fewshot_split` = its test split, or a document could be its own
    example.
    """
    present = set(present)
    keys = {k: (v if v in present else None) for k, v in declared_splits(task).items()}
    pool = keys["fewshot_split"] or keys["training_split"] or keys["validation_split"] or keys["test_split"]
    if pool == EVAL_SPLIT[task] and keys["test_split"] == pool:
        keys["fewshot_split"] = pool
    return keys


def fewshot_pool(task: str, present: Iterable[str]) -> str:
    """The split lm-eval draws `task`'s few-shot examples from, given the splits present."""
    k = split_keys(task, present)
    return k["fewshot_split"] or k["training_split"] or k["validation_split"] or k["test_split"] or ""


def split_files(data_dir: Path, task: str) -> dict[str, Path]:
    """{split: absolute file} for the task's declared splits whose file is in data_dir (eval split first)."""
    names = [EVAL_SPLIT[task]] + [s for s in declared_splits(task).values() if s and s != EVAL_SPLIT[task]]
    files = {s: split_file(data_dir, task, s).resolve() for s in dict.fromkeys(names)}
    return {s: p for s, p in files.items() if p.is_file() or s == EVAL_SPLIT[task]}


def check_data_files(data_dir: Path, tasks: Iterable[str]) -> dict[str, dict[str, Path]]:
    """Every split file of each task, checked record by record; FileNotFoundError naming every missing
    evaluation file, BenchmarkDataError naming the first bad file and record."""
    files = {t: split_files(data_dir, t) for t in tasks}
    missing = [str(f[EVAL_SPLIT[t]]) for t, f in files.items() if not f[EVAL_SPLIT[t]].is_file()]
    if missing:
        raise FileNotFoundError(
            "benchmark data file(s) missing: "
            + ", ".join(missing)
            + " (make them with: python -m eval.prepare --src <shared data dir> --out <data_dir>;"
            + " arithmetic.jsonl.gz with: python -m tasks.verifiable <data_dir>)"
        )
    for t, by_split in files.items():
        for path in by_split.values():
            check_file(t, path)
    return files


# ----------------------------------------------------------------------------------------------------------
# rendering


def render_task(task: str, files: dict[str, Path], cache_dir: Path) -> str:
    """The task's YAML with its data files, cache folder and split keys filled in."""
    kwargs = {"data_files": {s: str(p) for s, p in files.items()}, "cache_dir": str(cache_dir)}
    keys = split_keys(task, files)
    block = "".join(f"{k}: {v if v else 'null'}\n" for k, v in keys.items())
    text = _SPLIT_LINE.sub("", _template(task))
    line = f"dataset_kwargs: {PLACEHOLDER}\n"
    assert line in text, f"{task}: template has no {line.strip()!r} line"
    return text.replace(line, f"dataset_kwargs: {json.dumps(kwargs, ensure_ascii=False)}\n{block}")  # JSON is YAML


def write_task_configs(data_dir: Path, out_dir: Path, tasks: Iterable[str] | None = None) -> Path:
    """Write gptflow_<task>.yaml for `tasks` (default: all nine) into out_dir; the group file is written when
    all nine are among them. Returns out_dir, ready for TaskManager(include_path=out_dir)."""
    tasks = expand_tasks(tasks) if tasks is not None else list(TASKS)
    files = check_data_files(data_dir, tasks)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{PREFIX}*.yaml"):  # a re-used folder must not keep tasks from an earlier run
        old.unlink()
    cache_dir = out_dir / ".datasets_cache"
    for t in tasks:
        (out_dir / f"{PREFIX}{t}.yaml").write_text(render_task(t, files[t], cache_dir), encoding="utf-8")
    if set(TASKS) <= set(tasks):
        (out_dir / f"{GROUP}.yaml").write_text(_template(GROUP.removeprefix(PREFIX)), encoding="utf-8")
    return out_dir
