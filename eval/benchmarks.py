"""The benchmark suite: its nine tasks, in the order tables and charts list them, and where their data lives.

`eval.prepare` writes `<data_dir>/<task>.jsonl.gz` for each; `eval.taskgen` points lm-eval's task YAMLs at them;
`tasks.evaluate.EvalConfig` runs all of them by default.
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


def data_file(data_dir: Path, task: str) -> Path:
    """The prepared records of `task`: `<data_dir>/<task>.jsonl.gz`."""
    return Path(data_dir) / f"{task}.jsonl.gz"


# accuracy of guessing at random: 4 choices or 2; LAMBADA's exact-word accuracy has no meaningful chance level
CHANCE: dict[str, float] = {
    "hellaswag": 0.25,
    "arc_easy": 0.25,
    "arc_challenge": 0.25,
    "piqa": 0.5,
    "winogrande": 0.5,
    "boolq": 0.5,
    "openbookqa": 0.25,
}
