"""Prompts whose answers code can check: GRPO's task (`tasks/grpo.py`) and its held-out accuracy.

A prompt is a question and the one integer that answers it. `make_prompts` generates them from a seed, every
operand pair of the task once, shuffled, the held-out share split off first, so the held-out questions are never
trained on. Tasks a ~1M-parameter model can learn:

- `add`: "What is 3 + 4?" -> "7" (operands 0..max_operand).
- `larger`: "Which is larger, 3 or 8?" -> "8" (two different operands): the model has to compare, not recall,
  so a small model generalises to held-out pairs, and a random guess between the two already scores half.

`load_prompts` reads the same records (`{"question": ..., "answer": <int>}`) from a JSONL file instead; a record
without a checkable answer is a one-line error naming the file and the line. `reward` is the checker: 1 for the
right number, `format_reward` for a wrong number alone on the line (the format asked for), 0 otherwise.
`prompt_ids` renders a question with the chat template, up to and with `<|assistant|>`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from infra.jsonl import JsonlError, numbered_jsonl
from tasks.stage import GptflowError

Task = Literal["add", "larger"]
_NUMBER = re.compile(r"-?\d+")


class VerifiablePrompt(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    question: str = Field(min_length=1, description="The user turn.")
    answer: int = Field(description="The one right answer; a response is right when it is this number alone.")


def _question(task: Task, a: int, b: int) -> VerifiablePrompt:
    if task == "add":
        return VerifiablePrompt(question=f"What is {a} + {b}?", answer=a + b)
    return VerifiablePrompt(question=f"Which is larger, {a} or {b}?", answer=max(a, b))


def make_prompts(task: Task, max_operand: int, n_val: int, seed: int) -> tuple[list[VerifiablePrompt], list[VerifiablePrompt]]:
    """(train, held-out) prompts: every operand pair of `task` once, shuffled by `seed`, `n_val` held out."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1) if task != "larger" or a != b]
    if n_val >= len(pairs):
        raise GptflowError(f"task {task} with operands 0..{max_operand} has {len(pairs)} prompts; "
                           f"{n_val} held out leaves none to train on")
    order = np.random.default_rng(seed).permutation(len(pairs))
    prompts = [_question(task, *pairs[i]) for i in order]
    return prompts[n_val:], prompts[:n_val]


def load_prompts(path: Path, n_val: int, seed: int) -> tuple[list[VerifiablePrompt], list[VerifiablePrompt]]:
    """(train, held-out) prompts from a JSONL file of `{"question", "answer"}` records, shuffled by `seed`."""
    prompts = []
    try:
        for line, record in numbered_jsonl(path):
            answer = record.get("answer")
            if isinstance(answer, str) and _NUMBER.fullmatch(answer.strip()):
                answer = int(answer)
            if isinstance(answer, bool) or not isinstance(answer, int):
                raise GptflowError(f"{path}: line {line}: no checkable answer (field 'answer' must be an integer, "
                                   f"got {answer!r})")
            if not isinstance(record.get("question"), str) or not record["question"].strip():
                raise GptflowError(f"{path}: line {line}: field 'question' must be a non-empty string")
            prompts.append(VerifiablePrompt(question=record["question"], answer=answer))
    except (JsonlError, OSError) as e:
        raise GptflowError(str(e)) from e
    if n_val >= len(prompts):
        raise GptflowError(f"{path}: {len(prompts)} prompts; {n_val} held out leaves none to train on")
    order = np.random.default_rng(seed).permutation(len(prompts))
    prompts = [prompts[i] for i in order]
    return prompts[n_val:], prompts[:n_val]


def reward(prompt: VerifiablePrompt, response: str, format_reward: float = 0.0) -> float:
    """1.0 when `response` is the answer alone (surrounding spaces aside), `format_reward` when it is another
    number alone, 0.0 otherwise."""
    text = response.strip()
    if not _NUMBER.fullmatch(text):
        return 0.0
    return 1.0 if int(text) == prompt.answer else format_reward


def prompt_ids(prompt: VerifiablePrompt, tok) -> list[int]:
    """The question as a user turn in the chat template, then `<|assistant|>`: where the model answers."""
    from models.tokens import role_token
    from tasks.chat import render

    ids, _ = render([{"role": "user", "content": prompt.question}], tok, 1 << 30)
    return ids + [tok.token_to_id(role_token("assistant"))]


def answer_ids(prompt: VerifiablePrompt, tok) -> list[int]:
    """The right answer's tokens and `<|end|>`: what the held-out loss scores."""
    from models.tokens import END

    return tok.encode(str(prompt.answer), add_special_tokens=False).ids + [tok.token_to_id(END)]


# ----------------------------------------------------------------------------------------------------------
# the evaluation stage's generative benchmark (lm-eval task `gptflow_arithmetic`, eval/tasks/gptflow_arithmetic.yaml)

BENCHMARK_OPERANDS = (10, 99)  # two-digit operands: GRPO trains on 0..max_operand (default 9), so never on these


def benchmark_prompts(n: int = 100, seed: int = 1234, task: Task = "larger") -> list[VerifiablePrompt]:
    """`n` prompts of `task` over two-digit operands, shuffled by `seed`: held out of GRPO's training prompts
    as long as its `max_operand` stays below 10 (the decontamination report checks the rest)."""
    lo, hi = BENCHMARK_OPERANDS
    pairs = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1) if task != "larger" or a != b]
    order = np.random.default_rng(seed).permutation(len(pairs))[:n]
    return [_question(task, *pairs[i]) for i in order]


def write_benchmark(path: Path, n: int = 100, seed: int = 1234) -> Path:
    """`<data_dir>/arithmetic.jsonl.gz`: one `{"question", "answer"}` record per line (the bundle's file)."""
    import gzip
    import json

    with gzip.GzipFile(path, "wb", mtime=0) as raw:  # mtime 0: the same prompts give the same bytes
        raw.write("".join(json.dumps(p.model_dump()) + "\n" for p in benchmark_prompts(n, seed)).encode())
    return Path(path)


def score_response(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval `process_results` of `gptflow_arithmetic`: exact_match 1.0 when the greedy response is the answer
    alone, by the same checker as GRPO's reward."""
    prompt = VerifiablePrompt(question=doc["question"], answer=int(doc["answer"]))
    return {"exact_match": float(reward(prompt, results[0]) == 1.0)}


if __name__ == "__main__":  # python -m tasks.verifiable DATA_DIR: write DATA_DIR/arithmetic.jsonl.gz
    import sys

    print(write_benchmark(Path(sys.argv[1]) / "arithmetic.jsonl.gz"))
