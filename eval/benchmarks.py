"""The benchmark suite: its nine log-likelihood tasks (the `core` group), in the order tables and charts list
them, the generative tasks scored by code, and where their data lives.

`eval.prepare` writes `<data_dir>/<task>.jsonl.gz` (the split lm-eval evaluates) for each, plus optional
`<task>.<split>.jsonl.gz` files for other splits (a few-shot pool: `train`, `validation`); `eval.taskgen` points
lm-eval's task YAMLs at whichever are there; `tasks.verifiable.write_benchmark` writes the arithmetic file;
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

# generate_until tasks, greedy, scored by code; kept out of `core` (its mean acc is over the nine)
GENERATIVE_TASKS: tuple[str, ...] = ("arithmetic",)

# the split lm-eval evaluates for each task (validation where lm-eval's task has no labelled test set)
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


def data_file(data_dir: Path, task: str) -> Path:
    """The prepared records of `task`'s evaluation split: `<data_dir>/<task>.jsonl.gz`."""
    return Path(data_dir) / f"{task}.jsonl.gz"


def split_file(data_dir: Path, task: str, split: str) -> Path:
    """The prepared records of one split of `task`: the evaluation split is `<task>.jsonl.gz`, any other split
    (a few-shot pool) `<task>.<split>.jsonl.gz`."""
    if split == EVAL_SPLIT[task]:
        return data_file(data_dir, task)
    return Path(data_dir) / f"{task}.{split}.jsonl.gz"


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
