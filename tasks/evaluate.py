"""Evaluation stage: lm-eval benchmarks (HellaSwag, ARC, PIQA, WinoGrande, BoolQ, OpenBookQA, LAMBADA,
WikiText) on the model, from local files. The harness itself lives in `eval/`.

In: a `model/` folder and the tokenizer. Out: `results.json`, `results.md` (the table), `results.png`.
Run alone: `gptflow eval --model DIR --tokenizer DIR`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

CORE_TASKS = ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "openbookqa",
              "lambada_openai", "wikitext"]


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[str] = Field(default_factory=lambda: list(CORE_TASKS), description="Benchmarks to run.")
    limit: int | None = Field(None, ge=1, description="Documents per task (None: all in the data folder).")
    data_dir: str = Field("data/benchmarks", description="Folder of prepared benchmark JSONL files (`python -m eval.prepare` makes the full sets).")
    batch_size: int = Field(16, ge=1, description="Requests per forward pass.")


def evaluate_model(cfg: EvalConfig, model_dir: Path, tokenizer_dir: Path, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    from eval.harness import plot_results, run_benchmarks

    report = run_benchmarks(model_dir, Path(tokenizer_dir) / "tokenizer.json", list(cfg.tasks), cfg.limit,
                            data_dir, out_dir, batch_size=cfg.batch_size)
    plot_results(report["results"], out_dir / "results.png")
    metrics = {f"eval/{task}/{name}": value for task, m in report["results"].items() for name, value in m.items()
               if isinstance(value, (int, float))}
    return {
        "counts": {"tasks": len(report["results"]), **{f"docs_{t}": n for t, n in report.get("samples_count", {}).items()}},
        "metrics": metrics,
        "outputs": {"results": out_dir / "results.json", "table": out_dir / "results.md", "plot": out_dir / "results.png"},
    }
