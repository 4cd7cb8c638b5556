"""Render the lm-eval task YAMLs for one data folder.

The templates are `eval/tasks/gptflow_*.yaml`. Their `dataset_kwargs: __DATASET_KWARGS__` placeholder becomes the
`datasets.load_dataset("json", ...)` arguments: the absolute path of `<data_dir>/<task>.jsonl.gz` under the split
name lm-eval's task evaluates, and a datasets cache folder inside the output folder (so an evaluation writes
nothing outside it). The templates themselves are not runnable: point lm-eval at the rendered folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from eval.benchmarks import GENERATIVE_TASKS, TASKS, data_file

TEMPLATE_DIR = Path(__file__).resolve().parent / "tasks"
PREFIX = "gptflow_"
GROUP = "gptflow_core"
PLACEHOLDER = "__DATASET_KWARGS__"

# split lm-eval evaluates for each task (validation where lm-eval has no labelled test set)
EVAL_SPLIT: dict[str, str] = {
    "hellaswag": "validation",
    "arc_easy": "test",
    "arc_challenge": "test",
    "piqa": "validation",
    "winogrande": "validation",
    "boolq": "validation",
    "openbookqa": "test",
    "lambada_openai": "test",
    "wikitext": "test",
    "arithmetic": "test",
}
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


def check_data_files(data_dir: Path, tasks: Iterable[str]) -> dict[str, Path]:
    """Absolute data file of each task; FileNotFoundError naming every missing file."""
    files = {t: data_file(data_dir, t).resolve() for t in tasks}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            "benchmark data file(s) missing: "
            + ", ".join(missing)
            + " (make them with: python -m eval.prepare --src <shared data dir> --out <data_dir>;"
            + " arithmetic.jsonl.gz with: python -m tasks.verifiable <data_dir>)"
        )
    return files


def render_task(task: str, data_path: Path, cache_dir: Path) -> str:
    template = (TEMPLATE_DIR / f"{PREFIX}{task}.yaml").read_text(encoding="utf-8")
    kwargs = {"data_files": {EVAL_SPLIT[task]: str(data_path)}, "cache_dir": str(cache_dir)}
    return template.replace(PLACEHOLDER, json.dumps(kwargs, ensure_ascii=False))  # JSON is valid flow YAML


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
        group = (TEMPLATE_DIR / f"{GROUP}.yaml").read_text(encoding="utf-8")
        (out_dir / f"{GROUP}.yaml").write_text(group, encoding="utf-8")
    return out_dir
