"""The benchmark suite: its nine log-likelihood tasks (the `core` group), in the order tables and charts list
them, the generative tasks scored by code, and where their data lives.

`eval.prepare` writes `<data_dir>/<task>.jsonl.gz` for each of the nine, `tasks.verifiable.write_benchmark` the
arithmetic file; `eval.taskgen` points lm-eval's task YAMLs at them; `tasks.evaluate.EvalConfig` runs all of them
by default.
"""

from __future__ import annotations

from pathlib import Path

TASKS: tuple[str, ...] = (
    "hellaswag",
    "arc_easy",
    "arc_challenge",
    "piqa",
    "winogrande",
    "boolq",
    "openbookqa",
    "lambada_openai",
    "wikitext",
)

# generate_until tasks, greedy, scored by code; kept out of `core` (its mean acc is over the nine)
GENERATIVE_TASKS: tuple[str, ...] = ("arithmetic",)


def data_file(data_dir: Path, task: str) -> Path:
    """The prepared records of `task`: `<data_dir>/<task>.jsonl.gz`."""
    return Path(data_dir) / f"{task}.jsonl.gz"
